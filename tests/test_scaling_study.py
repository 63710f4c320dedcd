"""examples/scaling_study.sh: the DRY_RUN grid (14 jobs: model x method, nodes per size, one budget), what the
run script makes of a job's environment, a submission through a fake sbatch, and one-line errors."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "scaling_study.sh"
RUN_SCRIPT = ROOT / "examples" / "run_focusft_qwen7b.sh"
NODES = {  # the script's documented table
    "qwen2.5-0.5b": 1,
    "qwen2.5-1.5b": 1,
    "qwen2.5-3b": 1,
    "qwen2.5-7b": 1,
    "qwen2.5-14b": 2,
    "qwen2.5-32b": 4,
    "qwen2.5-72b": 8,
}
# The caller's variables that would change the study's (or, through sbatch's exported environment, the run
# script's) choices.
STUDY_VARS = (
    "MODELS METHODS DATA_PATH CKPT_DIR STUDY_DIR TRAIN_ITERS GLOBAL_BATCH SEED NODES SBATCH_ARGS PYTHON DRY_RUN "
    "REPO_DIR MODEL BILEVEL PRETRAINED SAVE_DIR NNODES SCALE TP CP SP GPUS_PER_NODE MICRO_BATCH EPOCHS"
).split()


def run(env_extra: dict | None = None, path_prefix: Path | None = None, script: Path = SCRIPT, timeout: float = 30):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_")) and k not in STUDY_VARS}
    env["PATH"] = os.pathsep.join([str(path_prefix)] * (path_prefix is not None) + ["/usr/bin", "/bin"])
    env.update(env_extra or {})
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout)


def jobs(out: str) -> list[tuple[dict, list[str]]]:
    """(environment given, sbatch argv) of every printed ``env VAR=... sbatch ...`` line."""
    found = []
    for line in out.splitlines():
        if line.startswith("env "):
            words = shlex.split(line)[1:]
            i = words.index("sbatch")
            found.append((dict(w.split("=", 1) for w in words[:i]), words[i:]))
    return found


def option(argv: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return value


def test_bash_syntax_and_house_style():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert "${PYTHON:-python3}" in text


def test_dry_run_lists_every_model_and_method_with_one_budget(tmp_path):
    study = tmp_path / "study"
    res = run({"DRY_RUN": "1", "STUDY_DIR": str(study), "DATA_PATH": "/data/d", "CKPT_DIR": "/ck"})
    assert res.returncode == 0, res.stderr
    grid = jobs(res.stdout)
    assert len(grid) == 14
    assert {(env["MODEL"], env["BILEVEL"]) for env, _ in grid} == {(m, b) for m in NODES for b in ("0", "1")}
    for env, argv in grid:
        model, method = env["MODEL"], "sft" if env["BILEVEL"] == "0" else "focusft"
        assert option(argv, "--nodes") == env["NNODES"] == str(NODES[model]), (model, argv)
        assert env["SAVE_DIR"] == str(study / f"{model}-{method}")
        assert option(argv, "--output") == str(study / f"{model}-{method}" / "slurm-%j.log")
        assert env["PRETRAINED"] == f"/ck/{model}" and env["REPO_DIR"] == str(ROOT)
        budget = (env["DATA_PATH"], env["TRAIN_ITERS"], env["GLOBAL_BATCH"], env["SEED"])
        assert budget == ("/data/d", "500", "32", "1234")  # the same data, steps, batch and seed for every job
        assert "--export=ALL" in argv and argv[-1] == str(RUN_SCRIPT)
    assert len({option(argv, "--job-name") for _, argv in grid}) == 14
    collect = shlex.split(res.stdout.strip().splitlines()[-1])
    assert collect[:2] == ["python3", str(ROOT / "tools" / "collect_runs.py")]
    assert collect[2:16] == [env["SAVE_DIR"] for env, _ in grid]
    outputs = ["--csv", f"{study}/runs.csv", "--json", f"{study}/runs.json", "--plot", f"{study}/scaling.png"]
    assert collect[16:] == outputs
    assert not study.exists()  # a dry run creates nothing


def test_a_jobs_environment_makes_the_run_script_train_that_method(tmp_path):
    """Each job's variables, given to examples/run_focusft_qwen7b.sh (DRY_RUN, no SLURM): sft is --no-bilevel,
    focusft --bilevel, with the study's budget and folders, on the one layout the planner gives the model."""
    res = run({"DRY_RUN": "1", "MODELS": "qwen2.5-0.5b", "STUDY_DIR": str(tmp_path), "TRAIN_ITERS": "7"})
    grid = [env for env, _ in jobs(res.stdout)]

    def dry_run(env: dict) -> subprocess.CompletedProcess:
        return run({**env, "DRY_RUN": "1", "PYTHON": sys.executable}, script=RUN_SCRIPT, timeout=120)

    with ThreadPoolExecutor(len(grid)) as pool:  # each asks the planner (seconds of imports): side by side
        outs = list(pool.map(dry_run, grid))
    layouts = []
    for env, out in zip(grid, outs):
        assert out.returncode == 0, out.stderr
        argv = shlex.split(next(line for line in out.stdout.splitlines() if line.startswith("torchrun ")))
        assert ("--no-bilevel" if env["BILEVEL"] == "0" else "--bilevel") in argv
        assert "--bilevel" not in argv or "--no-bilevel" not in argv
        for flag, value in [("--save", env["SAVE_DIR"]), ("--train-iters", "7"), ("--seed", env["SEED"])]:
            assert argv[argv.index(flag) + 1] == value
        assert argv[argv.index("--pretrained-checkpoint") + 1] == env["PRETRAINED"]
        assert "from the planner" in out.stdout
        layouts.append([argv[argv.index(f) + 1] for f in argv if f.endswith("-parallel-size")])
    assert len(layouts) == 2 and layouts[0] == layouts[1]  # SFT and FocuSFT of one model: the same layout


