"""tools/train.py under a Megatron-LM launch line: the Megatron-LM flags it accepts, each with its meaning here.

One real run of a copied Megatron-LM SFT line (``megatron_run``) makes the checkpoint the resume tests set up from,
in this process (``loop.setup``: the model, optimizer, scheduler and loader a run would train with, no step).
Everything else is a plan (every check and read, no model) or a dataset, and takes well under a second.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_focusft import runtime
from megatron_focusft.data.dataset import BlendedPacks, PackedDataset, PackLoader, PackRange
from megatron_focusft.training import loop
from megatron_focusft.training.arguments import parse_args
from megatron_focusft.training.errors import SetupError
from megatron_focusft.training.plan import plan
from tests.training_fixtures import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
A_PACKS, B_PACKS = 14, 8  # the packs of setup_files' dataset (A) and of second_dataset (B)


def _unstamped(line: str) -> str:
    """A log line without the trainer's ``[YYYY-MM-DD HH:MM:SS]`` prefix."""
    return re.sub(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ", "", line)


def megatron_line(ckpt: Path, a: str, b: str, save: Path) -> list[str]:
    """A Megatron-LM SFT launch line (its model flags left out: the architecture comes from the checkpoint), with
    this machine's paths and ``--device cpu``."""
    return [
        *("--pretrained-checkpoint", str(ckpt), "--device", "cpu"),
        "--use-distributed-optimizer",
        "--exit-signal-handler",
        *("--train-samples", "6", "--lr-warmup-iters", "1", "--lr-decay-iters", "4"),
        *("--eval-iters", "2", "--eval-interval", "2"),
        *("--data-path", "0.7", a, "0.3", b, "--split", "90,10,0"),
        *("--distributed-timeout-minutes", "10", "--override-opt-param-scheduler"),
        *("--micro-batch-size", "1", "--global-batch-size", "2"),
        *("--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine", "--weight-decay", "0.1"),
        *("--clip-grad", "1.0", "--seed", "1234"),
        *("--save", str(save), "--load", str(save), "--save-interval", "2", "--log-interval", "1"),
    ]


def changed(argv: list[str], **flags: str | None) -> list[str]:
    """``argv`` with each ``--flag`` (keyword ``flag``, ``-`` as ``_``) set to a value, or removed (None); a
    flag not in it is appended.  ``--data-path`` keeps its words."""
    out = list(argv)
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if flag in out:
            i = out.index(flag)
            end = i + 1
            while end < len(out) and not out[end].startswith("--"):
                end += 1
            out[i:end] = [] if value is None else [flag, *([] if value == "" else value.split(" "))]
        elif value is not None:
            out += [flag, *([] if value == "" else value.split(" "))]
    return out


def train_py(argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), *argv], env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory) -> str:
    return tiny_dataset(tmp_path_factory.mktemp("b") / "b", num_docs=24, seed=5)


@pytest.fixture(scope="module")
def megatron_run(setup_files, second_dataset, tmp_path_factory) -> tuple[list[str], Path, str]:
    """The Megatron-LM line run for real (3 iterations): its argv, its --save folder and its console log."""
    ckpt, a = setup_files
    save = tmp_path_factory.mktemp("megatron") / "run"
    argv = megatron_line(ckpt, a, second_dataset, save)
    done = train_py(argv)
    assert done.returncode == 0, done.stdout + done.stderr
    return argv, save, done.stdout


