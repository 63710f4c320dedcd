"""examples/run_focusft_qwen7b.sh: syntax, the DRY_RUN command line (recipe, SLURM launch, SCALE), and the
pre-emption path (SIGUSR1 to the batch shell -> srun -> every worker -> save, exit 0 -> requeue) with a fake
srun/scontrol and a stand-in tools/train.py."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

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
    "MODEL LAYOUT GPU_MEMORY_GIB PP FIRST_STAGE_LAYERS LAST_STAGE_LAYERS "
    "SCALE PRETRAINED DATA_PATH SAVE_DIR TP CP SP RECOMPUTE SEQ_LENGTH MICRO_BATCH GLOBAL_BATCH NNODES "
    "GPUS_PER_NODE MASTER_ADDR MASTER_PORT LR MIN_LR EPOCHS TRAIN_ITERS SEED BILEVEL ATTENTION_BACKEND "
    "SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL TENSORBOARD_DIR WANDB_PROJECT EXPORT_HF EXTRA_ARGS DRY_RUN "
    "REPO_DIR OMP_NUM_THREADS NCCL_IB_TIMEOUT NCCL_DEBUG PYTORCH_CUDA_ALLOC_CONF REQUEUE CPUS_PER_TASK "
    "SHUTDOWN_TIMEOUT TORCHRUN_SIGNAL_FLAGS PYTHON RANK WORLD_SIZE LOCAL_RANK"
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


def run(env_extra: dict | None = None, path_prefix=None, dry_run=True, timeout: float = 30):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    env["PATH"] = os.pathsep.join(
        [str(path_prefix)] * (path_prefix is not None) + ["/usr/bin", "/bin", env.get("PATH", "")]
    )
    if dry_run:
        env["DRY_RUN"] = "1"
    env.update(env_extra or {})
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=timeout)


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
        "--ntasks-per-node=8",  # one task per GPU: SLURM's signals reach the workers themselves
        "--exclusive",
        "--time=",
        "--output=",
        "--job-name=",
        "--requeue",
        "--open-mode=append",  # a requeued job keeps the same %j: append to its log
    ):
        assert f"#SBATCH {line}" in text


def test_sbatch_asks_for_a_warning_signal_with_lead_time():
    with open(SCRIPT) as f:
        lines = [line.split() for line in f if line.startswith("#SBATCH --signal=")]
    assert len(lines) == 1, lines
    assert len(lines[0]) == 2, "sbatch takes no comment after a directive's value"
    value = lines[0][1][len("--signal=") :]
    # B: the batch shell gets it (it forwards it and requeues); USR1 (SIGTERM is KillWait-limited)
    sig, _, lead = value.partition("@")
    assert sig == "B:USR1", value
    assert int(lead) >= 300, "too little time to finish a step and write a 7B checkpoint with optimizer state"


def test_local_dry_run_carries_the_recipe():
    res = run()
    assert res.returncode == 0, res.stderr
    exports, argv = parse(res.stdout)
    assert argv[:2] == ["torchrun", "--standalone"]
    assert flag_value(argv, "--nproc-per-node") == "8"
    # torchrun forwards SIGUSR1 too (not by default) and gives the workers time to save before SIGKILL
    launcher = argv[: next(k for k, a in enumerate(argv) if a.endswith("tools/train.py"))]
    assert "SIGUSR1" in flag_value(launcher, "--signals-to-handle").split(",")
    assert "SIGTERM" in flag_value(launcher, "--signals-to-handle").split(",")
    assert int(flag_value(launcher, "--shutdown-timeout")) >= 600
    args = train_args(argv)
    for flag, value in RECIPE.items():
        if value is None:
            assert flag in args, flag
        else:
            assert flag_value(args, flag) == value, flag
    assert "--no-bilevel" not in args
    assert not any(a.startswith("--decoder-") for a in args)  # no pipeline split at PP=1
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


def slurm_launch(argv: list[str]):
    """(srun options, per-task command before train.py) of the SLURM launch line."""
    assert argv[0] == "srun"
    b = argv.index("bash")
    t = next(k for k, a in enumerate(argv) if a.endswith("tools/train.py"))
    return argv[:b], argv[b:t]


def test_slurm_dry_run_runs_one_task_per_gpu(fake_bin):
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_ON_NODE": "96"}
    res = run(env, path_prefix=fake_bin)
    assert res.returncode == 0, res.stderr
    exports, argv = parse(res.stdout)
    srun, task = slurm_launch(argv)
    # no torchrun between srun and the workers: it would die of SIGUSR1 / SIGKILL them after 30 s
    assert "torchrun" not in argv
    assert flag_value(srun, "--nodes") == "2"
    assert flag_value(srun, "--ntasks") == "16"  # explicit: sbatch's SLURM_NTASKS would override it
    assert flag_value(srun, "--ntasks-per-node") == "8"
    assert flag_value(srun, "--cpus-per-task") == "12"
    assert "--kill-on-bad-exit=1" in srun
    assert task[:2] == ["bash", "-c"] and task[-1] == "-u"
    wrapper = task[2]
    for var, slurm in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"), ("LOCAL_RANK", "SLURM_LOCALID")):
        assert f"{var}=${slurm}" in wrapper
    assert 'exec "$@"' in wrapper  # the worker replaces the shell: it is the task SLURM signals
    assert exports["MASTER_ADDR"] == "node-a" and exports["MASTER_PORT"] == "29500"
    assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "pre-emption: SIGUSR1" in res.stdout
    args = train_args(argv)
    for flag, value in RECIPE.items():
        assert flag in args and (value is None or flag_value(args, flag) == value), flag


def test_slurm_task_wrapper_gives_the_torchrun_environment(fake_bin):
    res = run({"SLURM_JOB_ID": "1", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node-a"}, path_prefix=fake_bin)
    _, task = slurm_launch(parse(res.stdout)[1])
    code = "import os; print(*(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')))"
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update(SLURM_PROCID="11", SLURM_NTASKS="16", SLURM_LOCALID="3")
    out = subprocess.run([*task[:-2], sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["11", "16", "3"]


def test_local_dry_run_without_torchrun_signal_flags():
    res = run({"TORCHRUN_SIGNAL_FLAGS": "0"})
    assert res.returncode == 0, res.stderr
    argv = parse(res.stdout)[1]
    assert "--signals-to-handle" not in argv and "--shutdown-timeout" not in argv
    assert run({"REQUEUE": "yes"}).returncode != 0


def test_slurm_without_scontrol_needs_master_addr():
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    if shutil.which("scontrol", path="/usr/bin:/bin"):
        pytest.skip("a real scontrol is installed")
    res = run(env)
    assert res.returncode != 0
    assert "MASTER_ADDR" in res.stderr
    res = run({**env, "MASTER_ADDR": "head-node", "MASTER_PORT": "6000"})
    assert res.returncode == 0, res.stderr
    exports, _ = parse(res.stdout)
    assert exports["MASTER_ADDR"] == "head-node" and exports["MASTER_PORT"] == "6000"


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
    assert flag_value(args, "--pipeline-model-parallel-size") == "1"
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


# --------------------------------------------------------------------------------------------- MODEL, PP, planner
def header(out: str) -> str:
    """The run script's layout line, as megatron_focusft/analysis/runs.py finds it (the only such line)."""
    lines = [line for line in out.splitlines() if line.startswith("# ") and "TP=" in line and "DP=" in line]
    assert len(lines) == 1, out
    return lines[0]


