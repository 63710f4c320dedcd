"""Reading conversation records from what users bring: JSONL (plain or gzip), a JSON array (``.json``), Parquet,
a folder of Parquet shards, and a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``).

A record is kept as read (a JSONL line as bytes, a row as a dict) so that parsing can happen in worker
processes; :func:`parse_record` turns it into a dict and reports malformed JSON as ``file:line``.  Locations:
``file:line`` (JSONL, 1-based), ``file:item N`` (a JSON array's N-th element, 0-based), ``file:row N``
(Parquet / Arrow, 0-based within the shard; a folder's shards are named by their path under the folder).

A ``datasets`` folder is read with pyarrow alone (its ``state.json`` lists the Arrow stream files in order), so
no ``datasets`` installation is needed; nothing in any input is unpickled.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)  # a JSON array, or JSON lines (told apart by the first character)
PARQUET_SUFFIXES = (".parquet", ".pq")
InputKind = Literal["jsonl", "json", "parquet", "parquet_dir", "arrow_dir"]
DATASETS_STATE = "state.json"  # what Dataset.save_to_disk writes next to its Arrow files
DATASETS_DICT = "dataset_dict.json"  # what DatasetDict.save_to_disk writes above its split folders

_MAGIC = {"parquet": b"PAR1", "gzip": b"\x1f\x8b", "arrow": b"\xff\xff\xff\xff"}  # (arrow: IPC stream start)
_JSON_CHUNK = 1 << 20


@dataclass
class RawRecord:
    """One conversation as read, and where it came from.

    ``raw``: a JSONL line (bytes as read, not yet decoded; or text) or an already parsed object (a row, a JSON
    array element).  ``error``: the record was found bad while reading (a JSON array element that is not an
    object); :func:`parse_record` raises it, so it is skipped and counted like any bad record.
    """

    location: str
    raw: bytes | str | dict | None
    error: DataError | None = None


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
    low = path.lower()
    return low.endswith(suffixes) or low.endswith(tuple(s + ".gz" for s in suffixes))


def input_kind(path: str) -> InputKind:
    """What ``path`` holds, from its name (a file) or its contents' names (a folder)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, DATASETS_DICT)):
            raise DataError(f"{path}: a DatasetDict folder ({_splits(path)}); pass one split's folder", "bad_file")
        if os.path.exists(os.path.join(path, DATASETS_STATE)):
            return "arrow_dir"
        if _parquet_shards(path):
            return "parquet_dir"
        raise DataError(
            f"{path}: a folder with neither Parquet files nor a datasets state.json (save_to_disk)", "bad_file"
        )
    if path.lower().endswith(PARQUET_SUFFIXES):
        return "parquet"
    if _has_suffix(path, JSONL_SUFFIXES):
        return "jsonl"
    if _has_suffix(path, JSON_SUFFIXES):
        return "json"
    raise DataError(
        f"{path}: unknown input format (expected .jsonl/.json[.gz], .parquet, or a folder of Parquet files or "
        "a datasets save_to_disk folder)",
        "bad_file",
    )


def _splits(path: str) -> str:
    try:
        with open(os.path.join(path, DATASETS_DICT), encoding="utf-8") as f:
            splits = json.load(f).get("splits")
    except (OSError, ValueError, AttributeError):
        splits = None
    if isinstance(splits, list) and splits and all(isinstance(s, str) for s in splits):
        return "splits: " + ", ".join(splits) + f"; e.g. {os.path.join(path, splits[0])}"
    return "its split folders"


def _parquet_shards(folder: str) -> list[str]:
    """Every Parquet file under ``folder`` (any depth: the Hub's ``data/train-00000-of-00004.parquet``),
    in name order, which is shard order."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in files if f.lower().endswith(PARQUET_SUFFIXES)]
    return sorted(out)


def _arrow_shards(folder: str) -> list[str]:
    """The Arrow files of a ``save_to_disk`` folder, in order, from its ``state.json``."""
    state_path = os.path.join(folder, DATASETS_STATE)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except OSError as e:
        raise DataError(f"{state_path}: cannot read it ({e.strerror or e})", "bad_file") from None
    except ValueError as e:
        raise DataError(f"{state_path}: not valid JSON ({e})", "bad_file") from None
    files = state.get("_data_files") if isinstance(state, dict) else None
    names = [f.get("filename") for f in files if isinstance(f, dict)] if isinstance(files, list) else []
    # plain file names only: a state.json is user data and must not point outside its folder
    if not names or not all(isinstance(n, str) and n and os.path.basename(n) == n for n in names):
        raise DataError(f"{state_path}: '_data_files' must list the folder's Arrow file names", "bad_file")
    return [os.path.join(folder, n) for n in names]


def _shards(path: str, kind: InputKind) -> list[str]:
    return _parquet_shards(path) if kind == "parquet_dir" else _arrow_shards(path) if kind == "arrow_dir" else [path]


def _shard_name(path: str, shard: str) -> str:
    """How locations name a shard: the folder's name and the shard's path under it (a file: its name)."""
    if shard == path:
        return os.path.basename(path)
    return os.path.relpath(shard, os.path.dirname(os.path.abspath(path)))


def _pyarrow(path: str):
    """pyarrow (with its parquet and ipc modules), or a one-line error naming the input and the package."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet / datasets folders needs pyarrow (pip install 'megatron-focusft[parquet]')",
            "bad_file",
        ) from None
    return pyarrow


