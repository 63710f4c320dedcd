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
    raw: bytes | str | dict  # a JSONL line (bytes as read, not yet decoded; or text) or a Parquet row


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
    """The non-empty lines of a JSONL file, as bytes: decoding (and an invalid UTF-8 line's error) happens in
    :func:`parse_record`, per record, so that one bad line is one skippable record.  Lines end at ``\n``
    only, the way :func:`count_records` counts them; a UTF-8 byte-order mark at the start is dropped.
    """
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open
    name = os.path.basename(path)
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if line.strip():
                    yield RawRecord(f"{name}:{lineno}", line)
    except (OSError, EOFError) as e:  # unreadable, or a truncated / corrupt gzip stream
        raise DataError(f"cannot read past line {lineno} ({e})", "bad_file", f"{name}:{lineno + 1}") from None


def iter_parquet(path: str, batch_size: int = 256) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size)
        for batch in batches:
            for rec in batch.to_pylist():
                yield RawRecord(f"{name}:row {row}", _strip_none(rec))
                row += 1
    except (OSError, ValueError) as e:  # a corrupt page / row group (pyarrow's ArrowInvalid is a ValueError)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read past row {row} ({msg})", "bad_file", f"{name}:row {row}") from None


_MAGIC = {"parquet": b"PAR1", "gzip": b"\x1f\x8b"}


def check_input(path: str) -> None:
    """Raise ``DataError(reason="bad_file")`` naming ``path`` unless it is a readable input file.

    Checks, without reading the file through: it exists, is a regular file, has a known suffix, can be opened,
    and a Parquet / gzip file starts with its magic bytes.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: input file does not exist", reason="bad_file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: input is not a regular file", reason="bad_file")
    fmt = input_format(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"{path}: cannot read the input file ({e.strerror or e})", reason="bad_file") from None
    magic = _MAGIC["parquet"] if fmt == "parquet" else _MAGIC["gzip"] if path.endswith(".gz") else None
    if magic is not None and not head.startswith(magic):
        kind = "Parquet" if fmt == "parquet" else "gzip"
        raise DataError(f"{path}: not a {kind} file (wrong magic bytes)", reason="bad_file")


def check_inputs(paths: list[str]) -> None:
    """:func:`check_input` on every path, before anything is read or written."""
    if not paths:
        raise DataError("no input file given", reason="bad_file")
    for path in paths:
        check_input(path)


def iter_records(paths: list[str]) -> Iterator[RawRecord]:
    """All records of all files, in order."""
    for path in paths:
        check_input(path)
        if input_format(path) == "parquet":
            yield from iter_parquet(path)
        else:
            yield from iter_jsonl(path)


def count_records(paths: list[str]) -> int:
    """Number of records (non-empty lines / rows), cheaply, for a progress bar's total.

    Every path is checked (:func:`check_inputs`) before any is counted; a file that cannot be read through
    (e.g. a truncated gzip or Parquet file) is a ``DataError(reason="bad_file")`` naming it.
    """
    check_inputs(paths)
    total = 0
    for path in paths:
        try:
            total += _count_file(path)
        except (OSError, EOFError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: cannot read the input file ({e})", reason="bad_file") from None
    return total


def _count_file(path: str) -> int:
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def parse_record(rec: RawRecord) -> dict:
    """The record as a dict; JSON syntax errors become ``DataError("file:line: malformed JSON ...")`` and a
    line that is not valid UTF-8 ``DataError("file:line: invalid UTF-8 ...", reason="bad_encoding")``."""
    if isinstance(rec.raw, dict):
        return rec.raw
    text = rec.raw
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"invalid UTF-8 (byte 0x{text[e.start]:02x} at column {e.start + 1}: {e.reason})",
                "bad_encoding",
                rec.location,
            ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json", rec.location) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", "bad_record", rec.location)
    return obj