def layout_from(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("# layout of "))


def test_qwen7b_defaults_are_the_preset_without_the_planner():
    res = run({"PYTHON": "/bin/false"})  # the planner would fail: it is not asked
    assert res.returncode == 0, res.stderr
    assert run({"MODEL": "qwen2.5-7b", "PYTHON": "/bin/false"}).stdout == res.stdout
    args = train_args(parse(res.stdout)[1])
    assert [flag_value(args, f"--{k}-parallel-size") for k in ("tensor-model", "context", "pipeline-model")] == [
        "2",
        "1",
        "1",
    ]
    assert "--sequence-parallel" in args and "--recompute-granularity" not in args
    assert flag_value(args, "--pretrained-checkpoint").endswith("checkpoints/qwen2.5-7b-megatron")
    assert flag_value(args, "--save").endswith("runs/focusft-qwen7b-4k")
    assert header(res.stdout).startswith("# FocuSFT Qwen2.5-7B: SCALE=4k ")
    assert " TP=2 PP=1 CP=1 SP=1 DP=4 " in header(res.stdout)
    assert "from the qwen2.5-7b SCALE 4k preset" in layout_from(res.stdout) and "planner" not in res.stdout


TEE_PYTHON = """#!/bin/sh
# $PYTHON stand-in: runs the real interpreter, keeping its arguments and what it printed
echo "$@" > "$COPY_ARGS"
"$REAL_PYTHON" "$@" > "$COPY_OUT"
rc=$?
cat "$COPY_OUT"
exit $rc
"""


