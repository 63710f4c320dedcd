"""Pre-emption as schedulers do it: SIGTERM to the whole process group of a real launch (torchrun's, and the
SLURM script's one-task-per-GPU form), one save folder per run, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_focusft import runtime

ROOT = Path(__file__).resolve().parents[1]


def _train_argv(ckpt: Path, data: str, save: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "tools" / "train.py"),
        *("--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu"),
        *("--focusft-lora-rank", "8", "--global-batch-size", "2", "--train-iters", "100000"),
        *("--save", str(save), "--log-interval", "1", "--no-progress", *extra),
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return env


def _read_until(proc: subprocess.Popen, prefix: str, seconds: float = 180) -> list[str]:
    lines, deadline = [], time.time() + seconds
    for line in proc.stdout:
        lines.append(line)
        if f"] {prefix}" in line or time.time() > deadline:  # the trainer's lines start with the time
            break
    return lines


def _group_gone(pgid: int, seconds: float = 30) -> bool:
    """Whether every process of group ``pgid`` has exited (checkpoint writers and their helpers too)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _assert_saved_at_stop(save: Path, output: str, at_least: int) -> None:
    """The workers' output (torchrun prefixes its workers' error lines with ``[rankN]:``; its own traceback
    on a signal is how it reports being stopped) shows a clean stop and save."""
    from megatron_focusft.convert.megatron_io import CheckpointMeta, resolve_checkpoint

    worker_errors = [line for line in output.splitlines() if line.startswith("[rank") or "Error" in line]
    assert not [line for line in worker_errors if "Traceback" in line or "Error" in line], output
    assert "stopped by a signal" in output and "checkpoint saved" in output, output
    found = resolve_checkpoint(save)
    assert CheckpointMeta.read(found).iteration >= at_least, output
    assert sorted(p.name for p in (found / "rank_state").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def test_sigterm_to_a_torchrun_process_group_saves_at_the_stop(setup_files, tmp_path):
    """What a scheduler does on pre-emption: SIGTERM to every process of the job at once -- torchrun, both
    workers and the processes Megatron's checkpoint writer starts.  The workers finish the iteration, save it
    and exit 0; no process of the group is left."""
    ckpt, data = setup_files
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    cmd += [str(runtime._free_port()), "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    cmd += ["--shutdown-timeout", "120", *_train_argv(ckpt, data, save, "--save-interval", "1")]
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        # After the first periodic save, Megatron's writer has started its helper processes in the group.
        lines = _read_until(proc, "step 3/")
        os.killpg(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    _assert_saved_at_stop(save, output, at_least=3)
    assert _group_gone(proc.pid), "a process of the launch outlived it"


def _slurm_task_wrapper() -> list[str]:
    """The per-task command prefix ``examples/run_focusft_qwen7b.sh`` gives srun (``bash -c WRAPPER NAME``: it
    derives RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and execs the worker)."""
    import shlex

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="1", SLURM_NNODES="1", MASTER_ADDR="127.0.0.1", DRY_RUN="1", PYTHON=sys.executable)
    env.update(GPUS_PER_NODE="2", GLOBAL_BATCH="2", TP="1")
    dry = subprocess.run(
        ["bash", str(ROOT / "examples" / "run_focusft_qwen7b.sh")], env=env, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    argv = shlex.split(next(line for line in dry.stdout.splitlines() if line.startswith("srun ")))
    return argv[argv.index("bash") : argv.index("-u") - 1]


def test_sigterm_to_the_slurm_launch_group_saves_at_the_stop(setup_files, tmp_path):
    """The SLURM script's form: one worker per task through the script's own task wrapper (no torchrun), all
    in the job step's process group, which ``scancel`` and the time limit signal at once."""
    ckpt, data = setup_files
    save = tmp_path / "ckpt"
    task = _slurm_task_wrapper()
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(runtime._free_port()), "SLURM_NTASKS": "2"}
    argv = _train_argv(ckpt, data, save, "--save-interval", "1")
    procs = []
    for rank in range(2):
        group = 0 if rank == 0 else procs[0].pid  # task 0 leads a new group; task 1 joins it
        procs.append(
            subprocess.Popen(
                [*task, sys.executable, "-u", *argv],
                env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                process_group=group,
            )
        )
    pgid = procs[0].pid
    try:
        lines = _read_until(procs[0], "step 3/")
        os.killpg(pgid, signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "".join(lines) + "\n".join(outs)
    _assert_saved_at_stop(save, "".join(lines) + outs[0], at_least=3)
    assert _group_gone(pgid), "a process of the launch outlived it"


def test_a_killed_rank_leaves_no_checkpoint_writer_process_behind(setup_files, tmp_path):
    """``kill -9`` of a worker (OOM killer, a node's watchdog): the helper process of its checkpoint writer
    dies with it instead of living on as an orphan."""
    import psutil

    ckpt, data = setup_files
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(runtime._free_port()), "WORLD_SIZE": "2"}
    argv = _train_argv(ckpt, data, tmp_path / "ckpt", "--save-interval", "1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", *argv],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(2)
    ]
    try:
        _read_until(procs[0], "step 2/")
        helpers = psutil.Process(procs[1].pid).children(recursive=True)
        assert helpers, "the worker started no writer helper (nothing to check)"
        procs[1].kill()
        procs[1].wait(timeout=30)
        _, alive = psutil.wait_procs(helpers, timeout=30)
        assert not alive, f"orphaned writer processes: {[p.pid for p in alive]}"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    assert _group_gone(procs[0].pid) and _group_gone(procs[1].pid)


def _single(argv: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-u", *argv], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def test_one_run_per_save_folder(setup_files, tmp_path):
    """A second run on a save folder in use exits at once (2) naming the folder and the holder; once the
    holder is dead (even by kill -9) the folder is free again."""
    ckpt, data = setup_files
    save = tmp_path / "ckpt"
    first = _single(_train_argv(ckpt, data, save))
    try:
        _read_until(first, "step 1/")
        started = time.time()
        status, out = _run_to_end(_train_argv(ckpt, data, save, "--train-iters", "1"))
        assert status == 2, out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"--save {save} is in use by another run (pid {first.pid} on " in errors[0]
        assert time.time() - started < 60
    finally:
        first.kill()
        first.wait(timeout=30)
    status, out = _run_to_end(_train_argv(ckpt, data, save, "--train-iters", "1"))
    assert status == 0, out


def _run_to_end(argv: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, *argv], env=_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _saved_iterations(save: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in save.glob("iter_*"))


def test_a_run_that_blows_up_stops_and_saves_nothing_after_the_last_good_step(setup_files, tmp_path):
    """Weights pushed to inf (SGD at lr 1e30): every later loss and gradient norm is NaN, the optimizer skips
    the updates, and three such steps in a row stop the run (exit 1) without a checkpoint after the last good
    one."""
    ckpt, data = setup_files
    save = tmp_path / "ckpt"
    lr = ["--optimizer", "sgd", "--lr", "1e30", "--lr-warmup-fraction", "0", "--lr-decay-style", "constant"]
    status, out = _run_to_end(_train_argv(ckpt, data, save, "--train-iters", "40", "--clip-grad", "0", *lr))
    assert status == 1, out
    assert "3 steps in a row, training stopped" in out and "non-finite loss" in out, out
    assert _saved_iterations(save) == [], out  # no periodic save: nothing at all was written
    stopped = int(out.split("non-finite loss")[-2].rsplit("iteration ", 1)[1].split(":")[0])
    assert stopped < 40


def test_loss_spikes_are_reported_and_stop_the_run_with_the_flag(setup_files, tmp_path):
    """Adam at lr 1e3 (the issue's run): the loss jumps far above its running mean and the model collapses.
    Reported in the log; with --check-for-spiky-loss the run stops there (exit 1), the periodic checkpoints
    before the spike kept and none written after."""
    ckpt, data = setup_files
    lr = ["--lr", "1e3", "--lr-warmup-fraction", "0", "--lr-decay-style", "constant", "--train-iters", "6"]
    status, out = _run_to_end(_train_argv(ckpt, data, tmp_path / "warned", *lr))
    assert status == 0 and "warning: loss spike at iteration 2" in out and "warning: zero gradient norm" in out, out
    save = tmp_path / "stopped"
    status, out = _run_to_end(_train_argv(ckpt, data, save, *lr, "--save-interval", "1", "--check-for-spiky-loss"))
    assert status == 1 and "training stopped (--check-for-spiky-loss)" in out, out
    stopped = int(out.split("error: ")[-1].split("iteration ")[1].split()[0].rstrip(":"))
    assert _saved_iterations(save) and max(_saved_iterations(save)) < stopped, out
