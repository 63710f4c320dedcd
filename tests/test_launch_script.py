"""examples/run_focusft_qwen7b.sh: syntax, and the DRY_RUN command line (recipe, SLURM rendezvous, SCALE)."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "run_focusft_qwen7b.sh")

# The paper's Qwen2.5-7B recipe: flag -> value (None: a switch).
RECIPE = {
    "--lr": "1e-5",
    "--lr-decay-style": "cosine",
    "--lr-warmup-fraction": "0.1",
    "--weight-decay": "0.01",
    "--clip-grad": "1.0",
    "--epochs": "5",
    "--global-batch-size": "32",
    "--seq-length": "4096",
    "--focusft-inner-steps": "2",
    "--focusft-inner-lr": "1.0",
    "--focusft-lora-rank": "32",
    "--focusft-lora-alpha": "64",
    "--focusft-layer-fraction": "0.35",
    "--attention-mask": "glm",
    "--seed": "1234",
    "--loss-reduction": "sample",
    "--bf16": None,
    "--bilevel": None,
}

# Variables of the caller's environment that would change the script's defaults.
SCRIPT_VARS = (
    "SCALE PRETRAINED DATA_PATH SAVE_DIR TP CP SP RECOMPUTE SEQ_LENGTH MICRO_BATCH GLOBAL_BATCH NNODES "
    "GPUS_PER_NODE MASTER_ADDR MASTER_PORT LR MIN_LR EPOCHS TRAIN_ITERS SEED BILEVEL ATTENTION_BACKEND "
    "SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL TENSORBOARD_DIR WANDB_PROJECT EXPORT_HF EXTRA_ARGS DRY_RUN "
    "REPO_DIR OMP_NUM_THREADS NCCL_IB_TIMEOUT NCCL_DEBUG PYTORCH_CUDA_ALLOC_CONF"
).split()


@pytest.fixture
def fake_bin(tmp_path):
    """A folder for PATH with a fake ``scontrol`` that expands any node list to node-a, node-b."""
    d = tmp_path / "bin"
    d.mkdir()
    sc = d / "scontrol"
    sc.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\nprintf "node-a\\nnode-b\\n"\n')
    sc.chmod(sc.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return d


def run(env_extra: dict | None = None, path_prefix=None, dry_run=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    env["PATH"] = os.pathsep.join(
        [str(path_prefix)] * (path_prefix is not None) + ["/usr/bin", "/bin", env.get("PATH", "")]
    )
    if dry_run:
        env["DRY_RUN"] = "1"
    env.update(env_extra or {})
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=30)


def parse(out: str):
    """(exports dict, launch argv list) from the DRY_RUN output."""
    exports, argv = {}, None
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            exports[key] = shlex.split(value)[0] if value else ""
        elif line.startswith(("torchrun ", "srun ")):
            argv = shlex.split(line)
    assert argv is not None, out
    return exports, argv


def flag_value(argv: list[str], flag: str):
    assert flag in argv, f"{flag} missing from {argv}"
    assert argv.count(flag) == 1, f"{flag} given twice"
    i = argv.index(flag)
    return argv[i + 1] if i + 1 < len(argv) else None


def train_args(argv: list[str]) -> list[str]:
    i = next(k for k, a in enumerate(argv) if a.endswith("tools/train.py"))
    return argv[i + 1 :]


def test_bash_syntax():
    assert shutil.which("bash")
    res = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with open(SCRIPT) as f:
        text = f.read()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "tools/memory_plan.py" in text
    for line in (
        "--gpus-per-node=8",
        "--ntasks-per-node=1",
        "--exclusive",
        "--time=",
        "--output=",
        "--job-name=",
    ):
        assert f"#SBATCH {line}" in text


def test_local_dry_run_carries_the_recipe():
    res = run()
    assert res.returncode == 0, res.stderr
    exports, argv = parse(res.stdout)
    assert argv[:2] == ["torchrun", "--standalone"]
    assert flag_value(argv, "--nproc-per-node") == "8"
    args = train_args(argv)
    for flag, value in RECIPE.items():
        if value is None:
            assert flag in args, flag
        else:
            assert flag_value(args, flag) == value, flag
    assert "--no-bilevel" not in args
    # auto-resume: load from where it saves
    assert flag_value(args, "--load") == flag_value(args, "--save")
    assert flag_value(args, "--tensor-model-parallel-size") == "2"
    assert flag_value(args, "--context-parallel-size") == "1"
    assert flag_value(args, "--data-path").endswith("focusft-4096")
    assert flag_value(args, "--device") == "cuda"
    assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert exports["NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "NCCL_IB_TIMEOUT" in exports and "OMP_NUM_THREADS" in exports


def test_slurm_dry_run_uses_srun_and_rendezvous(fake_bin):
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]"}
    res = run(env, path_prefix=fake_bin)
    assert res.returncode == 0, res.stderr
    exports, argv = parse(res.stdout)
    assert argv[0] == "srun"
    t = argv.index("torchrun")
    srun, torchrun = argv[:t], argv[t:]
    assert flag_value(srun, "--nodes") == "2"
    assert flag_value(torchrun, "--nnodes") == "2"
    assert flag_value(torchrun, "--nproc-per-node") == "8"
    assert flag_value(torchrun, "--rdzv-backend") == "c10d"
    assert flag_value(torchrun, "--rdzv-endpoint") == "node-a:29500"
    assert flag_value(torchrun, "--rdzv-id") == "4242"
    assert "--standalone" not in torchrun
    assert exports["MASTER_ADDR"] == "node-a"
    assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    args = train_args(argv)
    for flag, value in RECIPE.items():
        assert flag in args and (value is None or flag_value(args, flag) == value), flag


def test_slurm_without_scontrol_needs_master_addr():
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    if shutil.which("scontrol", path="/usr/bin:/bin"):
        pytest.skip("a real scontrol is installed")
    res = run(env)
    assert res.returncode != 0
    assert "MASTER_ADDR" in res.stderr
    res = run({**env, "MASTER_ADDR": "head-node", "MASTER_PORT": "6000"})
    assert res.returncode == 0, res.stderr
    _, argv = parse(res.stdout)
    assert flag_value(argv, "--rdzv-endpoint") == "head-node:6000"


@pytest.mark.parametrize(
    "scale, nodes, seq, tp, cp, recompute",
    [("32k", "1", "32768", "4", "2", "selective"), ("128k", "4", "131072", "4", "8", "selective")],
)
def test_scale_presets(fake_bin, scale, nodes, seq, tp, cp, recompute):
    env = {"SCALE": scale, "SLURM_JOB_ID": "1", "SLURM_NNODES": nodes, "SLURM_JOB_NODELIST": "node-a"}
    res = run(env, path_prefix=fake_bin)
    assert res.returncode == 0, res.stderr
    args = train_args(parse(res.stdout)[1])
    assert flag_value(args, "--seq-length") == seq
    assert flag_value(args, "--tensor-model-parallel-size") == tp
    assert flag_value(args, "--context-parallel-size") == cp
    assert "--sequence-parallel" in args
    assert flag_value(args, "--recompute-granularity") == recompute
    assert flag_value(args, "--data-path").endswith(f"focusft-{seq}")
    assert flag_value(args, "--save").endswith(f"focusft-qwen7b-{scale}")
    assert flag_value(args, "--global-batch-size") == "32"


def test_bad_scale_and_bad_layout_fail_clearly():
    res = run({"SCALE": "64k"})
    assert res.returncode != 0
    assert "SCALE" in res.stderr and "64k" in res.stderr and "4k, 32k or 128k" in res.stderr
    assert "torchrun" not in res.stdout
    # 128K needs TP*CP = 32 GPUs: one node of 8 is refused
    res = run({"SCALE": "128k"})
    assert res.returncode != 0 and "TP*CP" in res.stderr
    res = run({"GLOBAL_BATCH": "30"})
    assert res.returncode != 0 and "GLOBAL_BATCH" in res.stderr
    res = run({"TP": "two"})
    assert res.returncode != 0 and "TP" in res.stderr


def test_overrides_and_options():
    env = {
        "TP": "1",
        "BILEVEL": "0",
        "TRAIN_ITERS": "10",
        "WANDB_PROJECT": "focusft",
        "EXPORT_HF": "/tmp/hf out",
        "EXTRA_ARGS": "--focusft-inner-grad-clip 1.0",
        "PRETRAINED": "/ckpt/qwen7b",
        "SAVE_DIR": "/runs/x",
    }
    res = run(env)
    assert res.returncode == 0, res.stderr
    args = train_args(parse(res.stdout)[1])
    assert "--no-bilevel" in args and "--bilevel" not in args
    assert "--sequence-parallel" not in args  # nothing to split at TP=1
    assert flag_value(args, "--train-iters") == "10" and "--epochs" not in args
    assert flag_value(args, "--wandb-project") == "focusft"
    assert flag_value(args, "--export-hf") == "/tmp/hf out"
    assert flag_value(args, "--pretrained-checkpoint") == "/ckpt/qwen7b"
    assert flag_value(args, "--load") == "/runs/x" == flag_value(args, "--save")
    assert args[-2:] == ["--focusft-inner-grad-clip", "1.0"]


def test_without_dry_run_missing_inputs_fail_before_launch(tmp_path):
    res = run({"PRETRAINED": str(tmp_path / "none"), "REPO_DIR": ROOT}, dry_run=False)
    assert res.returncode != 0
    assert "does not exist" in res.stderr or "train.py not found" in res.stderr
