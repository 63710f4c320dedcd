"""The scaling study's table: one row per training run of ``tools/train.py``, read from what the run wrote.

Every column is read from where it is actually recorded, the run's own records first
(:mod:`megatron_focusft.run_record`: ``SAVE/metrics.jsonl`` and ``SAVE/run_config.json``, written by runs since
they exist); for older runs, from what those wrote (TensorBoard events, console logs):

- metrics: ``metrics.jsonl`` (every step: each logged field at full precision, the step's own time); else the
  TensorBoard events (``--tensorboard-dir``; ``examples/run_focusft_qwen7b.sh`` writes them to
  ``SAVE/tensorboard``): each logged step's fields (``train/loss``, ``train/global_tokens_per_s``, and on GPU
  ``train/mfu`` and ``train/peak_mem_gib``) and ``valid/loss``, as logged (float32); else the console log's
  ``[time] step i/N | field value | ...`` lines: the same fields, rounded to 4-5 digits.
- step time: ``metrics.jsonl``'s ``step_s`` of each step (the step alone: a validation or a checkpoint after
  it is not in it).  From events, only their wall-clock times record it: the time between two logged steps of
  one launch over the steps between them, which includes what the loop does between steps (the divergence
  check, and a validation or a checkpoint where one falls: the median leaves those out).  The first
  ``warmup`` logged steps of every launch (a requeued job starts again) are left out of the medians; at least
  the first, whose start the events do not record.
- planned iterations (did the run stop early?) and the layout: ``run_config.json`` (its ``train_iters``; its
  TP, PP, CP and DP: what the latest launch ran with); else the console log (the N of ``step i/N``; the run
  script's ``# FocuSFT Qwen2.5-72B: ... TP=8 PP=2 CP=2 SP=1 DP=1 ...`` line).
- model: the latest checkpoint's ``focusft_checkpoint.json`` (the preset whose shape it has, else "custom";
  the parameter count).
- method: FocuSFT where the run logged inner-loop losses (``inner_loss_before``, logged whenever the inner
  loop ran: ``--bilevel`` with K >= 1), else standard SFT.
- evaluation: ``RUN/eval.json`` (``tools/evaluate.py --json``); the score is the mean accuracy (%) over its
  task x length cells.

Nothing missing is filled in: what no file records is None (``-`` in the table).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_focusft.convert.megatron_io import CheckpointMeta, latest_checkpoint
from megatron_focusft.memory_plan import parameter_count
from megatron_focusft.models.qwen2 import PRESETS, ConfigError, Qwen2Arch
from megatron_focusft.run_record import METRICS_FILE, read_metrics, read_run_config

EVAL_FILE = "eval.json"
METHODS = {"sft": "SFT", "focusft": "FocuSFT"}
_STEP_LINE = re.compile(r"(?:\[[^\]]*\] )?step (\d+)/(\d+) \| (.*)")  # after the trainer's timestamp
_VALID_LOSS = re.compile(r"valid loss (\S+)")
_LAYOUT_SIZE = re.compile(r"\b(TP|PP|CP|DP)=(\d+)\b")


class CollectError(ValueError):
    """A path that is not a run or cannot be read, or a missing dependency: one line, naming it."""


@dataclass(frozen=True)
class Step:
    """One logged training step: the logger's fields; ``wall_time`` of its record or TensorBoard event (None:
    a console log); ``step_s``: the step's own time (``metrics.jsonl`` only)."""

    iteration: int
    fields: dict[str, float]
    wall_time: float | None = None
    step_s: float | None = None


@dataclass
class Trace:
    """What one source (TensorBoard events or console logs) holds: the logged steps of each launch in order,
    the validation losses as ``(iteration, loss)`` in order."""

    launches: list[list[Step]]
    valid: list[tuple[int, float]]

    @property
    def steps(self) -> list[Step]:
        return [s for launch in self.launches for s in launch]


