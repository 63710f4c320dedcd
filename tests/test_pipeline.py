"""Pipeline parallelism through Megatron's schedules: every layout's step equals the single-stage step.

One SGD step (lr 1, fp32) of FocuSFT (glm, K=2) on two micro-batches moves every weight by minus the
gradient; the exported weights of each PP layout are compared with PP=1's.  The tiny model has 4 layers
(fast layers 2 and 3) with tied embeddings, so the last stage's copy of the embedding is exercised; the
uneven split 3 + 1 puts fast layer 2 on the first stage (the inner loop spans both stages).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_focusft import runtime
from megatron_focusft.training import loop
from tests.training_fixtures import tiny_dataset, tiny_pretrained

SGD_ONE_STEP = [
    "--optimizer", "sgd", "--lr", "1.0", "--weight-decay", "0", "--clip-grad", "0",
    "--lr-warmup-fraction", "0", "--lr-decay-style", "constant", "--train-iters", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tied_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    return tiny_pretrained(root, num_layers=4, tie_word_embeddings=True), tiny_dataset(root / "data", num_docs=30)


def _argv(ckpt: Path, data: str, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu",
        "--focusft-lora-rank", "8", "--focusft-inner-lr", "0.5", "--log-interval", "1",
        "--global-batch-size", "2", "--export-hf", str(out / "hf"), *extra,
    ]  # fmt: skip


def _train(nprocs: int, argv: list[str]) -> dict[str, torch.Tensor]:
    assert runtime.launch_cpu_processes(loop.main, nprocs, args=(argv,)) == 0
    out = Path(argv[argv.index("--export-hf") + 1])
    return load_file(out / "model.safetensors")


def _assert_same_step(start: dict, ref: dict, got: dict, tol: float, label: str) -> None:
    assert set(ref) == set(got), label
    for k in sorted(ref):
        delta_ref, delta = start[k] - ref[k], start[k] - got[k]
        assert delta_ref.abs().max() > 0, (label, k)  # every weight moved
        err = ((delta - delta_ref).abs().max() / delta_ref.abs().max()).item()
        assert err <= tol, (label, k, err)


LAYOUTS = {
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2-spanning": (
        2,
        ["--pp", "2", "--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "1"],
    ),
    "pp2-tp2-sp": (4, ["--pp", "2", "--tp", "2", "--sequence-parallel"]),
    "pp2-cp2": (4, ["--pp", "2", "--context-parallel-size", "2"]),
    "pp2-dp2": (4, ["--pp", "2"]),  # two replicas of one micro-batch each
}


@pytest.mark.parametrize("method", ["focusft", "sft"])
def test_one_step_at_every_pipeline_layout_equals_a_single_stage(tied_files, tmp_path, method):
    ckpt, data = tied_files
    extra = ["--no-bilevel"] if method == "sft" else []
    ref = _train(1, _argv(ckpt, data, tmp_path / "pp1", *SGD_ONE_STEP, *extra))
    start = load_file(ckpt.parent / "hf" / "model.safetensors")
    layouts = LAYOUTS if method == "focusft" else {"pp2": LAYOUTS["pp2"]}
    for name, (nprocs, flags) in layouts.items():
        got = _train(nprocs, _argv(ckpt, data, tmp_path / name, *SGD_ONE_STEP, *extra, *flags))
        _assert_same_step(start, ref, got, 1e-4, f"{method} {name}")


def test_resume_at_pp2_is_bit_exact_and_its_checkpoints_export_at_pp1(tied_files, tmp_path):
    """2 + 2 iterations with a resume at PP=2 end on the weights of 4 uninterrupted ones (bit for bit); the
    PP=2 checkpoint, exported by the converter at PP=1, equals the PP=2 run's own export (bit for bit)."""
    from tools import convert_megatron_to_hf

    ckpt, data = tied_files
    common = ["--train-iters", "4", "--lr", "1e-3", "--optimizer", "adam", *LAYOUTS["pp2"][1]]
    full = _train(2, _argv(ckpt, data, tmp_path / "full", *common))
    parts = tmp_path / "parts"
    argv = _argv(ckpt, data, parts, *common, "--save", str(parts / "ckpt"), "--load", str(parts / "ckpt"))
    assert runtime.launch_cpu_processes(loop.main, 2, args=([*argv, "--exit-interval", "2"],)) == 0
    assert (parts / "ckpt" / "latest").read_text().strip() == "iter_0000002"
    resumed = _train(2, argv)
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)
    out = tmp_path / "exported"
    assert convert_megatron_to_hf.main(["--ckpt", str(parts / "ckpt"), "--out", str(out), "--no-progress"]) == 0
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(resumed) and all(torch.equal(exported[k], resumed[k]) for k in exported)