def test_qwen72b_on_4_nodes_takes_the_planners_layout(fake_bin, tmp_path):
    python, copy_args, copy_out = tmp_path / "python", tmp_path / "args", tmp_path / "out"
    python.write_text(TEE_PYTHON)
    python.chmod(0o755)
    env = {"MODEL": "qwen2.5-72b", "SLURM_JOB_ID": "1", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "node-[a-d]"}
    env.update(PYTHON=str(python), REAL_PYTHON=sys.executable, COPY_ARGS=str(copy_args), COPY_OUT=str(copy_out))
    res = run(env, path_prefix=fake_bin, timeout=120)  # the one planner call of this file (seconds of imports)
    assert res.returncode == 0, res.stderr
    # what tools/memory_plan.py --shell printed, for the layout the README documents
    plan_args = copy_args.read_text().split()
    assert plan_args[0] == os.path.join(ROOT, "tools", "memory_plan.py") and plan_args[1] == "--shell"
    for flag, value in (("--num-gpus", "32"), ("--preset", "qwen2.5-72b"), ("--seq-length", "4096")):
        assert flag_value(plan_args, flag) == value
    planned = dict(kv.split("=") for kv in copy_out.read_text().split())
    assert int(planned["PP"]) > 1, planned  # 72B does not fit 32 GPUs without pipeline parallelism
    argv = parse(res.stdout)[1]
    assert flag_value(slurm_launch(argv)[0], "--ntasks") == "32"
    args = train_args(argv)
    assert flag_value(args, "--tensor-model-parallel-size") == planned["TP"]
    assert flag_value(args, "--pipeline-model-parallel-size") == planned["PP"]
    assert flag_value(args, "--context-parallel-size") == planned["CP"]
    for end in ("FIRST", "LAST"):
        flag = f"--decoder-{end.lower()}-pipeline-num-layers"
        if planned[f"{end}_STAGE_LAYERS"]:
            assert flag_value(args, flag) == planned[f"{end}_STAGE_LAYERS"]
        else:
            assert flag not in args
    assert ("--sequence-parallel" in args) == (planned["SP"] == "1")
    if planned["RECOMPUTE"] == "none":
        assert "--recompute-granularity" not in args
    else:
        assert flag_value(args, "--recompute-granularity") == planned["RECOMPUTE"]
    assert flag_value(args, "--pretrained-checkpoint").endswith("checkpoints/qwen2.5-72b-megatron")
    assert flag_value(args, "--save").endswith("runs/focusft-qwen72b-4k")
    line = header(res.stdout)
    assert line.startswith("# FocuSFT Qwen2.5-72B: ")
    sizes = " ".join(f"{k}={planned[k]}" for k in ("TP", "PP", "CP", "DP"))
    # tools/collect_runs.py's layout: the TP/PP/CP/DP sizes of this line (megatron_focusft/analysis/runs.py)
    assert " ".join(re.findall(r"\b(?:TP|PP|CP|DP)=\d+\b", line)) == sizes
    where = layout_from(res.stdout)
    assert "TP PP CP SP RECOMPUTE FIRST_STAGE_LAYERS LAST_STAGE_LAYERS from the planner (" in where
    assert "memory_plan.py --shell --num-gpus 32 --preset qwen2.5-72b --seq-length 4096" in where