@dataclass
class RunRow:
    """One run's row; None where no file of the run records the value."""

    run: str  # the folder's (or log file's) name
    path: str
    model: str | None  # a Qwen2.5 preset's name, "custom" for another shape; None: no checkpoint yet
    parameters: int | None
    method: str | None  # "sft" or "focusft"; None: no step logged
    layout: str | None  # as the run script's log line states it, e.g. "TP=2 PP=1 CP=1 DP=4"
    iterations: int | None  # the last logged iteration
    planned_iterations: int | None
    step_time_s: float | None
    timed_steps: int
    warmup_steps_skipped: int  # logged steps left out of the medians
    tokens_per_s: float | None  # global (all data-parallel replicas)
    mfu: float | None
    peak_memory_gib: float | None
    train_loss: float | None  # at the last logged iteration
    valid_loss: float | None  # the last validation
    valid_iteration: int | None
    eval_score: float | None
    eval_cells: int | None
    metrics_source: str | None  # "metrics.jsonl", "tensorboard" or "log"
    eval_accuracy: dict | None = None  # {task: {length: accuracy %}} as eval.json holds it

    @property
    def status(self) -> str:
        if self.iterations is None:
            return "no step logged"
        if self.planned_iterations is None:
            return "planned length unknown"
        return "finished" if self.iterations >= self.planned_iterations else "stopped early"

    @property
    def model_key(self) -> tuple[str, int] | None:
        return None if self.model is None or self.parameters is None else (self.model, self.parameters)


# ---- reading ------------------------------------------------------------------------------------------