def _strip_none(value):
    """Parquet unifies struct fields across rows: absent keys come back as None; drop them again."""
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def iter_jsonl(path: str) -> Iterator[RawRecord]:
    """The non-empty lines of a JSONL file, as bytes: decoding (and an invalid UTF-8 line's error) happens in
    :func:`parse_record`, per record, so that one bad line is one skippable record.  Lines end at ``\n``
    only, the way :func:`count_records` counts them; a UTF-8 byte-order mark at the start is dropped.
    """
    name = os.path.basename(path)
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if line.strip():
                    yield RawRecord(f"{name}:{lineno}", line)
    except (OSError, EOFError) as e:  # unreadable, or a truncated / corrupt gzip stream
        raise DataError(f"cannot read past line {lineno} ({e})", "bad_file", f"{name}:{lineno + 1}") from None


def _is_json_array(path: str) -> bool:
    """A ``.json`` file holds a JSON array when its first character (after a BOM and whitespace) is ``[``."""
    with _open_binary(path) as f:
        head = f.read(4096)
        while head and not head.lstrip(b"\xef\xbb\xbf \t\r\n"):
            head = f.read(4096)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


class _TextWindow:
    """A window on a text stream: ``text[pos:]`` is unread; ``lines`` counts the newlines already dropped."""

    _WS = re.compile(r"[ \t\r\n]*")

    def __init__(self, f):
        self.f, self.text, self.pos, self.eof, self.lines = f, "", 0, False, 0

    def want(self, n: int) -> None:
        """At least ``n`` unread characters (fewer only at the end): drop what was read, read more."""
        if len(self.text) - self.pos >= n or self.eof:
            return
        self.lines += self.text.count("\n", 0, self.pos)
        self.text, self.pos = self.text[self.pos :], 0
        while not self.eof and len(self.text) < n:
            chunk = self.f.read(max(_JSON_CHUNK, n - len(self.text)))
            self.eof = not chunk
            self.text += chunk

    def next_char(self) -> str:
        """The next character after whitespace, not consumed ('' at the end)."""
        while True:
            self.pos = self._WS.match(self.text, self.pos).end()
            if self.pos < len(self.text) or self.eof:
                return self.text[self.pos : self.pos + 1]
            self.want(1)

    def where(self, pos: int) -> str:
        line = self.lines + self.text.count("\n", 0, pos) + 1
        return f"line {line} column {pos - self.text.rfind(chr(10), 0, pos)}"


def iter_json_array(path: str) -> Iterator[RawRecord]:
    """The elements of a file holding one JSON array, parsed one at a time (a multi-gigabyte array is never in
    memory whole).  Elements that are not objects are bad records; a syntax error is a bad file (past it,
    where the elements are cannot be known), naming its line and column."""
    name = os.path.basename(path)
    decoder = json.JSONDecoder()
    item = 0

    def bad(why: str, w: _TextWindow, pos: int) -> DataError:
        return DataError(f"{path}: not a JSON array of objects ({why} at {w.where(pos)})", "bad_file")

    try:
        with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig") as f:
            w = _TextWindow(f)
            if w.next_char() != "[":
                raise bad("expected '['", w, w.pos)
            w.pos += 1
            sep = "]" if w.next_char() == "]" else ","
            while sep == ",":
                w.next_char()
                try:
                    obj, end = decoder.raw_decode(w.text, w.pos)
                except json.JSONDecodeError as e:
                    if w.eof:
                        raise bad(e.msg, w, e.pos) from None
                    w.want(2 * (len(w.text) - w.pos) + _JSON_CHUNK)  # an element the window cuts: widen it
                    continue
                w.pos = end
                loc = f"{name}:item {item}"
                if isinstance(obj, dict):
                    yield RawRecord(loc, obj)
                else:
                    yield RawRecord(loc, None, DataError(f"expected a JSON object, got {_json_type(obj)}"))
                item += 1
                sep = w.next_char()
                if sep not in (",", "]"):
                    raise bad("expected ',' or ']'", w, w.pos)
                w.pos += sep == ","
            w.pos += 1
            if w.next_char():
                raise bad("text after the array", w, w.pos)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}) after item {item}", "bad_file") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read past item {item} ({e})", "bad_file") from None