FAKE_PLANNER = """#!/bin/sh
# tools/memory_plan.py --shell stand-in (as $PYTHON): records its arguments, prints $FAKE_PLAN or fails
echo "$@" >> "$FAKE_PLAN_ARGS"
case "$1" in */tools/memory_plan.py) ;; *) echo "not the planner: $1" >&2; exit 9 ;; esac
if [ -n "$FAKE_PLAN_ERROR" ]; then echo "some warning" >&2; echo "error: $FAKE_PLAN_ERROR" >&2; exit 1; fi
echo "$FAKE_PLAN"
"""


@pytest.fixture
def fake_planner(tmp_path):
    """env for run(): PYTHON is a fake planner printing TP=8 PP=2 CP=2 ... FIRST_STAGE_LAYERS=50; (env, args file)."""
    planner, record = tmp_path / "fake-python", tmp_path / "plan-args"
    planner.write_text(FAKE_PLANNER)
    planner.chmod(0o755)
    plan = "TP=8 PP=2 CP=2 DP=1 SP=1 RECOMPUTE=selective FIRST_STAGE_LAYERS=50 LAST_STAGE_LAYERS="
    env = {"PYTHON": str(planner), "FAKE_PLAN_ARGS": str(record), "FAKE_PLAN": plan, "FAKE_PLAN_ERROR": ""}
    env.update(MODEL="qwen2.5-72b", GPUS_PER_NODE="32")  # 32 GPUs on one (local) node: no SLURM needed
    return env, record


def test_the_users_layout_variables_win_over_the_planners(fake_planner):
    env, record = fake_planner
    res = run({**env, "TP": "4", "BILEVEL": "0"})
    assert res.returncode == 0, res.stderr
    planner_args = record.read_text().split()
    assert "--bilevel" in planner_args  # planned for FocuSFT even for the SFT baseline: both get one layout
    for flag, value in (("--num-gpus", "32"), ("--preset", "qwen2.5-72b"), ("--seq-length", "4096")):
        assert flag_value(planner_args, flag) == value
    assert flag_value(planner_args, "--global-batch-size") == "32"
    args = train_args(parse(res.stdout)[1])
    assert flag_value(args, "--tensor-model-parallel-size") == "4"  # the user's
    assert flag_value(args, "--pipeline-model-parallel-size") == "2"  # the rest: the planner's
    assert flag_value(args, "--context-parallel-size") == "2"
    assert flag_value(args, "--decoder-first-pipeline-num-layers") == "50"
    assert "--decoder-last-pipeline-num-layers" not in args
    assert flag_value(args, "--recompute-granularity") == "selective"
    assert " TP=4 PP=2 CP=2 SP=1 DP=2 first_stage_layers=50 last_stage_layers=even " in header(res.stdout)
    assert layout_from(res.stdout).endswith("; TP from the user (the planner's: TP 8)")
    # another PP drops the planner's split (made for its PP); an empty split variable is the user's even split
    res = run({**env, "PP": "4", "CP": "1", "LAST_STAGE_LAYERS": "30"})
    args = train_args(parse(res.stdout)[1])
    assert flag_value(args, "--pipeline-model-parallel-size") == "4"
    assert "--decoder-first-pipeline-num-layers" not in args
    assert flag_value(args, "--decoder-last-pipeline-num-layers") == "30"
    res = run({**env, "PP": "2"})  # the planner's PP: its split stays
    assert flag_value(train_args(parse(res.stdout)[1]), "--decoder-first-pipeline-num-layers") == "50"
    res = run({**env, "FIRST_STAGE_LAYERS": ""})
    assert "--decoder-first-pipeline-num-layers" not in train_args(parse(res.stdout)[1])
    assert "FIRST_STAGE_LAYERS from the user (the planner's: FIRST_STAGE_LAYERS 50)" in layout_from(res.stdout)
    # the whole layout given: the planner is not asked; qwen2.5-7b with LAYOUT=auto asks it
    record.unlink()
    res = run({**env, "TP": "8", "PP": "4", "CP": "1", "RECOMPUTE": "none"})
    assert res.returncode == 0 and not record.exists(), res.stderr
    plan = "TP=2 PP=4 CP=1 DP=1 SP=1 RECOMPUTE=none FIRST_STAGE_LAYERS= LAST_STAGE_LAYERS="
    res = run({**env, "MODEL": "qwen2.5-7b", "LAYOUT": "auto", "GPUS_PER_NODE": "8", "FAKE_PLAN": plan})
    assert res.returncode == 0, res.stderr
    assert flag_value(record.read_text().split(), "--preset") == "qwen2.5-7b"
    assert flag_value(train_args(parse(res.stdout)[1]), "--pipeline-model-parallel-size") == "4"