def test_nodes_models_methods_and_sbatch_args_can_be_chosen():
    res = run(
        {
            "DRY_RUN": "1",
            "MODELS": "qwen2.5-7b qwen2.5-72b",
            "METHODS": "focusft",
            "NODES": "qwen2.5-72b=16",
            "SBATCH_ARGS": "--partition=gpu --account=lab",
        }
    )
    assert res.returncode == 0, res.stderr
    grid = jobs(res.stdout)
    assert [(env["MODEL"], env["BILEVEL"], option(argv, "--nodes")) for env, argv in grid] == [
        ("qwen2.5-7b", "1", "1"),
        ("qwen2.5-72b", "1", "16"),
    ]
    assert all(argv[-3:-1] == ["--partition=gpu", "--account=lab"] for _, argv in grid)


def _fake_sbatch(folder: Path) -> Path:
    """An ``sbatch`` that records what it was given (argv and the job's variables) and prints a job id."""
    folder.mkdir()
    fake = folder / "sbatch"
    fake.write_text('#!/bin/sh\necho "$MODEL $BILEVEL $SAVE_DIR $NNODES $*" >> "$SBATCH_RECORD"\necho "4242;cluster"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return folder


def test_submits_through_sbatch_with_the_jobs_variables(tmp_path):
    for m in ("qwen2.5-0.5b", "qwen2.5-14b"):
        (tmp_path / "ck" / m).mkdir(parents=True)
    (tmp_path / "d.idx").write_text("")
    record = tmp_path / "record.txt"
    env = {"MODELS": "qwen2.5-0.5b qwen2.5-14b", "CKPT_DIR": str(tmp_path / "ck"), "DATA_PATH": str(tmp_path / "d")}
    env.update(STUDY_DIR=str(tmp_path / "study"), SBATCH_RECORD=str(record))
    res = run(env, path_prefix=_fake_sbatch(tmp_path / "bin"))
    assert res.returncode == 0, res.stderr
    calls = [line.split() for line in record.read_text().splitlines()]
    assert [c[:4] for c in calls] == [
        ["qwen2.5-0.5b", "0", str(tmp_path / "study" / "qwen2.5-0.5b-sft"), "1"],
        ["qwen2.5-0.5b", "1", str(tmp_path / "study" / "qwen2.5-0.5b-focusft"), "1"],
        ["qwen2.5-14b", "0", str(tmp_path / "study" / "qwen2.5-14b-sft"), "2"],
        ["qwen2.5-14b", "1", str(tmp_path / "study" / "qwen2.5-14b-focusft"), "2"],
    ]
    assert all(Path(c[2]).is_dir() for c in calls)  # sbatch writes each log into its run folder
    assert "qwen2.5-14b-focusft: job 4242, 2 node(s)" in res.stdout


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MODELS": "qwen2.5-0.5b qwen2.5-9b"}, "unknown model 'qwen2.5-9b' in MODELS (known: qwen2.5-0.5b"),
        ({"METHODS": "sft lora"}, "unknown method 'lora' in METHODS"),
        ({"NODES": "qwen2.5-7b=two"}, "NODES: 'qwen2.5-7b=two': the node count must be a positive integer"),
        ({"NODES": "qwen2.5-9b=2"}, "NODES: 'qwen2.5-9b=2' is not <known model>=<nodes>"),
        ({"TRAIN_ITERS": "0"}, "TRAIN_ITERS='0' must be a positive integer"),
    ],
)
def test_bad_settings_are_one_line_errors(env, message):
    res = run({"DRY_RUN": "1", **env})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(f"scaling_study.sh: error: {message}") and res.stderr.count("\n") == 1


def test_a_missing_checkpoint_stops_before_any_job_is_submitted(tmp_path):
    (tmp_path / "ck" / "qwen2.5-0.5b").mkdir(parents=True)
    (tmp_path / "d.idx").write_text("")
    record = tmp_path / "record.txt"
    env = {"MODELS": "qwen2.5-0.5b qwen2.5-3b", "CKPT_DIR": str(tmp_path / "ck"), "DATA_PATH": str(tmp_path / "d")}
    env.update(STUDY_DIR=str(tmp_path / "study"), SBATCH_RECORD=str(record))
    res = run(env, path_prefix=_fake_sbatch(tmp_path / "bin"))
    assert res.returncode == 2 and f"{tmp_path}/ck/qwen2.5-3b does not exist" in res.stderr
    assert not record.exists() and not (tmp_path / "study").exists()
