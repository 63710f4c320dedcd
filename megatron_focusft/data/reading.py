"""Reading conversations: JSONL (one JSON object a line) and Parquet (one row a conversation).

A record is kept raw (the JSON line, or the row as a dict) so that parsing can happen in worker processes;
:func:`parse_record` turns it into a dict and reports malformed JSON as ``file:line``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class FieldNames:
    """Where a record keeps its conversation (names of the fields, and optional role renaming).

    ``role_map`` renames roles before validation, e.g. ``{"human": "user", "gpt": "assistant"}``.
    """

    messages: str = "messages"
    tools: str = "tools"
    role: str = "role"
    content: str = "content"
    tool_calls: str = "tool_calls"
    role_map: dict[str, str] = field(default_factory=dict)

    def __hash__(self):  # usable as a cache key / picklable value
        return hash((self.messages, self.tools, self.role, self.content, self.tool_calls))


@dataclass
class RawRecord:
    """One conversation as read: a JSON text line (JSONL) or a dict (Parquet row), and where it came from."""

    location: str  # "file:line" (JSONL, 1-based line) or "file:row N" (Parquet, 0-based row)
    raw: str | dict


def input_format(path: str) -> str:
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSONL_SUFFIXES) or low.endswith(tuple(s + ".gz" for s in JSONL_SUFFIXES)):
        return "jsonl"
    raise DataError(f"{path}: unknown input format (expected .jsonl/.json or .parquet)", reason="bad_file")


def _strip_none(value):
    """Parquet unifies struct fields across rows: absent keys come back as None; drop them again."""
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def iter_jsonl(path: str) -> Iterator[RawRecord]:
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open
    name = os.path.basename(path)
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield RawRecord(f"{name}:{lineno}", line)


def iter_parquet(path: str, batch_size: int = 256) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for rec in batch.to_pylist():
            yield RawRecord(f"{name}:row {row}", _strip_none(rec))
            row += 1


def iter_records(paths: list[str]) -> Iterator[RawRecord]:
    """All records of all files, in order."""
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"{path}: input file does not exist", reason="bad_file")
        if input_format(path) == "parquet":
            yield from iter_parquet(path)
        else:
            yield from iter_jsonl(path)


def count_records(paths: list[str]) -> int:
    """Number of records (non-empty lines / rows), cheaply, for a progress bar's total."""
    total = 0
    for path in paths:
        if input_format(path) == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            opener = open
            if path.endswith(".gz"):
                import gzip

                opener = gzip.open
            with opener(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
    return total


def parse_record(rec: RawRecord) -> dict:
    """The record as a dict; JSON syntax errors become ``DataError("file:line: malformed JSON ...")``."""
    if isinstance(rec.raw, dict):
        return rec.raw
    try:
        obj = json.loads(rec.raw)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json", rec.location) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", "bad_record", rec.location)
    return obj