def test_no_layout_from_the_planner_fails_in_one_line(fake_planner):
    env, _ = fake_planner
    res = run({**env, "FAKE_PLAN_ERROR": "no layout of 32 GPUs fits qwen2.5-72b at S=4096 in 80 GiB"})
    assert res.returncode == 2 and "torchrun" not in res.stdout
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert "no layout of 32 GPUs fits" in res.stderr and "use more nodes" in res.stderr
    res = run({**env, "FAKE_PLAN": "TP=8; rm -rf /"})  # never evaluated
    assert res.returncode == 2 and "unexpected planner output" in res.stderr
    assert run({**env, "MODEL": "qwen2.5-7b", "LAYOUT": "preset", "PYTHON": "/bin/false"}).returncode == 0
    res = run({**env, "LAYOUT": "preset"})
    assert res.returncode == 2 and "only MODEL=qwen2.5-7b has preset layouts" in res.stderr


def test_unknown_model_and_indivisible_pipeline_layouts_fail_in_one_line():
    res = run({"MODEL": "qwen2.5-9b", "PYTHON": "/bin/false"})
    assert res.returncode == 2 and "torchrun" not in res.stdout
    assert res.stderr.count("\n") == 1 and "unknown MODEL='qwen2.5-9b'" in res.stderr
    for size in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b"):
        assert f"qwen2.5-{size}" in res.stderr
    res = run({"PP": "3"})  # TP*CP*PP = 2*1*3 does not divide 8 GPUs
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "TP*CP*PP = 2*1*3 = 6" in res.stderr and "8 GPUs" in res.stderr
    res = run({"PP": "2", "TP": "8"})
    assert res.returncode == 2 and "TP*CP*PP = 8*1*2 = 16" in res.stderr
    res = run({"FIRST_STAGE_LAYERS": "10"})  # a split without pipeline stages
    assert res.returncode == 2 and "FIRST_STAGE_LAYERS=10 needs pipeline parallelism" in res.stderr
    res = run({"PP": "0"})
    assert res.returncode == 2 and "PP='0' must be a positive integer" in res.stderr


def test_without_dry_run_missing_inputs_fail_before_launch(tmp_path):
    res = run({"PRETRAINED": str(tmp_path / "none"), "REPO_DIR": ROOT}, dry_run=False)
    assert res.returncode != 0
    assert "does not exist" in res.stderr or "train.py not found" in res.stderr


# --------------------------------------------------------------------------------------------- pre-emption path
FAKE_SRUN = """#!{python}
# srun stand-in: --ntasks copies of the command with SLURM_PROCID/LOCALID/NTASKS; forwards USR1/TERM like srun.
import os, signal, subprocess, sys
argv, opts = sys.argv[1:], {{}}
while argv[0].startswith("--"):
    if "=" in argv[0]:
        argv = argv[1:]
    else:
        opts[argv[0]], argv = argv[1], argv[2:]
n, per = int(opts["--ntasks"]), int(opts["--ntasks-per-node"])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("srun " + " ".join(sys.argv[1:]) + "\\n")
procs = [
    subprocess.Popen(argv, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per),
                                 "SLURM_NTASKS": str(n)}})
    for i in range(n)
]
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, _f: [p.send_signal(s) for p in procs if p.poll() is None])
sys.exit(max(abs(p.wait()) for p in procs))
"""