def read_run(path: Path, warmup: int = 10) -> RunRow:
    """The row of the run at ``path``: a run folder (``--save`` or log folder: its ``metrics.jsonl`` and
    ``run_config.json``, checkpoints, TensorBoard events anywhere below it, ``*.log`` console logs and
    ``eval.json``) or one console log file."""
    if warmup < 1:
        raise CollectError(f"--warmup-steps must be at least 1 (the first step's start is not recorded), got {warmup}")
    path = Path(path)
    if path.is_file():
        log = _read_logs([path])
        if log is None:
            raise CollectError(f"{path} is not a training log (no 'step i/N | ...' line and no layout line in it)")
        return _row(path, None, log, (None, None), None, warmup)
    if not path.is_dir():
        raise CollectError(f"{path}: no such run folder or log file")
    metrics = _read_metrics(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else None
    try:
        record = read_run_config(path)
    except ValueError as e:
        raise CollectError(str(e)) from None
    events = [] if metrics is not None else sorted(path.rglob("events.out.tfevents.*"))
    tensorboard = _read_events(events) if events else None  # only where the run kept no metrics.jsonl
    log = _read_logs(sorted(path.glob("*.log"), key=lambda p: p.stat().st_mtime))
    model = _read_model(path)
    if metrics is None and tensorboard is None and log is None and model == (None, None):
        raise CollectError(
            f"{path} is not a training run (no {METRICS_FILE}, TensorBoard events, console log (*.log) or "
            "checkpoint in it)"
        )
    if record is not None:  # what the latest launch ran with wins over the console log's view of it
        lay = record["layout"]
        sizes = ("tensor_model", "pipeline_model", "context", "data")
        layout = " ".join(f"{k}={lay[f'{n}_parallel_size']}" for k, n in zip(("TP", "PP", "CP", "DP"), sizes))
        log = _Log(log.trace if log else Trace([], []), int(record["train_iters"]), layout)
    eval_path = path / EVAL_FILE
    accuracy = _read_eval(eval_path) if eval_path.is_file() else None
    return _row(path, metrics or tensorboard, log, model, accuracy, warmup)


def collect(paths: list[Path], warmup: int = 10) -> list[RunRow]:
    return [read_run(Path(p), warmup) for p in paths]


@dataclass
class _Log:
    trace: Trace
    planned: int | None
    layout: str | None


def _read_logs(paths: list[Path]) -> _Log | None:
    """The console logs of a run, oldest first (a requeued SLURM job appends to its log); None if they hold
    neither a step line nor a layout line.  A launch starts at a layout line or where the iteration does not
    go up."""
    launches: list[list[Step]] = []
    valid: list[tuple[int, float]] = []
    planned = layout = None
    seen = False
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise CollectError(f"{path}: unreadable ({e.strerror})") from None
        for line in text.splitlines():
            if line.startswith("# ") and "TP=" in line and "DP=" in line:  # the run script's layout line
                layout = " ".join(f"{k}={v}" for k, v in _LAYOUT_SIZE.findall(line))
                launches.append([])
                seen = True
                continue
            m = _STEP_LINE.match(line)
            if m is None:
                continue
            seen = True
            iteration, planned, rest = int(m[1]), int(m[2]), m[3]
            v = _VALID_LOSS.match(rest)
            if v is not None:
                valid.append((iteration, float(v[1])))
                continue
            if not launches or (launches[-1] and launches[-1][-1].iteration >= iteration):
                launches.append([])
            launches[-1].append(Step(iteration, _fields(rest)))
    if not seen:
        return None
    return _Log(Trace([s for s in launches if s], valid), planned, layout)


def _fields(rest: str) -> dict[str, float]:
    """``loss 5.4271 | grad_norm 7.6859 | ...`` -> numbers (parts that are not ``name number`` are skipped)."""
    out = {}
    for part in rest.split(" | "):
        key, _, value = part.partition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


# The fields of a metrics.jsonl record that describe it rather than measure the step.
_RECORD_KEYS = ("kind", "iteration", "launch", "wall_time", "step_s", "consumed_samples", "skipped")


def _read_metrics(path: Path) -> Trace:
    """``metrics.jsonl``: one launch per ``launch`` value (and wherever the iteration does not go up)."""
    try:
        records = read_metrics(path)
    except OSError as e:
        raise CollectError(f"{path}: unreadable ({e.strerror})") from None
    launches: list[list[Step]] = []
    valid: list[tuple[int, float]] = []
    launch = None
    for r in records:
        if r["kind"] == "valid":
            valid.append((int(r["iteration"]), float(r["loss"])))
            continue
        if r["kind"] != "train":
            continue
        if not launches or r.get("launch") != launch or launches[-1][-1].iteration >= r["iteration"]:
            launches.append([])
            launch = r.get("launch")
        fields = {k: float(v) for k, v in r.items() if k not in _RECORD_KEYS and isinstance(v, (int, float))}
        launches[-1].append(Step(int(r["iteration"]), fields, r.get("wall_time"), r.get("step_s")))
    return Trace(launches, valid)


def _read_events(paths: list[Path]) -> Trace:
    """Every events file is one launch (each start of the trainer opens a new one), ordered by its start."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util.tensor_util import make_ndarray
    except ImportError:
        raise CollectError(
            f"reading {paths[0].parent}'s TensorBoard events needs tensorboard "
            "(pip install 'megatron-focusft[tensorboard]')"
        ) from None
    launches: list[tuple[float, list[Step]]] = []
    valid: list[tuple[float, int, float]] = []
    for path in paths:
        steps: dict[int, Step] = {}
        start = None
        # The loader stops at a damaged or cut-off record (a job killed while writing): the steps before it.
        for event in EventFileLoader(str(path)).Load():
            start = event.wall_time if start is None else start
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                number = value.simple_value if kind == "simple_value" else float(make_ndarray(value.tensor))
                if value.tag == "valid/loss":
                    valid.append((event.wall_time, event.step, number))
                elif value.tag.startswith("train/"):
                    if event.step not in steps:  # the step's first scalar (the loss) dates it
                        steps[event.step] = Step(event.step, {}, event.wall_time)
                    steps[event.step].fields[value.tag.removeprefix("train/")] = number
        if steps:
            launches.append((start, [steps[i] for i in sorted(steps)]))
    launches.sort(key=lambda x: x[0])
    return Trace([s for _, s in launches], [(i, v) for _, i, v in sorted(valid)])


def _read_model(folder: Path) -> tuple[str | None, int | None]:
    """(preset name or "custom", parameter count) of the latest checkpoint in ``folder``; (None, None) if none."""
    try:
        ckpt = latest_checkpoint(folder)
        if ckpt is None:
            return None, None
        arch = CheckpointMeta.read(ckpt).arch
    except ConfigError as e:
        raise CollectError(str(e)) from None

    name = next((n for n, preset in PRESETS.items() if _shape(preset) == _shape(arch)), "custom")
    return name, parameter_count(arch)


def _shape(a: Qwen2Arch) -> tuple:
    """What makes a model size (a checkpoint's max_position_embeddings or RMSNorm eps may differ from the preset)."""
    return (
        a.hidden_size,
        a.num_layers,
        a.num_attention_heads,
        a.num_key_value_heads,
        a.ffn_hidden_size,
        a.vocab_size,
        a.tie_word_embeddings,
    )


def _read_eval(path: Path) -> dict[str, dict[str, float]]:
    """The accuracy table of a ``tools/evaluate.py --json`` file."""
    try:
        accuracy = json.loads(path.read_text())["accuracy"]
        return {task: {length: float(a) for length, a in by.items()} for task, by in accuracy.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CollectError(f"{path}: not a tools/evaluate.py --json file ({e!r})") from None


# ---- summarising --------------------------------------------------------------------------------------


def _row(
    path: Path,
    recorded: Trace | None,
    log: _Log | None,
    model: tuple[str | None, int | None],
    accuracy: dict[str, dict[str, float]] | None,
    warmup: int,
) -> RunRow:
    """``recorded``: the steps of ``metrics.jsonl`` or, without it, of the TensorBoard events."""
    # One source for every metric: the run's records where they hold a step, else the console log.
    from_records = recorded is not None and any(s.step_s is not None for s in recorded.steps)
    if recorded is not None and recorded.steps:
        trace, source = recorded, METRICS_FILE if from_records else "tensorboard"
    elif log is not None and log.trace.steps:
        trace, source = log.trace, "log"
    else:  # no step logged: a validation loss is all there can be
        trace, source = recorded or (log.trace if log else Trace([], [])), None
    timed: list[tuple[float, int]] = []  # (seconds per step, steps)
    after: list[tuple[Step, int]] = []  # logged steps after the warm-up, with the steps each stands for
    skipped = 0
    for steps in trace.launches:
        skipped += min(warmup, len(steps))
        for prev, step in zip(steps[warmup - 1 :], steps[warmup:]):
            gap = step.iteration - prev.iteration
            after.append((step, gap))
            if step.step_s is not None:  # metrics.jsonl: every step, with its own time
                timed.append((step.step_s, 1))
            elif step.wall_time is not None and prev.wall_time is not None:
                timed.append(((step.wall_time - prev.wall_time) / gap, gap))
    last = max(reversed(trace.steps), key=lambda s: s.iteration, default=None)  # a re-logged step: its latest
    valid = max(reversed(trace.valid), key=lambda v: v[0], default=None)
    peaks = [s.fields["peak_mem_gib"] for s in trace.steps if "peak_mem_gib" in s.fields]
    cells = [a for by in accuracy.values() for a in by.values()] if accuracy is not None else []
    return RunRow(
        run=path.name,
        path=str(path),
        model=model[0],
        parameters=model[1],
        method=None if last is None else "focusft" if _ran_inner_loop(trace) else "sft",
        layout=log.layout if log else None,
        iterations=None if last is None else last.iteration,
        planned_iterations=log.planned if log else None,
        step_time_s=_median(timed),
        timed_steps=sum(n for _, n in timed),
        warmup_steps_skipped=skipped,
        tokens_per_s=_field_median(after, "global_tokens_per_s"),
        mfu=_field_median(after, "mfu"),
        peak_memory_gib=max(peaks, default=None),
        train_loss=None if last is None else last.fields.get("loss"),
        valid_loss=None if valid is None else valid[1],
        valid_iteration=None if valid is None else valid[0],
        eval_score=statistics.fmean(cells) if cells else None,
        eval_cells=len(cells) if accuracy is not None else None,
        metrics_source=source,
        eval_accuracy=accuracy,
    )


def _ran_inner_loop(trace: Trace) -> bool:
    return any("inner_loss_before" in s.fields for s in trace.steps)


def _field_median(steps: list[tuple[Step, int]], key: str) -> float | None:
    return _median([(s.fields[key], n) for s, n in steps if key in s.fields])


def _median(samples: list[tuple[float, int]]) -> float | None:
    """The median over steps of ``(value, steps it stands for)`` samples; None without any."""
    values = [v for v, n in samples for _ in range(n)]
    return statistics.median(values) if values else None


def step_time_overhead(rows: list[RunRow]) -> tuple[dict[tuple[str, int], float], list[str]]:
    """FocuSFT step time / SFT step time per model (``RunRow.model_key``), where the model has exactly one
    run of each method with a step time; and a note for each model whose pairing is ambiguous."""
    by_model: dict[tuple[str, int], dict[str, list[RunRow]]] = {}
    for r in rows:
        if r.model_key is not None and r.method is not None and r.step_time_s is not None:
            by_model.setdefault(r.model_key, {}).setdefault(r.method, []).append(r)
    ratios, notes = {}, []
    for key, methods in by_model.items():
        sft, focusft = methods.get("sft", []), methods.get("focusft", [])
        if len(sft) == 1 and len(focusft) == 1:
            ratios[key] = focusft[0].step_time_s / sft[0].step_time_s
        elif len(sft) > 1 or len(focusft) > 1:
            names = ", ".join(r.path for r in sft + focusft)
            notes.append(f"{key[0]} ({_size(key[1])}): several runs of one method ({names}); no overhead for it")
    return ratios, notes


# ---- output -------------------------------------------------------------------------------------------

COLUMNS = (
    "run",
    "model",
    "params",
    "method",
    "layout",
    "steps",
    "step time (s)",
    "timed (warm-up)",
    "vs SFT",
    "tokens/s",
    "MFU",
    "peak mem (GiB)",
    "train loss",
    "valid loss",
    "eval (%)",
)


def markdown_table(rows: list[RunRow], warmup: int) -> str:
    ratios, _ = step_time_overhead(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 5 + "---:|" * (len(COLUMNS) - 5)]
    for r in rows:
        steps = "-" if r.iterations is None else f"{r.iterations}/{r.planned_iterations or '?'}"
        if r.status == "stopped early":
            steps += " (stopped early)"
        ratio = ratios.get(r.model_key) if r.method == "focusft" else None
        cells = [
            r.run,
            r.model or "-",
            "-" if r.parameters is None else _size(r.parameters),
            METHODS.get(r.method, "-"),
            r.layout or "-",
            steps,
            _num(r.step_time_s, "{:.4g}"),
            f"{r.timed_steps} ({r.warmup_steps_skipped})",
            _num(ratio, "{:.2f}x"),
            _num(r.tokens_per_s, "{:.4g}"),
            _num(None if r.mfu is None else 100 * r.mfu, "{:.1f}%"),
            _num(r.peak_memory_gib, "{:.1f}"),
            _num(r.train_loss, "{:.4f}"),
            _num(r.valid_loss, "{:.4f}") + ("" if r.valid_iteration is None else f" @{r.valid_iteration}"),
            "no eval" if r.eval_cells is None else _num(r.eval_score, "{:.1f}") + f" ({r.eval_cells} cells)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"step time, tokens/s and MFU: medians over the logged steps after the first {warmup} of each launch; "
        "timed (warm-up): the steps timed (the logged steps left out); vs SFT: FocuSFT step time / the same "
        "model's SFT step time; eval: mean accuracy over the task x length cells of RUN/eval.json; "
        "-: recorded nowhere in the run's files (MFU and peak memory are logged on GPU only).",
    ]
    return "\n".join(lines) + "\n"


def records(rows: list[RunRow]) -> list[dict]:
    """Every row as a plain dict (``--json``; ``--csv`` without ``eval_accuracy``), with its status and
    FocuSFT / SFT step-time ratio."""
    ratios, _ = step_time_overhead(rows)
    out = []
    for r in rows:
        d = asdict(r)
        d["status"] = r.status
        d["step_time_vs_sft"] = ratios.get(r.model_key) if r.method == "focusft" else None
        out.append(d)
    return out


def write_csv(rows: list[RunRow], path: Path) -> None:
    recs = [{k: v for k, v in d.items() if k != "eval_accuracy"} for d in records(rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(recs[0]) if recs else [])
        writer.writeheader()
        writer.writerows(recs)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _size(parameters: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.3g}{unit}"
    return str(parameters)


# ---- figure -------------------------------------------------------------------------------------------

SCORE_TITLE = "Evaluation score vs model size"
OVERHEAD_TITLE = "FocuSFT step-time overhead vs model size"


def scaling_figure(rows: list[RunRow]):
    """Two panels: each method's evaluation score vs parameters, and FocuSFT / SFT step time vs parameters
    (models whose runs have those numbers; nothing else is drawn).  Returns the matplotlib figure."""
    try:
        import matplotlib
    except ImportError:
        raise CollectError("--plot needs matplotlib (pip install 'megatron-focusft[analysis]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (score_ax, overhead_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    size_axis = FuncFormatter(lambda x, _: _size(int(round(x))))
    for method, label in METHODS.items():
        points = sorted(
            (r.parameters, r.eval_score)
            for r in rows
            if r.method == method and r.parameters is not None and r.eval_score is not None
        )
        if points:
            score_ax.plot(*zip(*points), marker="o", label=label)
    if score_ax.lines:
        score_ax.legend()
    else:
        score_ax.text(0.5, 0.5, f"no evaluation results ({EVAL_FILE})", ha="center", transform=score_ax.transAxes)
    score_ax.set(title=SCORE_TITLE, xlabel="parameters", ylabel="mean accuracy (%)")

    ratios, _ = step_time_overhead(rows)
    points = sorted((params, ratio, model) for (model, params), ratio in ratios.items())
    if points:
        overhead_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="C1")
        overhead_ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        for params, ratio, model in points:
            overhead_ax.annotate(model, (params, ratio), textcoords="offset points", xytext=(4, 4), fontsize=8)
    else:
        overhead_ax.text(
            0.5, 0.5, "no model with an SFT and a FocuSFT step time", ha="center", transform=overhead_ax.transAxes
        )
    overhead_ax.set(title=OVERHEAD_TITLE, xlabel="parameters", ylabel="FocuSFT / SFT step time")
    for ax in (score_ax, overhead_ax):
        if ax.lines:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(size_axis)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
            ax.grid(True, alpha=0.3)
        else:  # an empty panel says so, with no made-up axes
            ax.set(xticks=[], yticks=[])
    fig.tight_layout()
    return fig
