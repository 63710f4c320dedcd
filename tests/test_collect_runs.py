"""tools/collect_runs.py on two real tiny CPU runs of tools/train.py (standard SFT, and FocuSFT stopped early
with an evaluation file): every number in the table is what the run's files hold, nothing is made up."""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_focusft.analysis import evaluate as ev
from megatron_focusft.analysis import runs
from megatron_focusft.run_record import METRICS_FILE, read_metrics
from megatron_focusft.training import loop
from tests.training_fixtures import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 1
LOGS = {"sft": "train.log", "focusft": "slurm-7.log"}  # each run's console log
# the evaluation file of the FocuSFT run: babilong_qa1 at 1024 tokens 50%, ruler_vt 100%: mean 75% over 2 cells
EVAL_RESULTS = [
    {"task": "babilong_qa1", "length": 1024, "score": 1.0, "dtype": "float32"},
    {"task": "babilong_qa1", "length": 1024, "score": 0.0, "dtype": "float32"},
    {"task": "ruler_vt", "length": 1024, "score": 1.0, "dtype": "float32"},
]


def _train(argv: list[str], log: Path) -> None:
    """``tools/train.py argv`` in this process (its imports are paid already), its stdout appended to ``log``
    as a job's output file holds it; the trainer's stop-signal handlers are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with open(log, "a") as f, contextlib.redirect_stdout(f):
            assert loop.main(argv) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _layout_line() -> str:
    """The layout line examples/run_focusft_qwen7b.sh starts a job's log with, for one process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", GPUS_PER_NODE="1", NNODES="1", TP="1", CP="1", GLOBAL_BATCH="2", MICRO_BATCH="1")
    script = ROOT / "examples" / "run_focusft_qwen7b.sh"
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("# ") and "TP=" in line)


@pytest.fixture(scope="module")
def study(setup_files, tmp_path_factory):
    """``sft/``: --no-bilevel, 3 of 3 steps, validation at the end, a plain train.py log.  ``focusft/``: 3 of 4
    steps (--exit-interval), no validation, a log as the run script writes it, an eval.json."""
    ckpt, data = setup_files
    root = tmp_path_factory.mktemp("study")
    valid = tiny_dataset(root / "valid", num_docs=8, seed=3)
    common = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--no-progress"]
    common += ["--focusft-lora-rank", "8", "--log-interval", "1", "--global-batch-size", "2"]
    for name in ("sft", "focusft"):
        (root / name).mkdir()
    _train(
        [*common, "--no-bilevel", "--train-iters", "3", "--valid-data-path", valid]
        + ["--save", str(root / "sft"), "--tensorboard-dir", str(root / "sft" / "tensorboard")],
        root / "sft" / LOGS["sft"],
    )
    log = root / "focusft" / LOGS["focusft"]
    log.write_text(_layout_line() + "\n")
    _train(
        [*common, "--bilevel", "--train-iters", "4", "--exit-interval", "3"]
        + ["--save", str(root / "focusft"), "--tensorboard-dir", str(root / "focusft" / "tensorboard")],
        log,
    )
    doc = ev.results_document(str(root / "focusft"), 0, 2, EVAL_RESULTS)
    (root / "focusft" / runs.EVAL_FILE).write_text(json.dumps(doc))
    return root


def _scalars(run: Path) -> dict[str, list]:
    """TensorBoard's own reader: tag -> [(wall_time, step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _logged(log: Path, field: str) -> dict[int, float]:
    """``field``'s value on each ``step i/N | ...`` line of a console log."""
    out = {}
    for line in log.read_text().splitlines():
        line = line.split("] ", 1)[-1]  # after the timestamp
        if line.startswith("step ") and f"| {field} " in line:
            out[int(line.split()[1].split("/")[0])] = float(line.split(f"| {field} ")[1].split()[0])
    return out


def _tool():
    return importlib.import_module("tools.collect_runs")


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / METRICS_FILE) if r["kind"] == "train"]


