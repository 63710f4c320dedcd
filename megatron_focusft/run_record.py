"""The two files a training run keeps beside its checkpoints, so that tools read what it did instead of
parsing its console log or its TensorBoard events.  Training writes them (rank 0); the run table
(``analysis/runs.py``) and the model card read them; their format is stated here, once, because those live in
layers that may not import each other.

``SAVE/run_config.json``: what one launch of ``tools/train.py`` ran with, written when the model is built::

    {"format": "megatron_focusft.run_config", "version": 1, "started": "2025-05-01T12:00:00Z",
     "world_size": 8, "layout": {"tensor_model_parallel_size": 2, ..., "data_parallel_size": 4},
     "train_iters": 100, "warmup_iters": 10, "micro_batches_per_step": 8, "resumed_from": null,
     "weights_from": "ckpt/qwen7b", "base_model": {"hf_dir": "/data/Qwen2.5-7B-Instruct"},
     "data": {... PREFIX.json of --data-path ...}, "config": {... TrainConfig.to_dict() ...}}

One record per launch: a new launch moves the previous ``run_config.json`` to ``run_config.<started>.json``
(its own start time, ``20250501T120000Z``; ``-2``, ``-3`` ... if that name is taken), so ``run_config.json``
is always the latest launch's and no launch's record is ever overwritten.

``SAVE/metrics.jsonl``: one JSON object per line, appended and flushed as it happens (a killed job keeps every
line it wrote; a cut-off last line is skipped when read)::

    {"kind": "train", "iteration": 3, "launch": "2025-05-01T12:00:00Z", "wall_time": 1746100803.25,
     "step_s": 0.41, "consumed_samples": 6, "loss": 2.31, "grad_norm": 1.7, "lr": 1e-05, ...}
    {"kind": "valid", "iteration": 3, "launch": "...", "wall_time": ..., "loss": 2.44}

``launch`` is the ``started`` of that launch's ``run_config.json``; a resumed run repeats the iterations after
its checkpoint under the new launch (the later record of an iteration is the one that counts).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FORMAT = "megatron_focusft.run_config"
RUN_CONFIG_VERSION = 1


def iso_utc(t: float) -> str:
    """``t`` (seconds since the epoch) as ``2025-05-01T12:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def to_json(value: Any, indent: int | None = None) -> str:
    """JSON of a record: paths (and any other non-JSON value, e.g. a dtype) as their text."""
    return json.dumps(value, indent=indent, default=str)


def write_run_config(folder: Path, record: dict) -> Path | None:
    """Write ``record`` as ``folder/run_config.json``, first moving an existing one (an earlier launch's) to
    ``run_config.<its started>.json``; returns where that earlier record went, or None if there was none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    current = folder / RUN_CONFIG_FILE
    kept = None
    if current.exists():
        kept = _free_name(folder, _stamp_of(current))
        os.replace(current, kept)
    tmp = folder / f".{RUN_CONFIG_FILE}.tmp"
    tmp.write_text(to_json(record, indent=2) + "\n")
    os.replace(tmp, current)
    return kept


def _stamp_of(path: Path) -> str:
    """The file-name form of a record's ``started`` (``20250501T120000Z``); the file's modification time
    where the record is unreadable."""
    try:
        started = json.loads(path.read_text())["started"]
        return str(started).replace("-", "").replace(":", "")
    except (OSError, ValueError, KeyError, TypeError):
        return iso_utc(path.stat().st_mtime).replace("-", "").replace(":", "")


def _free_name(folder: Path, stamp: str) -> Path:
    path, n = folder / f"run_config.{stamp}.json", 1
    while path.exists():
        n += 1
        path = folder / f"run_config.{stamp}-{n}.json"
    return path


def read_run_config(folder: Path) -> dict | None:
    """``folder/run_config.json`` (the latest launch's record), or None where there is none; an unreadable
    one is a ValueError naming it."""
    path = Path(folder) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable run record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_CONFIG_FORMAT:
        raise ValueError(f"{path}: not a {RUN_CONFIG_FORMAT} record")
    return record


class MetricsFile:
    """``metrics.jsonl`` opened for appending; every record is one line, flushed at once."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # open for the life of the run

    def write(self, record: dict) -> None:
        self._file.write(to_json(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """Every record of a ``metrics.jsonl`` in file order; a line that is not a JSON object (the cut-off
    last line of a killed job) is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "kind" in record and "iteration" in record:
                records.append(record)
    return records


def latest_by_iteration(records: list[dict], kind: str, up_to: int | None = None) -> dict | None:
    """The record of ``kind`` with the highest iteration (``up_to``: at most that one), the later of two
    records of one iteration (a resumed run repeats the steps after its checkpoint); None if there is none."""
    best = None
    for r in records:
        if r["kind"] == kind and (up_to is None or r["iteration"] <= up_to):
            if best is None or r["iteration"] >= best["iteration"]:
                best = r
    return best