@pytest.mark.slow
def test_a_megatron_lm_sft_launch_line_runs_on_cpu(megatron_run, tmp_path):
    argv, save, log = megatron_run
    assert "note: --use-distributed-optimizer: not used with --device cpu" in log
    assert "note: --exit-signal-handler: always on here" in log
    lines = [_unstamped(line) for line in log.splitlines()]
    steps = [line.split(" | ")[0] for line in lines if line.startswith("step ") and "valid loss" not in line]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"]  # --train-samples 6 / --global-batch-size 2
    valid = [line.split(" | ")[0] for line in lines if "valid loss" in line]
    assert valid == ["step 2/3", "step 3/3"]  # --eval-interval 2, and at the end
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert (save / "latest").read_text().strip() == "iter_0000003"
    # The same line again with a longer schedule resumes at iteration 3 (--override-opt-param-scheduler): the
    # flags' schedule wins, said in the log, and the step count carries on.
    again = tmp_path / "run"
    shutil.copytree(save, again)
    longer = changed(argv, train_samples="8", lr_decay_iters="6", save=str(again), load=str(again))
    done = train_py(longer)
    assert done.returncode == 0, done.stdout + done.stderr
    override = next(line for line in done.stdout.splitlines() if "--override-opt-param-scheduler" in line)
    assert "from step 3" in override and "(decay iterations) 6 (checkpoint: 4)" in override
    last = next(x for x in map(_unstamped, done.stdout.splitlines()) if x.startswith("step 4/4 |"))
    # Megatron's cosine after step 4 of 6, one warm-up step: min + (max - min) (1 + cos(pi (4 - 1) / (6 - 1))) / 2
    lr = 1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi * 3 / 5))
    assert f"lr {lr:.3e}" in last


# ---- in-process set-ups from the run's checkpoint ------------------------------------------------------------


def _set_up(argv: list[str]) -> dict:
    """What ``loop.setup`` restored for ``argv`` (in this process; no --save, so no lock or writer)."""
    t = loop.setup(plan(parse_args(argv), world_size=1))
    try:
        return {
            "iteration": t.state.iteration,
            "consumed": t.loader.consumed_samples,
            "optimizer_state": len(t.optimizer.optimizer.state),
            "scheduler_steps": t.scheduler.num_steps,
            "max_lr": t.scheduler.max_lr,
            "decay_steps": t.scheduler.lr_decay_steps,
            "torch_rng": torch.get_rng_state(),
            "weights": {n: p.detach().clone() for n, p in t.model.named_parameters()},
        }
    finally:
        runtime.destroy()


@pytest.fixture(scope="module")
def resumed(megatron_run) -> tuple[list[str], dict]:
    """A plain resume of the run's checkpoint (iteration 3): its argv (no --save) and what setup restored."""
    argv, save, _ = megatron_run
    argv = changed(argv, save=None, save_interval=None)
    return argv, _set_up(argv)


def test_a_resume_restores_the_optimizer_scheduler_rng_and_data_position(megatron_run, resumed):
    _, save, _ = megatron_run
    _, state = resumed
    assert (state["iteration"], state["consumed"], state["scheduler_steps"]) == (3, 6, 3)
    assert state["optimizer_state"] > 0
    saved_rng = torch.load(save / "iter_0000003" / "rank_state" / "rank_00000.pt", weights_only=True)["torch"]
    assert torch.equal(state["torch_rng"], saved_rng)


def test_no_load_optim_starts_the_optimizer_fresh_and_keeps_the_rest(resumed):
    argv, plain = resumed
    state = _set_up([*argv, "--no-load-optim"])
    assert state["optimizer_state"] == 0
    assert (state["iteration"], state["consumed"], state["scheduler_steps"]) == (3, 6, 3)
    assert torch.equal(state["torch_rng"], plain["torch_rng"])


def test_no_load_rng_takes_the_rng_from_the_seed(megatron_run, resumed, tmp_path):
    """Training here draws nothing from the global generators (fast weights are drawn from keyed generators), so
    the run's checkpoint holds the seed's states; a copy whose saved torch state is another one (resealed as the
    trainer seals) tells restoring it from not restoring it."""
    from megatron_focusft.convert import trust

    _, save, _ = megatron_run
    argv, _ = resumed
    other = tmp_path / "run"
    shutil.copytree(save, other)
    rank_file = other / "iter_0000003" / "rank_state" / "rank_00000.pt"
    saved = torch.load(rank_file, weights_only=True)
    saved["torch"] = torch.Generator().manual_seed(99).get_state()
    torch.save(saved, rank_file)
    trust.write_checksums(other / "iter_0000003")
    restored = _set_up(changed(argv, load=str(other)))
    assert torch.equal(restored["torch_rng"], saved["torch"])
    state = _set_up(changed(argv, load=str(other), no_load_rng=""))
    assert torch.equal(state["torch_rng"], torch.Generator().manual_seed(1234).get_state())  # --seed's
    assert state["optimizer_state"] > 0 and (state["iteration"], state["scheduler_steps"]) == (3, 3)