def test_every_number_is_what_the_runs_files_hold(study, setup_files):
    """The runs' own records (metrics.jsonl, run_config.json) are the source; TensorBoard holds the same."""
    sft, focusft = runs.collect([study / "sft", study / "focusft"], WARMUP)
    hf = load_file(setup_files[0].parent / "hf" / "model.safetensors")
    for row, name in ((sft, "sft"), (focusft, "focusft")):
        steps, tb = _train_records(study / name), _scalars(study / name)
        assert row.metrics_source == "metrics.jsonl"
        assert (row.model, row.parameters) == ("custom", sum(t.numel() for t in hf.values()))
        assert row.iterations == 3 and row.timed_steps == 2 and row.warmup_steps_skipped == WARMUP
        assert row.step_time_s == statistics.median([r["step_s"] for r in steps[WARMUP:]])
        assert row.tokens_per_s == statistics.median([r["global_tokens_per_s"] for r in steps[WARMUP:]])
        assert row.tokens_per_s == pytest.approx(
            statistics.median([v for _, _, v in tb["train/global_tokens_per_s"][1:]])
        )
        assert row.train_loss == steps[-1]["loss"] == pytest.approx(tb["train/loss"][-1][2], rel=1e-6)
        assert row.train_loss == pytest.approx(_logged(study / name / LOGS[name], "loss")[3], abs=1e-4)
        assert row.mfu is None and row.peak_memory_gib is None  # logged on GPU only
        assert row.layout == "TP=1 PP=1 CP=1 DP=1"  # run_config.json: what the run ran with
    assert (sft.method, focusft.method) == ("sft", "focusft")
    assert "train/inner_loss_before" in _scalars(study / "focusft")
    assert (sft.planned_iterations, sft.status) == (3, "finished")
    assert (focusft.planned_iterations, focusft.status) == (4, "stopped early")
    valid = [r for r in read_metrics(study / "sft" / METRICS_FILE) if r["kind"] == "valid"]
    assert (sft.valid_loss, sft.valid_iteration) == (valid[-1]["loss"], 3)
    assert sft.valid_loss == pytest.approx(_scalars(study / "sft")["valid/loss"][-1][2], rel=1e-6)
    assert focusft.valid_loss is None and focusft.valid_iteration is None  # stopped before validating
    assert (sft.eval_score, sft.eval_cells) == (None, None)
    assert (focusft.eval_score, focusft.eval_cells) == (75.0, 2)
    ratios, notes = runs.step_time_overhead([sft, focusft])
    assert ratios == {("custom", sft.parameters): focusft.step_time_s / sft.step_time_s} and notes == []


def test_runs_without_their_records_are_read_from_tensorboard_and_logs(study, tmp_path):
    """Runs from before metrics.jsonl and run_config.json: the events and the console logs, as before."""
    older = {}
    for name in ("sft", "focusft"):
        shutil.copytree(study / name, tmp_path / name, ignore=shutil.ignore_patterns(METRICS_FILE, "run_config*"))
        older[name] = runs.read_run(tmp_path / name, WARMUP)
    sft, focusft = older["sft"], older["focusft"]
    for row, name in ((sft, "sft"), (focusft, "focusft")):
        tb = _scalars(study / name)
        times = [t for t, _, _ in tb["train/loss"]]
        assert row.metrics_source == "tensorboard"
        assert row.iterations == 3 and row.timed_steps == 2 and row.warmup_steps_skipped == WARMUP
        assert row.step_time_s == statistics.median([b - a for a, b in zip(times, times[1:])])
        assert row.tokens_per_s == statistics.median([v for _, _, v in tb["train/global_tokens_per_s"][1:]])
        assert row.train_loss == tb["train/loss"][-1][2]
    assert (sft.planned_iterations, focusft.planned_iterations) == (3, 4)  # the console logs' step i/N
    assert (sft.valid_loss, sft.valid_iteration) == (_scalars(study / "sft")["valid/loss"][-1][2], 3)
    assert sft.layout is None  # a plain train.py log states none
    sizes = dict(kv.split("=") for kv in focusft.layout.split())  # the run script's line
    assert {sizes.pop(k) for k in ("TP", "CP", "DP")} == {"1"} and set(sizes.values()) <= {"1"}