FAKE_SCONTROL = """#!/bin/sh
if [ "$1 $2" = "show hostnames" ]; then echo node-a; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""

# tools/train.py stand-in: records its rank environment, waits for a signal, "saves" and exits
FAKE_TRAIN = """import os, signal, sys, time
save = sys.argv[sys.argv.index("--save") + 1]
rank = os.environ["RANK"]
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, _f: got.append(signal.Signals(s).name))
env = " ".join(os.environ.get(k, "-") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
with open(os.path.join(save, "ready_" + rank), "w") as f:
    f.write(env)
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
if not got or os.environ.get("FAKE_FAIL_RANK") == rank:
    sys.exit(3)
with open(os.path.join(save, "saved_" + rank), "w") as f:
    f.write(got[0])
"""


@pytest.fixture
def fake_cluster(tmp_path):
    """(env, repo, save dir, log) for running the script for real on fake srun/scontrol and a fake train.py."""
    bin_dir, repo = tmp_path / "bin", tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (repo / "tools" / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "data.idx").write_text("")
    save, log = tmp_path / "save", tmp_path / "fake.log"
    env = {
        "SLURM_JOB_ID": "777",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node-a",
        "REPO_DIR": str(repo),
        "PRETRAINED": str(tmp_path / "pretrained"),
        "DATA_PATH": str(tmp_path / "data"),
        "SAVE_DIR": str(save),
        "GPUS_PER_NODE": "2",
        "GLOBAL_BATCH": "2",
        "PYTHON": sys.executable,
        "FAKE_LOG": str(log),
    }
    return env, save, log, bin_dir


def launch_and_signal(env: dict, save, bin_dir, sig) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    base["PATH"] = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin", base.get("PATH", "")])
    proc = subprocess.Popen(
        ["bash", SCRIPT], env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 30
    while len(list(save.glob("ready_*"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)  # what SLURM does with --signal=B:USR1@600: the batch shell only
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_sigusr1_reaches_every_worker_which_saves_then_the_job_is_requeued(fake_cluster):
    env, save, log, bin_dir = fake_cluster
    rc, out = launch_and_signal(env, save, bin_dir, signal.SIGUSR1)
    assert rc == 0, out
    for rank in ("0", "1"):
        assert (save / f"ready_{rank}").read_text() == f"{rank} 2 {rank} node-a 29500", out
        assert (save / f"saved_{rank}").read_text() == "SIGUSR1", out
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun ") and "--ntasks 2" in calls[0]
    assert calls[1:] == ["scontrol requeue 777"], out


def test_sigterm_saves_without_requeue_and_requeue_can_be_turned_off(fake_cluster):
    env, save, log, bin_dir = fake_cluster
    rc, out = launch_and_signal(env, save, bin_dir, signal.SIGTERM)
    assert rc == 0, out
    assert all((save / f"saved_{r}").read_text() == "SIGTERM" for r in "01"), out
    assert "requeue" not in log.read_text()
    for f in save.iterdir():
        f.unlink()
    rc, out = launch_and_signal({**env, "REQUEUE": "0"}, save, bin_dir, signal.SIGUSR1)
    assert rc == 0 and (save / "saved_1").is_file(), out
    assert "requeue" not in log.read_text()


def test_a_failed_step_is_not_requeued(fake_cluster):
    env, save, log, bin_dir = fake_cluster
    rc, out = launch_and_signal({**env, "FAKE_FAIL_RANK": "1"}, save, bin_dir, signal.SIGUSR1)
    assert rc == 3, out
    assert "requeue" not in log.read_text()