def test_finetune_starts_at_iteration_0_from_the_loaded_weights_with_a_fresh_optimizer(setup_files, resumed):
    argv, plain = resumed
    state = _set_up(changed(argv, pretrained_checkpoint=None, finetune=""))
    assert (state["iteration"], state["consumed"], state["scheduler_steps"], state["optimizer_state"]) == (0, 0, 0, 0)
    assert all(torch.equal(state["weights"][k], v) for k, v in plain["weights"].items())  # iteration 3's weights
    fresh = _set_up(changed(argv, load=None))  # the pretrained weights
    assert any(not torch.equal(fresh["weights"][k], v) for k, v in plain["weights"].items())
    ckpt, _ = setup_files  # a converted model (no training state) is a --finetune --load too
    converted = _set_up(changed(argv, pretrained_checkpoint=None, finetune="", load=str(ckpt)))
    assert converted["iteration"] == 0 and all(
        torch.equal(converted["weights"][k], v) for k, v in fresh["weights"].items()
    )


def test_override_opt_param_scheduler_resumes_a_changed_schedule(resumed):
    argv, _ = resumed
    new_schedule = changed(argv, lr="2e-4", lr_decay_iters="8", override_opt_param_scheduler=None)
    with pytest.raises(SetupError, match="the learning-rate schedule differs.*give --override-opt-param-scheduler"):
        plan(parse_args(new_schedule), world_size=1)
    overridden = [*new_schedule, "--override-opt-param-scheduler"]
    note = next(n for n in plan(parse_args(overridden), world_size=1).notes if "--override" in n)
    assert "--lr 0.0002 (checkpoint: 0.0001)" in note and "(decay iterations) 8 (checkpoint: 4)" in note
    state = _set_up(overridden)
    assert (state["max_lr"], state["decay_steps"], state["scheduler_steps"], state["iteration"]) == (2e-4, 8, 3, 3)


def test_distributed_timeout_minutes_reach_the_process_group(setup_files, monkeypatch):
    ckpt, data = setup_files
    seen = {}

    def initialize(*args, **kwargs):
        seen.update(kwargs)
        raise InterruptedError  # stop before anything is built

    monkeypatch.setattr(loop.runtime, "initialize", initialize)
    argv = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--train-iters", "1"]
    for extra, minutes in (([], 30), (["--distributed-timeout-minutes", "7"], 7)):
        with pytest.raises(InterruptedError):
            loop.setup(plan(parse_args([*argv, *extra]), world_size=1))
        assert seen["timeout_minutes"] == minutes


# ---- plans: each flag's meaning ------------------------------------------------------------------------------


def _plan(ckpt: Path, data: str, *extra: str, world_size: int = 1):
    argv = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", *extra]
    return plan(parse_args(argv), world_size=world_size)


@pytest.mark.parametrize("samples, gbs, iters", [(8, 2, 4), (7, 2, 3), (9, 4, 2), (4, 4, 1)])
def test_train_samples_give_the_iterations(setup_files, samples, gbs, iters):
    """Megatron-LM's count: train_samples // global_batch_size global batches (the partial last one dropped)."""
    ckpt, data = setup_files
    p = _plan(ckpt, data, "--train-samples", str(samples), "--global-batch-size", str(gbs))
    assert p.schedule.train_iters == p.schedule.decay_iters == iters
    dropped = [n for n in p.notes if n.startswith("--train-samples")]
    if samples % gbs:
        assert len(dropped) == 1 and f"the last {samples % gbs} do not fill a global batch" in dropped[0]
    else:
        assert dropped == []


def test_warmup_and_decay_iters_reach_the_scheduler(setup_files):
    """Linear warm-up over --lr-warmup-iters, cosine to --min-lr at --lr-decay-iters, --min-lr after it (the run
    is longer than the decay), as Megatron's scheduler computes them."""
    ckpt, data = setup_files
    flags = ["--train-iters", "10", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine"]
    p = _plan(ckpt, data, *flags, "--lr-warmup-iters", "2", "--lr-decay-iters", "6")
    assert (p.schedule.train_iters, p.schedule.warmup_iters, p.schedule.decay_iters) == (10, 2, 6)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    scheduler = loop._build_scheduler(optimizer, p.schedule)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        scheduler.step(increment=1)
        lrs.append(optimizer.param_groups[0]["lr"])
    cosine = [1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(3, 7)]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, *cosine, 1e-4, 1e-4, 1e-4, 1e-4])
    # --lr-warmup-fraction is a share of the decay iterations, as in Megatron-LM
    assert _plan(ckpt, data, *flags, "--lr-warmup-fraction", "0.5", "--lr-decay-iters", "6").schedule.warmup_iters == 3
    assert _plan(ckpt, data, *flags).schedule.warmup_iters == 1  # neither: 10% of the run