def test_a_pp2_tp2_checkpoint_exports_at_pp1_tp1_like_its_own_export(tied_files, tmp_path):
    from tools import convert_megatron_to_hf

    ckpt, data = tied_files
    nprocs, flags = LAYOUTS["pp2-tp2-sp"]
    live = _train(nprocs, _argv(ckpt, data, tmp_path, *SGD_ONE_STEP, *flags, "--save", str(tmp_path / "ckpt")))
    out = tmp_path / "exported"
    assert convert_megatron_to_hf.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--no-progress"]) == 0
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(live) and all(torch.equal(exported[k], live[k]) for k in exported)


def _evaluate_worker(argv: list[str]) -> float:
    from megatron_focusft.training.arguments import parse_args
    from megatron_focusft.training.plan import plan

    return loop.evaluate(loop.setup(plan(parse_args(argv))))


def test_the_validation_loss_at_pp2_equals_pp1(tied_files, tmp_path):
    ckpt, data = tied_files
    valid = tiny_dataset(tmp_path / "valid", num_docs=9, seed=3)
    argv = _argv(ckpt, data, tmp_path, "--train-iters", "1", "--valid-data-path", valid)
    one = runtime.launch_cpu_processes(_evaluate_worker, 1, args=(argv,))
    spanning = ["--pp", "2", "--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "1"]
    for flags in (LAYOUTS["pp2"][1], spanning):
        two = runtime.launch_cpu_processes(_evaluate_worker, 2, args=([*argv, *flags],))
        assert two == pytest.approx(one, rel=1e-6), flags


@pytest.mark.parametrize(
    "flags, world, message",
    [
        (["--pp", "3"], 3, "--pipeline-model-parallel-size 3 does not divide the model's 4 layers"),
        (
            ["--pp", "2", "--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "2"],
            2,
            "--decoder-first-pipeline-num-layers 3 + --decoder-last-pipeline-num-layers 2 = 5, not the model's 4",
        ),
        (
            ["--pp", "3", "--decoder-first-pipeline-num-layers", "2", "--decoder-last-pipeline-num-layers", "2"],
            3,
            "not every stage gets a layer",
        ),
        (["--pp", "2", "--decoder-first-pipeline-num-layers", "0"], 2, "leaves the first stage without layers"),
        (["--decoder-first-pipeline-num-layers", "2"], 1, "need --pipeline-model-parallel-size > 1"),
        (["--pp", "2", "--tp", "2"], 2, "world size 2 is not divisible by --tensor-model-parallel-size 2 x"),
    ],
)
def test_bad_pipeline_layouts_are_one_line_errors_before_any_work(tied_files, flags, world, message):
    import re

    from megatron_focusft.training.arguments import parse_args
    from megatron_focusft.training.errors import SetupError
    from megatron_focusft.training.plan import plan

    ckpt, data = tied_files
    argv = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--train-iters", "1"]
    with pytest.raises(SetupError, match=re.escape(message)) as e:
        plan(parse_args([*argv, "--global-batch-size", "2", *flags]), world_size=world)
    assert "\n" not in str(e.value)


def test_sigusr1_at_pp2_saves_a_loadable_checkpoint(tied_files, tmp_path):
    """SLURM's pre-emption signal to the last stage's process only: both stages stop after the same iteration
    with one checkpoint, which the converter (PP=1) reads."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from megatron_focusft.convert.megatron_io import CheckpointMeta, resolve_checkpoint
    from tools import convert_megatron_to_hf

    root = Path(__file__).resolve().parents[1]
    ckpt, data = tied_files
    save = tmp_path / "ckpt"
    train = _argv(ckpt, data, tmp_path, "--train-iters", "100000", "--save", str(save), *LAYOUTS["pp2"][1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(root), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", WORLD_SIZE="2")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(runtime._free_port()))
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", str(root / "tools" / "train.py"), *train],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    lines, deadline = [], time.time() + 120
    for line in procs[0].stdout:  # rank 0 (the first stage) logs
        lines.append(line)
        if "] step 2/" in line or time.time() > deadline:  # after the timestamp
            break
    procs[1].send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "".join(lines) + "\n".join(outs)
    assert "stopped by a signal" in outs[0]
    assert "pipeline: stage 0: layers 0-1, stage 1: layers 2-3; predicted per stage:" in "".join(lines)
    found = resolve_checkpoint(save)
    assert CheckpointMeta.read(found).iteration >= 2
    out = tmp_path / "exported"
    assert convert_megatron_to_hf.main(["--ckpt", str(save), "--out", str(out), "--no-progress"]) == 0
    assert set(load_file(out / "model.safetensors")) == set(load_file(ckpt.parent / "hf" / "model.safetensors"))
