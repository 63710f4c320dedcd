"""tools/train.py end to end on CPU: equivalences a correct trainer must show, resume, signals, bad flags."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_focusft import runtime
from megatron_focusft.training import loop
from megatron_focusft.training.arguments import ArgumentError, parse_args
from megatron_focusft.training.errors import SetupError
from megatron_focusft.training.plan import plan
from tests.training_fixtures import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def _argv(ckpt: Path, data: str, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained-checkpoint",
        str(ckpt),
        "--data-path",
        data,
        "--device",
        "cpu",
        "--focusft-lora-rank",
        "8",
        "--focusft-inner-lr",
        "0.5",
        "--log-interval",
        "1",
        "--export-hf",
        str(out / "hf"),
        *extra,
    ]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _train(nprocs: int, argv: list[str]) -> None:
    assert runtime.launch_cpu_processes(loop.main, nprocs, args=(argv,)) == 0


SGD_ONE_STEP = [
    "--optimizer",
    "sgd",
    "--lr",
    "1.0",
    "--weight-decay",
    "0",
    "--clip-grad",
    "0",
    "--lr-warmup-fraction",
    "0",
    "--lr-decay-style",
    "constant",
    "--train-iters",
    "1",
]


def test_accumulation_and_data_parallelism_give_the_same_update(setup_files, tmp_path):
    ckpt, data = setup_files
    # DP ranks x micro-batches of 1 pack; "cp2" is 2 context-parallel ranks sharing each pack (DP = 1).
    layouts = {"1x4": (1, []), "2x2": (2, []), "4x1": (4, []), "cp2": (2, ["--context-parallel-size", "2"])}
    results = {}
    for name, (nprocs, extra) in layouts.items():
        out = tmp_path / name
        _train(nprocs, _argv(ckpt, data, out, *SGD_ONE_STEP, "--global-batch-size", "4", *extra))
        results[name] = _weights(out / "hf")
    start = _weights(ckpt.parent / "hf")
    for name in ("2x2", "4x1", "cp2"):
        for k, ref in sorted(results["1x4"].items()):
            delta_ref, delta = start[k] - ref, start[k] - results[name][k]
            assert delta_ref.abs().max() > 0, k  # every weight moved
            err = ((delta - delta_ref).abs().max() / delta_ref.abs().max()).item()
            # fp32 summation order differs between layouts: measured <= 5e-6, 1.9e-5 for one CP norm weight
            assert err <= 5e-5, (name, k, err)


def test_sgd_step_equals_minus_the_oracle_gradient(setup_files, tmp_path):
    """One SGD step (lr 1) on a global batch of 2 packs moves every weight by exactly minus the gradient
    that the independent oracle (HF model, one document at a time) computes for those documents."""
    from transformers import AutoModelForCausalLM

    from megatron_focusft.data.dataset import PackedDataset, PackLoader
    from megatron_focusft.fast_weights import TARGET_IDS, draw_lora_a
    from tests.oracle.focusft_oracle import fast_layer_indices, oracle_step_many

    ckpt, data = setup_files
    out = tmp_path / "sgd"
    _train(1, _argv(ckpt, data, out, *SGD_ONE_STEP, "--global-batch-size", "2", "--seed", "77"))
    loader = PackLoader(PackedDataset(data), 0, 1, seed=77, micro_batch_size=2)
    hf = AutoModelForCausalLM.from_pretrained(ckpt.parent / "hf", dtype=torch.float32, attn_implementation="eager")
    layers = hf.model.layers
    samples = []
    for pack in loader.epoch_order(0)[:2].tolist():
        for d, (ids, loss) in enumerate(loader.dataset.documents(pack)):
            a0 = {}
            for i in fast_layer_indices(len(layers)):
                for t, hf_t in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                    fan_in = getattr(layers[i].mlp, hf_t).in_features
                    a0[i, hf_t] = draw_lora_a((77, 0, pack, d, i, TARGET_IDS[t]), 8, fan_in, torch.device("cpu"))
            samples.append(
                {
                    "input_ids": torch.from_numpy(ids).long(),
                    "loss_mask": torch.from_numpy(loss).long(),
                    "A0": a0,
                }
            )
    ref = oracle_step_many(hf, samples, "sample", mode="glm", inner_steps=2, inner_lr=0.5, rank=8, alpha=64.0)
    start, end = _weights(ckpt.parent / "hf"), _weights(out / "hf")
    for name, grad in ref.grads.items():
        step = start[name] - end[name]
        assert torch.allclose(step, grad, rtol=1e-4, atol=1e-4 * grad.abs().max()), name


def test_resume_continues_exactly_like_the_uninterrupted_run(setup_files, tmp_path):
    ckpt, data = setup_files
    common = ["--global-batch-size", "2", "--train-iters", "4", "--lr", "1e-3", "--optimizer", "adam"]
    _train(1, _argv(ckpt, data, tmp_path / "full", *common, "--save", str(tmp_path / "full" / "ckpt")))
    interrupted = tmp_path / "parts"
    argv = _argv(
        ckpt, data, interrupted, *common, "--save", str(interrupted / "ckpt"), "--load", str(interrupted / "ckpt")
    )
    argv += ["--save-interval", "1", "--keep-checkpoints", "1"]  # the checkpoint resumed from gets pruned
    _train(1, [*argv, "--exit-interval", "2"])
    assert (interrupted / "ckpt" / "latest").read_text().strip() == "iter_0000002"
    assert not (interrupted / "hf").exists()
    _train(1, argv)  # auto-resumes from iteration 2
    full, resumed = _weights(tmp_path / "full" / "hf"), _weights(interrupted / "hf")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert sorted(p.name for p in (interrupted / "ckpt").glob("iter_*")) == ["iter_0000004"]
    assert (interrupted / "hf" / "tokenizer_config.json").is_file()  # kept although iteration 2 was pruned


def test_sigterm_leaves_a_loadable_checkpoint(setup_files, tmp_path):
    ckpt, data = setup_files
    save = tmp_path / "ckpt"
    argv = _argv(ckpt, data, tmp_path, "--global-batch-size", "2", "--train-iters", "100000", "--save", str(save))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "train.py"), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if "] step 3/" in line or time.time() > deadline:  # after the timestamp
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped by a signal" in rest
    from megatron_focusft.convert.megatron_io import CheckpointMeta, resolve_checkpoint

    found = resolve_checkpoint(save)
    assert CheckpointMeta.read(found).iteration >= 3
    from tools import convert_megatron_to_hf

    assert convert_megatron_to_hf.main(["--ckpt", str(save), "--out", str(tmp_path / "export"), "--no-progress"]) == 0


def test_sigusr1_under_the_slurm_launch_form_saves(setup_files, tmp_path):
    """The launch form of examples/run_focusft_qwen7b.sh under SLURM (one plain process per task, the
    torchrun-style environment derived from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID by its task wrapper):
    SIGUSR1 to one of two workers stops both after the same iteration with one loadable checkpoint."""
    import shlex

    ckpt, data = setup_files
    script_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    script_env.update(SLURM_JOB_ID="1", SLURM_NNODES="1", MASTER_ADDR="127.0.0.1", DRY_RUN="1")
    script_env.update(GPUS_PER_NODE="2", GLOBAL_BATCH="2", TP="1")
    dry = subprocess.run(
        ["bash", str(ROOT / "examples" / "run_focusft_qwen7b.sh")], env=script_env, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    argv = shlex.split(next(line for line in dry.stdout.splitlines() if line.startswith("srun ")))
    task = argv[argv.index("bash") : argv.index("-u") - 1]  # bash -c WRAPPER NAME  (then python -u train.py)
    save = tmp_path / "ckpt"
    train = _argv(ckpt, data, tmp_path, "--global-batch-size", "2", "--train-iters", "100000", "--save", str(save))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", SLURM_NTASKS="2")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(runtime._free_port()))
    procs = [
        subprocess.Popen(
            [*task, sys.executable, "-u", str(ROOT / "tools" / "train.py"), *train],
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    lines = []
    deadline = time.time() + 120
    for line in procs[0].stdout:  # rank 0 logs
        lines.append(line)
        if "] step 2/" in line or time.time() > deadline:
            break
    procs[1].send_signal(signal.SIGUSR1)  # the wrapper exec'd the worker: this pid is the Python process
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "".join(lines) + "\n".join(outs)
    assert "stopped by a signal" in outs[0]
    from megatron_focusft.convert.megatron_io import CheckpointMeta, resolve_checkpoint

    found = resolve_checkpoint(save)
    assert CheckpointMeta.read(found).iteration >= 2
    assert sorted(p.name for p in (found / "rank_state").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def _args(ckpt: Path, data: str, *extra: str):
    return parse_args(
        ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--train-iters", "1", *extra]
    )


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (
            ["--global-batch-size", "6", "--micro-batch-size", "4"],
            1,
            "--global-batch-size 6 is not divisible by --micro-batch-size 4 x data-parallel size 1",
        ),
        (["--global-batch-size", "4", "--micro-batch-size", "1"], 3, "--global-batch-size 4 is not divisible"),
        (["--tensor-model-parallel-size", "4"], 4, "tensor-parallel size 4 does not divide num_key_value_heads"),
        (["--data-path", "/nonexistent/prefix"], 1, "--data-path /nonexistent/prefix: missing"),
        (["--load", "FILE"], 1, "is not a folder"),
        (
            ["--load", "CKPT"],
            1,
            "no train_state.pt), e.g. a converted model; to start training from it use --pretrained",
        ),
        (["--load", "ITERS"], 1, "holds iter_0000003 but no 'latest' file"),
        (["--seq-length", "32"], 1, "--seq-length 32 is smaller than the pack length 64 of --data-path"),
        (["--export-hf", "EXISTING"], 1, "already exists; choose a new folder (nothing was run)"),
        (["--exit-interval", "2"], 1, "--exit-interval needs --save"),
        (["--lr-warmup-fraction", "1.0"], 1, "--lr-warmup-fraction 1.0 must be in [0, 1)"),
        (["--lr", "1e-5", "--min-lr", "1e-4"], 1, "--min-lr 0.0001 must be between 0 and --lr 1e-05"),
        (["--train-iters", "0"], 1, "--train-iters 0 must be at least 1"),
        (["--eval-interval", "2"], 1, "--eval-interval needs --valid-data-path"),
        (["--bf16"], 1, "--bf16 needs --device cuda"),
        (["--attention-backend", "te", "--attention-mask", "causal"], 1, "--attention-backend te needs --bf16"),
        (["--focusft-lora-rank", "1000"], 1, "--focusft-lora-rank 1000 is larger"),
    ],
)
def test_bad_flags_are_clear_errors_before_any_work(setup_files, tmp_path, extra, world, message):
    ckpt, data = setup_files
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    iters = tmp_path / "iters"
    (iters / "iter_0000003").mkdir(parents=True)
    (tmp_path / "existing").mkdir()
    paths = {"FILE": a_file, "CKPT": ckpt, "ITERS": iters, "EXISTING": tmp_path / "existing"}
    extra = [str(paths.get(e, e)) for e in extra]
    with pytest.raises(SetupError, match=re.escape(message)):
        plan(_args(ckpt, data, *extra), world_size=world)


def test_train_main_reports_bad_flags_on_one_line(capsys, tmp_path):
    assert loop.main(["--data-path", str(tmp_path / "none"), "--device", "cpu", "--train-iters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data-path") and "\n" not in err


# ---- resume edge cases, schedule and run checks (one saved run shared by the tests below) ---------------

SAVED_RUN = ["--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--optimizer", "adam", "--seed", "5"]


@pytest.fixture(scope="module")
def saved_run(setup_files, tmp_path_factory) -> Path:
    """A finished 2-iteration run: ``ckpt`` with iter_0000001 and iter_0000002, ``hf`` its export."""
    ckpt, data = setup_files
    out = tmp_path_factory.mktemp("saved")
    _train(1, _argv(ckpt, data, out, *SAVED_RUN, "--save", str(out / "ckpt"), "--save-interval", "1"))
    return out


def test_a_requeued_job_that_crashed_before_its_first_checkpoint_starts_fresh(setup_files, tmp_path, capfd):
    ckpt, data = setup_files
    save = tmp_path / "save"
    (save / "tokenizer").mkdir(parents=True)  # what setup writes before any checkpoint
    (save / "tensorboard").mkdir()
    (save / "tensorboard" / "events.out").write_text("x")
    (save / ".iter_0000001.partial").mkdir()  # a save killed half-way
    argv = _argv(ckpt, data, tmp_path, "--global-batch-size", "2", "--train-iters", "1")
    _train(1, [*argv, "--load", str(save), "--save", str(save)])
    assert "holds no checkpoint yet: starting fresh" in capfd.readouterr().out
    assert (save / "latest").read_text().strip() == "iter_0000001"
    assert not (save / ".iter_0000001.partial").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (["--lr", "2e-3"], "--lr 0.002 (checkpoint: 0.001)"),
        (["--train-iters", "20"], "(decay iterations) 20 (checkpoint: 2)"),
        (["--lr-decay-style", "linear"], "--lr-decay-style linear (checkpoint: cosine)"),
        (["--min-lr", "1e-4"], "--min-lr 0.0001 (checkpoint: 0.0)"),
        (["--seed", "6"], "--seed is 6 but the checkpoint"),
        (["--global-batch-size", "4"], "--global-batch-size is 4 but the checkpoint"),
        (["--data-path", "OTHER"], "--data-path/--split (training packs) is"),
    ],
)
def test_a_resume_with_changed_schedule_or_data_position_is_refused(setup_files, saved_run, tmp_path, change, message):
    ckpt, data = setup_files
    other = tiny_dataset(tmp_path / "other", num_docs=80)
    change = [other if c == "OTHER" else c for c in change]
    args = parse_args([*_argv(ckpt, data, tmp_path, *SAVED_RUN), "--load", str(saved_run / "ckpt"), *change])
    with pytest.raises(SetupError, match=re.escape(message)):
        plan(args, world_size=1)


def test_the_same_flags_resume_and_a_finished_run_keeps_its_export(setup_files, saved_run, tmp_path):
    ckpt, data = setup_files
    argv = [*_argv(ckpt, data, saved_run, *SAVED_RUN), "--load", str(saved_run / "ckpt")]
    plan(parse_args(argv), world_size=1)  # finished + resumed: the existing export is fine
    # Unfinished (latest rolled back to iteration 1): the existing export folder is an error at the start.
    save = tmp_path / "ckpt"
    shutil.copytree(saved_run / "ckpt", save)
    (save / "latest").write_text("iter_0000001\n")
    argv = [*_argv(ckpt, data, saved_run, *SAVED_RUN), "--load", str(save)]
    with pytest.raises(SetupError, match="already exists"):
        plan(parse_args(argv), world_size=1)


def test_a_stale_checkpoint_of_another_trajectory_is_replaced(setup_files, saved_run, tmp_path):
    """``latest`` rolled back to iteration 1; iter_0000002 left over holds something else (here: iteration
    1's checkpoint).  Resuming rewrites iter_0000002 with the real iteration 2 and repoints ``latest``."""
    from megatron_focusft.convert.megatron_io import CheckpointMeta

    ckpt, data = setup_files
    save = tmp_path / "ckpt"
    shutil.copytree(saved_run / "ckpt", save)
    shutil.rmtree(save / "iter_0000002")
    shutil.copytree(save / "iter_0000001", save / "iter_0000002")
    (save / "latest").write_text("iter_0000001\n")
    (save / ".iter_0000007.partial").mkdir()  # left by a killed save
    argv = _argv(ckpt, data, tmp_path, *SAVED_RUN, "--save", str(save), "--load", str(save), "--keep-checkpoints", "5")
    _train(1, argv)
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert CheckpointMeta.read(save / "iter_0000002").iteration == 2
    assert torch.load(save / "iter_0000002" / "train_state.pt", weights_only=False)["state"]["iteration"] == 2
    assert not list(save.glob(".iter_*"))
    resumed, full = _weights(tmp_path / "hf"), _weights(saved_run / "hf")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ---- YAML configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("optimizer: adamw\n", "optimizer: invalid choice 'adamw' (choose from adam, sgd)"),
        ("lr-decay-style: cosin\n", "lr-decay-style: invalid choice 'cosin'"),
        ("global-batch-size: 32.0\n", "global-batch-size: invalid int value 32.0"),
        ("lr: fast\n", "lr: invalid float value 'fast'"),
        ("bf16: 1\n", "bf16: expected true or false"),
    ],
)
def test_yaml_values_are_checked_like_flags(tmp_path, yaml_text, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ArgumentError, match=re.escape(f"--config {config}: {message}")):
        parse_args(["--config", str(config)])