def test_a_blend_draws_packs_in_proportion_deterministically_and_resumably(setup_files, second_dataset):
    ckpt, a = setup_files
    flags = ["--data-path", "0.7", a, "0.3", second_dataset, "--train-iters", "500", "--global-batch-size", "2"]
    blend = _plan(ckpt, a, *flags).train_data
    assert isinstance(blend, BlendedPacks) and len(blend) == 1000
    located = [blend.locate(i) for i in range(len(blend))]
    parts = np.array([part for part, _ in located])
    drawn = np.cumsum(parts[:, None] == np.arange(2), axis=0)  # draws from each part over every prefix
    share = np.arange(1, 1001)[:, None] * np.array([0.7, 0.3])
    assert np.abs(drawn - share).max() <= 1 and drawn[-1].tolist() == [700, 300]
    # every pass over a part draws each of its packs once, in a fresh order
    a_packs = [pack for part, pack in located if part == 0]
    assert sorted(a_packs[:A_PACKS]) == sorted(a_packs[A_PACKS : 2 * A_PACKS]) == list(range(A_PACKS))
    assert a_packs[:A_PACKS] != a_packs[A_PACKS : 2 * A_PACKS]
    # deterministic by seed: the same plan draws the same packs; another seed the same parts, other packs
    again = _plan(ckpt, a, *flags).train_data
    assert [again.locate(i) for i in range(1000)] == located
    other = _plan(ckpt, a, *flags, "--seed", "7").train_data
    assert [other.locate(i)[0] for i in range(1000)] == parts.tolist()
    assert [other.locate(i) for i in range(1000)] != located
    # a longer run's blend begins with this one, so a resumed run with a new length reads on where it stopped
    longer = _plan(ckpt, a, *changed(flags, train_iters="800")).train_data
    assert [longer.locate(i) for i in range(1000)] == located

    def batches(loader, n):
        return [next(loader).tokens for _ in range(n)]

    whole = batches(PackLoader(blend, 0, 1, seed=1234, micro_batch_size=2), 10)
    assert torch.equal(whole[3], blend.micro_batch([6, 7], pad_to=blend.pack_length).tokens)  # in the blend's order
    resumed = batches(
        PackLoader(_plan(ckpt, a, *flags).train_data, 0, 1, seed=1234, micro_batch_size=2, consumed_samples=10), 5
    )
    assert all(torch.equal(x, y) for x, y in zip(whole[5:], resumed))


def test_a_plain_data_path_reads_as_before(setup_files):
    ckpt, data = setup_files
    p = _plan(ckpt, data, "--train-iters", "1", "--global-batch-size", "2")
    assert isinstance(p.train_data, PackedDataset) and p.valid_data is None and p.run.blend == ""
    weighted = _plan(ckpt, data, "--train-iters", "1", "--data-path", "1.0", data).train_data  # one part: no blend
    assert isinstance(weighted, PackedDataset) and len(weighted) == A_PACKS