def test_a_log_file_alone_gives_its_rounded_numbers_and_no_step_time(study):
    log = study / "focusft" / LOGS["focusft"]
    row = runs.read_run(log, WARMUP)
    full = runs.read_run(study / "focusft", WARMUP)
    assert row.metrics_source == "log" and row.run == LOGS["focusft"]
    assert (row.method, row.iterations, row.planned_iterations, row.layout) == ("focusft", 3, 4, full.layout)
    assert row.train_loss == _logged(log, "loss")[3] == pytest.approx(full.train_loss, abs=1e-4)
    assert row.tokens_per_s == statistics.median(list(_logged(log, "global_tokens_per_s").values())[1:])
    assert row.tokens_per_s == pytest.approx(full.tokens_per_s, rel=1e-4)
    assert row.step_time_s is None and row.timed_steps == 0  # a log records no time
    assert (row.model, row.parameters, row.eval_score) == (None, None, None)  # no checkpoint or eval beside it


def test_the_tool_writes_the_table_csv_json_and_plot(study, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(study / "sft"), str(study / "focusft"), "--warmup-steps", str(WARMUP)]
    argv += ["--csv", str(out / "runs.csv"), "--json", str(out / "runs.json"), "--plot", str(out / "scaling.png")]
    assert _tool().main(argv) == 0
    table = capsys.readouterr().out
    header, _, sft, focusft = table.splitlines()[:4]
    assert header == "| " + " | ".join(runs.COLUMNS) + " |"
    assert sft.startswith("| sft | custom |") and "| SFT | TP=1 PP=1 CP=1 DP=1 | 3/3 |" in sft
    assert sft.endswith("| no eval |")
    assert "| FocuSFT | TP=" in focusft and "| 3/4 (stopped early) |" in focusft
    assert focusft.endswith("| - | 75.0 (2 cells) |")  # no validation loss; the eval file's mean
    rows = runs.collect([study / "sft", study / "focusft"], WARMUP)
    recs = json.loads((out / "runs.json").read_text())
    assert [r["step_time_s"] for r in recs] == [r.step_time_s for r in rows]
    assert recs[1]["step_time_vs_sft"] == rows[1].step_time_s / rows[0].step_time_s
    assert recs[1]["eval_accuracy"] == {"babilong_qa1": {"1024": 50.0}, "ruler_vt": {"1024": 100.0}}
    with open(out / "runs.csv") as f:
        table_rows = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in table_rows] == [r.train_loss for r in rows]
    assert table_rows[0]["valid_loss"] != "" and table_rows[1]["valid_loss"] == ""
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert struct.unpack(">II", png[16:24]) == (1100, 420)


def test_the_figure_has_both_panels_and_only_the_numbers_there_are(study):
    rows = runs.collect([study / "sft", study / "focusft"], WARMUP)
    fig = runs.scaling_figure(rows)
    score, overhead = fig.axes
    assert (score.get_title(), overhead.get_title()) == (runs.SCORE_TITLE, runs.OVERHEAD_TITLE)
    [focusft_line] = score.get_lines()  # the SFT run has no evaluation: no SFT line
    assert focusft_line.get_label() == "FocuSFT" and list(focusft_line.get_ydata()) == [75.0]
    ratio_line = overhead.get_lines()[0]
    assert list(ratio_line.get_xdata()) == [rows[0].parameters]
    assert list(ratio_line.get_ydata()) == [rows[1].step_time_s / rows[0].step_time_s]


def test_what_is_not_a_run_is_a_one_line_error(study, tmp_path, capsys):
    empty = tmp_path / "pending"
    empty.mkdir()
    notes = tmp_path / "notes.log"
    notes.write_text("nothing from train.py here\n")
    for bad, says in [
        (empty, f"{empty} is not a training run"),
        (notes, f"{notes} is not a training log"),
        (tmp_path / "missing", f"{tmp_path / 'missing'}: no such run folder"),
    ]:
        assert _tool().main([str(study / "sft"), str(bad)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"error: {says}") and captured.err.count("\n") == 1
    assert _tool().main([str(study / "sft"), "--warmup-steps", "0"]) == 2
    assert "--warmup-steps must be at least 1" in capsys.readouterr().err


def test_plot_without_matplotlib_names_it_and_writes_nothing(study, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "scaling.png"
    assert _tool().main([str(study / "sft"), "--plot", str(out), "--csv", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --plot needs matplotlib") and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "r.csv").exists()