def test_yaml_values_get_the_flags_types(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("global-batch-size: 32\nlr: 1e-5\nsave: runs/x\nbilevel: false\nlr_decay_style: linear\n")
    cfg = parse_args(["--config", str(config)])
    batch, opt, save = cfg.batch, cfg.optimization, cfg.checkpoints.save
    assert (batch.global_batch_size, opt.lr, save, cfg.focusft.bilevel) == (32, 1e-5, Path("runs/x"), False)
    assert type(batch.global_batch_size) is int and type(opt.lr) is float and opt.lr_decay_style == "linear"


# ---- data checks ----------------------------------------------------------------------------------------


def test_data_with_a_larger_vocabulary_than_the_model_is_refused(setup_files, tmp_path):
    ckpt, data = setup_files
    big = tiny_dataset(tmp_path / "big", meta={"vocab_size": 300})
    with pytest.raises(SetupError, match="the data's vocab_size 300 is larger than the model's 256"):
        plan(_args(ckpt, big), world_size=1)
    plan(_args(ckpt, tiny_dataset(tmp_path / "ok", meta={"vocab_size": 256})), world_size=1)


def test_a_longer_seq_length_warns_once(setup_files, capsys):
    ckpt, data = setup_files
    plan(_args(ckpt, data, "--seq-length", "96"), world_size=1)
    err = capsys.readouterr().err
    assert err.count("warning: --seq-length 96 is larger than the pack length 64") == 1


# ---- throughput and MFU ---------------------------------------------------------------------------------


def test_tflops_per_gpu_counts_every_replica_once():
    """DP=4 replicas of TP=2 x CP=2 (16 GPUs): each replica runs 3e15 FLOPs in 2 s on its 4 GPUs, so every
    GPU does 3e15 / 4 / 2 s = 375 TFLOP/s; the job processes 4 x 10,000 tokens in 2 s."""
    from megatron_focusft.training.logger import throughput

    dp, tp, cp, replica_flops, replica_tokens, seconds = 4, 2, 2, 3e15, 10_000, 2.0
    speed = throughput(seconds, dp * replica_tokens, dp * replica_flops, world_size=dp * tp * cp)
    assert speed["tflops_per_gpu"] == pytest.approx(replica_flops / (tp * cp) / seconds / 1e12)  # 375
    assert speed["global_tokens_per_s"] == pytest.approx(20_000)


def test_wandb_run_resumes_with_the_save_folder(tmp_path, megatron_cpu, monkeypatch):
    """A requeued job (same --save) logs into the same W&B run; a run without --save gets a new one."""
    import types

    from megatron_focusft.training.logger import MetricsLogger

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def start(save):
        argv = ["--wandb-project", "p", "--no-progress"] + (["--save", str(save)] if save else [])
        cfg = parse_args(argv)
        MetricsLogger(cfg.logging, 10, 0, None, save_dir=cfg.checkpoints.save, run_config=cfg.to_dict()).close()

    start(tmp_path / "run")
    start(tmp_path / "run")
    start(None)
    assert calls[0]["id"] == calls[1]["id"] and calls[0]["resume"] == "allow"
    assert calls[2]["id"] is None and calls[2]["resume"] is None
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == calls[0]["id"]


def test_peak_tflops_per_gpu_variant():
    from megatron_focusft.flops import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") is None
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None  # no MFU for fp32 runs


# ---- optimizer ------------------------------------------------------------------------------------------


def test_a_non_finite_gradient_skips_the_update(megatron_cpu):
    from megatron_focusft.training.optimizer import CpuOptimizer

    lin = torch.nn.Linear(3, 2)
    cfg = parse_args(["--optimizer", "sgd", "--lr", "0.5", "--weight-decay", "0", "--clip-grad", "0"])
    opt = CpuOptimizer(lin, cfg.optimization)
    before = [p.detach().clone() for p in lin.parameters()]
    for p in lin.parameters():
        p.main_grad = torch.ones_like(p)
    lin.weight.main_grad[0, 0] = float("nan")
    updated, norm, _ = opt.step()
    assert not updated and norm != norm
    assert all(torch.equal(b, p) for b, p in zip(before, lin.parameters()))
    lin.weight.main_grad[0, 0] = 1.0
    opt.zero_grad()
    updated, norm, _ = opt.step()
    assert updated and norm == pytest.approx(8**0.5)
    assert all(torch.allclose(b - 0.5, p) for b, p in zip(before, lin.parameters()))


def test_gpu_sgd_has_no_momentum_like_cpu_sgd(megatron_cpu):
    from megatron_focusft.training.optimizer import CpuOptimizer, megatron_optimizer_config

    cfg = parse_args(["--optimizer", "sgd"])
    cpu = CpuOptimizer(torch.nn.Linear(2, 2), cfg.optimization)
    megatron = megatron_optimizer_config(cfg.optimization, bf16=cfg.model.bf16)
    assert megatron.sgd_momentum == cpu.param_groups[0]["momentum"] == 0.0


# ---- validation loss ------------------------------------------------------------------------------------


def _evaluate_worker(argv: list[str]) -> float:
    return loop.evaluate(loop.setup(plan(parse_args(argv))))


def _oracle_valid_loss(hf_dir: Path, prefix: str, mode: str) -> float:
    """Mean over documents of each document's mean response loss, the HF model alone (no fast weights)."""
    from transformers import AutoModelForCausalLM

    from megatron_focusft.data.dataset import PackedDataset
    from tests.oracle.focusft_oracle import additive_mask, response_loss

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    losses = []
    dataset = PackedDataset(prefix)
    with torch.no_grad():
        for i in range(len(dataset)):
            for ids, loss_mask in dataset.documents(i):
                ids, loss_mask = torch.from_numpy(ids).long(), torch.from_numpy(loss_mask).long()
                out = hf(input_ids=ids[None], attention_mask=additive_mask(loss_mask, mode, torch.float32))
                losses.append(response_loss(out.logits[0], ids, loss_mask)[0])
    return float(torch.stack(losses).mean())


def test_validation_loss_equals_the_base_model_loss_over_every_pack(setup_files, tmp_path):
    """Two DP ranks share a validation set with an odd number of packs; the loss equals the HF model's
    (base weights, glm mask, no fast weights) averaged over every document once."""
    from megatron_focusft.data.dataset import PackedDataset

    ckpt, data = setup_files
    valid = tiny_dataset(tmp_path / "valid", num_docs=9, seed=3)
    assert len(PackedDataset(valid)) % 2 == 1
    argv = _argv(ckpt, data, tmp_path, "--global-batch-size", "2", "--train-iters", "1", "--valid-data-path", valid)
    got = runtime.launch_cpu_processes(_evaluate_worker, 2, args=(argv,))
    want = _oracle_valid_loss(ckpt.parent / "hf", valid, "glm")
    assert got == pytest.approx(want, rel=1e-5)


def test_training_logs_the_validation_loss(setup_files, tmp_path, capfd):
    ckpt, data = setup_files
    valid = tiny_dataset(tmp_path / "valid", num_docs=9, seed=3)
    argv = _argv(ckpt, data, tmp_path, "--global-batch-size", "2", "--train-iters", "3", "--valid-data-path", valid)
    _train(1, [*argv, "--eval-interval", "2", "--lr", "0", "--min-lr", "0"])
    lines = [x for x in capfd.readouterr().out.splitlines() if "valid loss" in x]
    assert [x.split("] ", 1)[1].split(" | ")[0] for x in lines] == ["step 2/3", "step 3/3"]  # after the time
    want = _oracle_valid_loss(ckpt.parent / "hf", valid, "glm")  # lr 0: the weights stay the pretrained ones
    assert float(lines[-1].split("valid loss ")[1].split()[0]) == pytest.approx(want, rel=1e-3)


def _one_step_metrics(argv: list[str]) -> dict:
    return loop.train_step(loop.setup(plan(parse_args(argv))))


def test_a_step_counts_the_tokens_and_flops_of_the_whole_global_batch(setup_files, tmp_path):
    """Two DP ranks, 2 packs each: the step's token and FLOP counts are those of all 4 packs."""
    from megatron_focusft.convert.megatron_io import CheckpointMeta
    from megatron_focusft.data.dataset import PackedDataset, PackLoader
    from megatron_focusft.flops import sft_flops

    ckpt, data = setup_files
    argv = _argv(ckpt, data, tmp_path, "--global-batch-size", "4", "--train-iters", "1", "--seed", "9")
    got = runtime.launch_cpu_processes(_one_step_metrics, 2, args=(argv,))
    dataset, arch = PackedDataset(data), CheckpointMeta.read(ckpt).arch
    packs = PackLoader(dataset, 0, 1, seed=9, micro_batch_size=4).epoch_order(0)[:4].tolist()
    inputs = [dataset.micro_batch([i]) for i in packs]
    assert got["tokens"] == sum(int(dataset.pack_lengths()[i]) for i in packs)
    assert got["flops"] == pytest.approx(sum(sft_flops(arch, inp) for inp in inputs), rel=1e-12)


def test_an_abbreviated_flag_is_refused_not_guessed(capsys):
    """A Megatron-LM flag we lack must not silently become one we have: ``--tensorboard`` (not ours) was taken
    as ``--tensorboard-dir`` by argparse's prefix matching."""
    base = ["--pretrained-checkpoint", "c", "--data-path", "d", "--train-iters", "1"]
    with pytest.raises(SystemExit) as e:
        parse_args([*base, "--tensorboard", "runs"])
    assert e.value.code == 2 and "unrecognized arguments: --tensorboard runs" in capsys.readouterr().err
    assert parse_args([*base, "--tensorboard-dir", "runs"]).logging.tensorboard_dir == Path("runs")