def test_split_gives_disjoint_train_and_valid_packs(setup_files, second_dataset):
    """Megatron-LM's --split: consecutive index ranges of each dataset (90% of 14 packs: round(12.6) = 13)."""
    ckpt, a = setup_files
    p = _plan(ckpt, a, "--split", "90,10,0", "--train-iters", "21", "--global-batch-size", "2")
    assert (p.train_data.start, p.train_data.stop, p.valid_data.start, p.valid_data.stop) == (0, 13, 13, 14)
    assert p.run.num_packs == 13
    loader = PackLoader(p.train_data, 0, 1, seed=1234, micro_batch_size=2)
    trained = {pack for _ in range(21) for pack, doc in next(loader).document_keys if doc == 0}
    valid = {pack for pack, doc in p.valid_data.micro_batch(list(range(len(p.valid_data)))).document_keys if doc == 0}
    assert trained == set(range(13)) and valid == {13}  # every training pack trains, none validates
    # a blend splits each of its datasets; a test share is held out (and said so)
    flags = ["--data-path", "0.7", a, "0.3", second_dataset, "--split", "80,10,10", "--train-iters", "3"]
    p = _plan(ckpt, a, *flags)
    ranges = [(part.start, part.stop) for part in p.train_data.parts]
    assert ranges == [(0, 11), (0, 6)] and [(v.start, v.stop) for v in p.valid_data.parts] == [(11, 13), (6, 7)]
    assert len(p.valid_data) == 3 and "--split 80,10,10: 2 test packs held out" in " ".join(p.notes)


def test_eval_iters_takes_the_first_global_batches_of_validation_packs(setup_files, tmp_path):
    ckpt, data = setup_files
    valid = tiny_dataset(tmp_path / "valid", num_docs=40, seed=3)
    total = len(PackedDataset(valid))
    flags = ["--valid-data-path", valid, "--train-iters", "1", "--global-batch-size", "2"]
    assert len(_plan(ckpt, data, *flags).valid_data) == total  # the default: every pack
    four = _plan(ckpt, data, *flags, "--eval-iters", "2").valid_data
    assert isinstance(four, PackRange) and (four.start, four.stop) == (0, 4)  # 2 global batches of 2 packs
    capped = _plan(ckpt, data, *flags, "--eval-iters", "100")
    assert len(capped.valid_data) == total and any("has only" in n for n in capped.notes)
    off = _plan(ckpt, data, *flags, "--eval-iters", "0", "--eval-interval", "1")
    assert off.valid_data is None and "--eval-iters 0: no validation" in off.notes


def test_megatron_lm_flags_that_are_always_on_here_are_said_once(setup_files):
    ckpt, data = setup_files
    flags = ["--train-iters", "1", "--use-distributed-optimizer", "--exit-signal-handler"]
    notes = _plan(ckpt, data, *flags).notes
    assert [n.split(":")[0] for n in notes] == ["--use-distributed-optimizer", "--exit-signal-handler"]
    assert "not used with --device cpu" in notes[0]
    assert parse_args(["--use-distributed-optimizer", "--device", "cuda"]).always_on == ("--use-distributed-optimizer",)


def test_wandb_exp_name_and_save_dir_reach_wandb(tmp_path, megatron_cpu, monkeypatch):
    from megatron_focusft.training.logger import MetricsLogger

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    argv = ["--wandb-project", "p", "--wandb-exp-name", "qwen-sft", "--wandb-save-dir", str(tmp_path / "wb")]
    cfg = parse_args([*argv, "--no-progress"])
    MetricsLogger(cfg.logging, 10, 0, None, run_config=cfg.to_dict()).close()
    assert (calls[0]["project"], calls[0]["name"], calls[0]["dir"]) == ("p", "qwen-sft", tmp_path / "wb")
    assert (tmp_path / "wb").is_dir()