def _json_type(obj) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")


def iter_json(path: str) -> Iterator[RawRecord]:
    """A ``.json`` file: a JSON array of records, or (as many ``.json`` files are) JSON lines."""
    return iter_json_array(path) if _is_json_array(path) else iter_jsonl(path)


def _iter_table(path: str, shard: str, kind: InputKind, batch_size: int = 256) -> Iterator[RawRecord]:
    """The rows of one Parquet file or Arrow stream file (a ``save_to_disk`` shard), as dicts."""
    pa = _pyarrow(path)
    name = _shard_name(path, shard)
    row = 0
    try:
        with contextlib.ExitStack() as stack:
            if kind == "arrow_dir":
                batches = pa.ipc.open_stream(stack.enter_context(pa.memory_map(shard)))
            else:
                batches = pa.parquet.ParquetFile(shard).iter_batches(batch_size=batch_size)
            for batch in batches:
                for rec in batch.to_pylist():
                    yield RawRecord(f"{name}:row {row}", _strip_none(rec))
                    row += 1
    except (OSError, ValueError) as e:  # a corrupt page / row group (pyarrow's ArrowInvalid is a ValueError)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read past row {row} ({msg})", "bad_file", f"{name}:row {row}") from None


def check_input(path: str) -> None:
    """Raise ``DataError(reason="bad_file")`` naming ``path`` unless it is a readable input.

    Checks, without reading it through: it exists, is a regular file of a known suffix or a folder of a known
    layout, can be opened, and each Parquet / Arrow / gzip file starts with its magic bytes.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: input file does not exist", reason="bad_file")
    if not (os.path.isfile(path) or os.path.isdir(path)):
        raise DataError(f"{path}: input is not a regular file", reason="bad_file")
    kind = input_kind(path)
    for shard in _shards(path, kind):
        _check_magic(shard, kind)


def _check_magic(path: str, kind: InputKind) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"{path}: cannot read the input file ({e.strerror or e})", reason="bad_file") from None
    magic, what = {
        "parquet": ("parquet", "Parquet"),
        "parquet_dir": ("parquet", "Parquet"),
        "arrow_dir": ("arrow", "Arrow stream"),
    }.get(kind, ("gzip", "gzip") if path.lower().endswith(".gz") else (None, None))
    if magic is not None and not head.startswith(_MAGIC[magic]):
        raise DataError(f"{path}: not a {what} file (wrong magic bytes)", reason="bad_file")


def check_inputs(paths: list[str]) -> None:
    """:func:`check_input` on every path, before anything is read or written."""
    if not paths:
        raise DataError("no input file given", reason="bad_file")
    for path in paths:
        check_input(path)


def iter_file_records(path: str) -> Iterator[RawRecord]:
    """All records of one input (a file, or a folder's shards in order)."""
    check_input(path)
    kind = input_kind(path)
    if kind == "jsonl":
        yield from iter_jsonl(path)
    elif kind == "json":
        yield from iter_json(path)
    else:
        for shard in _shards(path, kind):
            yield from _iter_table(path, shard, kind)


def iter_records(paths: list[str]) -> Iterator[RawRecord]:
    """All records of all inputs, in order."""
    for path in paths:
        yield from iter_file_records(path)


def count_records(paths: list[str]) -> int:
    """Number of records (non-empty lines / array elements / rows) for a progress bar's total.

    Every path is checked (:func:`check_inputs`) before any is counted; an input that cannot be read through
    (e.g. a truncated gzip or Parquet file) is a ``DataError(reason="bad_file")`` naming it.  A JSON array is
    parsed through to count it (as fast as reading it); everything else is counted without parsing.
    """
    check_inputs(paths)
    total = 0
    for path in paths:
        try:
            total += _count_input(path)
        except (OSError, EOFError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path}: cannot read the input file ({e})", reason="bad_file") from None
    return total


def _count_input(path: str) -> int:
    kind = input_kind(path)
    if kind == "json" and _is_json_array(path):
        return sum(1 for _ in iter_json_array(path))
    if kind in ("jsonl", "json"):
        with _open_binary(path) as f:
            return sum(1 for line in f if line.strip())
    pa = _pyarrow(path)
    total = 0
    for shard in _shards(path, kind):
        if kind == "arrow_dir":
            with pa.memory_map(shard) as source:
                total += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        else:
            total += pa.parquet.ParquetFile(shard).metadata.num_rows
    return total


def parse_record(rec: RawRecord) -> dict:
    """The record as a dict; JSON syntax errors become ``DataError("file:line: malformed JSON ...")``, a
    line that is not valid UTF-8 ``DataError("file:line: invalid UTF-8 ...", reason="bad_encoding")``, and a
    record found bad while reading raises its error."""
    if rec.error is not None:
        raise rec.error.at(rec.location)
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