def test_a_yaml_config_gives_a_blend_as_a_list_or_words(setup_files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data-path: [0.7, data/a, 0.3, data/b]\nsplit: 98,2,0\n")
    assert parse_args(["--config", str(config)]).data.data_path == ("0.7", "data/a", "0.3", "data/b")
    config.write_text("data-path: 0.7 data/a 0.3 data/b\n")
    assert parse_args(["--config", str(config)]).data.data_path == ("0.7", "data/a", "0.3", "data/b")
    config.write_text("data-path: data/train\n")
    assert parse_args(["--config", str(config)]).data.data_path == ("data/train",)
    ckpt, data = setup_files  # lengths from the file and the command line are checked together
    config.write_text("epochs: 1\n")
    with pytest.raises(
        SetupError,
        match=re.escape("give one of --epochs, --train-iters, --train-samples (got --epochs and --train-samples)"),
    ):
        _plan(ckpt, data, "--config", str(config), "--train-samples", "4")


# ---- bad combinations: one-line errors before any work --------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-samples", "8", "--train-iters", "4"], "give one of --epochs, --train-iters, --train-samples (got"),
        (["--train-samples", "8", "--epochs", "1"], "(got --epochs and --train-samples)"),
        (["NO-LENGTH"], "give one of --epochs, --train-iters, --train-samples"),
        (["--train-samples", "1"], "--train-samples 1 is less than one --global-batch-size (2 packs)"),
        (["--train-samples", "0"], "--train-samples 0 must be at least 1"),
        (["--lr-warmup-iters", "1", "--lr-warmup-fraction", "0.1"], "give --lr-warmup-iters or --lr-warmup-fraction"),
        (["--lr-warmup-iters", "4", "--lr-decay-iters", "4"], "--lr-warmup-iters 4 must be less than the 4 decay"),
        (["--lr-decay-iters", "0"], "--lr-decay-iters 0 must be at least 1"),
        (["--eval-iters", "-1"], "--eval-iters -1 must be at least 0"),
        (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes 0 must be at least 1"),
        (["--data-path", "0.7", "A", "B"], "--data-path 0.7 A B: give PREFIX ..., or WEIGHT PREFIX pairs"),
        (["--data-path", "0", "A"], "--data-path 0 A: the weight 0 is not positive"),
        (["--data-path", "-0.5", "A", "1", "B"], "the weight -0.5 is not positive"),
        (["--split", "90,ten"], "--split 90,ten: expected up to three non-negative shares"),
        (["--split", "90,5,3,2"], "--split 90,5,3,2: expected up to three"),
        (["--split", "0,100,0"], "--split 0,100,0 leaves no training packs"),
        (["--split", "99,1,0"], "--split 99,1,0 gives --data-path DATA (14 packs) no validation pack"),
        (["--split", "90,10,0", "--valid-data-path", "DATA"], "give --split or --valid-data-path, not both"),
        (["--eval-interval", "2", "--split", "100,0,0"], "--eval-interval needs --valid-data-path (or a --split"),
        (["--finetune"], "--finetune needs --load"),
        (["--finetune", "--load", "SAVE"], "give --finetune --load or --pretrained-checkpoint, not both"),
        (["NO-PRETRAINED", "--finetune", "--load", "SAVE", "--save", "SAVE"], "--finetune with --load"),
        (["--data-path", "DATA", "PAD"], "--data-path: the parts' pad ids differ"),
    ],
)
def test_bad_combinations_are_one_line_errors_before_any_work(setup_files, tmp_path, extra, message):
    ckpt, data = setup_files
    paths = {"DATA": data, "SAVE": str(tmp_path / "save"), "PAD": tiny_dataset(tmp_path / "pad", meta={"pad_id": 7})}
    markers = ("NO-LENGTH", "NO-PRETRAINED")
    argv = ["--device", "cpu", "--global-batch-size", "2", *(paths.get(e, e) for e in extra if e not in markers)]
    if "--data-path" not in extra:
        argv += ["--data-path", data]
    if "NO-PRETRAINED" not in extra:
        argv += ["--pretrained-checkpoint", str(ckpt)]
    if "NO-LENGTH" not in extra and not {"--train-samples", "--train-iters", "--epochs"} & set(extra):
        argv += ["--train-iters", "1"]
    with pytest.raises(SetupError, match=re.escape(message.replace("DATA", data))) as e:
        plan(parse_args(argv), world_size=1)
    assert "\n" not in str(e.value)


def test_train_main_says_a_bad_combination_on_one_line_and_exits_2(setup_files, capsys):
    ckpt, data = setup_files
    argv = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--train-samples", "4"]
    assert loop.main([*argv, "--train-iters", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: give one of --epochs, --train-iters, --train-samples (got --train-iters and --train-samples)"


def test_every_tool_refuses_abbreviated_flags():
    """Megatron-LM's own parser has allow_abbrev=False; every parser here too, so that a Megatron-LM flag we lack
    is an error, never taken for one of ours that it begins."""
    for path in [*(ROOT / "tools").glob("*.py"), *(ROOT / "megatron_focusft").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                abbrev = [k.value for k in node.keywords if k.arg == "allow_abbrev"]
                assert abbrev and isinstance(abbrev[0], ast.Constant) and abbrev[0].value is False, path
