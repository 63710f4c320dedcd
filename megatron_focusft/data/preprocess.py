"""Conversation files -> packed dataset on disk, with counts of everything skipped and why.

Stages: read records (main process) -> render + tokenize (``workers`` processes, order kept) -> stage the
documents in a temporary indexed dataset -> best-fit-decreasing on the lengths -> write the packs
(:func:`megatron_focusft.data.dataset.write_packs`).  Nothing is left under the output prefix on failure.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import numpy as np

from .chat import ChatEncoder, Document, Qwen25Renderer, builtin_renderer_warning, unexpected_error
from .dataset import DocumentStore, dataset_files, write_packs
from .errors import DataError
from .formats import FORMATS, FieldNames, RecordFormat, detect_format
from .packing import best_fit_decreasing, packing_efficiency
from .reading import RawRecord, check_inputs, count_records, iter_file_records, parse_record
from .tokenizer import added_token_warning, load_tokenizer

MAX_REPORTED_ERRORS = 20


@dataclass
class PreprocessConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    pack_length: int
    workers: int = 1
    on_error: str = "skip"  # skip | fail
    overlong: str = "drop"  # drop | truncate | error
    loss_on: str = "all"  # all | last
    renderer: str = "auto"  # auto | template | qwen2.5
    added_tokens: str | None = None  # file | qwen2.5; None: file, with a warning where it may not fit the model
    model_vocab_size: int | None = None  # tokens of the model's own tokenizer, when known (for that warning)
    fields: FieldNames = field(default_factory=FieldNames)
    record_format: str = "auto"  # auto (per input, from its first records) | openai | sharegpt | swift | alpaca
    progress: bool = True
    chunk_size: int = 32
    overwrite: bool = True  # False: refuse (DataError reason "exists") when a dataset is already at ``out``


@dataclass
class Stats:
    conversations_read: int = 0
    conversations_emitted: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    first_skipped: dict = field(default_factory=dict)  # reason -> location of its first skipped record
    errors: list = field(default_factory=list)  # the first messages, "file:line: ..."
    truncated: int = 0
    tokens: int = 0
    response_tokens: int = 0
    packs: int = 0
    pack_length: int = 0
    packing_efficiency: float = 0.0
    response_fraction: float = 0.0
    seconds: float = 0.0  # reading, tokenizing and packing (not the final write of the packs)
    tokens_per_second: float = 0.0
    workers: int = 1
    formats: dict = field(default_factory=dict)  # input -> record format (and "(detected)" when it was)
    warnings: list = field(default_factory=list)  # said once before the run (see start_warnings)

    def to_dict(self) -> dict:
        return asdict(self)


def format_summary(s: Stats) -> str:
    skipped = sum(s.skipped.values())
    lines = [
        *(f"format                 {fmt}  {path}" for path, fmt in s.formats.items()),
        f"conversations read     {s.conversations_read}",
        f"conversations emitted  {s.conversations_emitted} ({s.truncated} truncated)",
        f"conversations skipped  {skipped}"
        + ("  (" + ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())) + ")" if skipped else ""),
        f"tokens                 {s.tokens} (response fraction {s.response_fraction:.3f})",
        f"packs                  {s.packs} x {s.pack_length} tokens",
        f"packing efficiency     {100 * s.packing_efficiency:.2f}% (real tokens / all tokens)",
        f"time                   {s.seconds:.1f} s "
        f"({s.tokens_per_second / max(1, s.workers):,.0f} tokens/s per worker)",
        *(
            [f"warnings               {len(s.warnings)} (printed before the run; in the stats too)"]
            if s.warnings
            else []
        ),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- workers
_ENCODER: ChatEncoder | None = None


def _make_encoder(cfg: PreprocessConfig) -> ChatEncoder:
    tok = load_tokenizer(cfg.tokenizer, added_tokens=cfg.added_tokens or "file")
    return ChatEncoder(
        tok,
        renderer=cfg.renderer,
        loss_on=cfg.loss_on,
        max_length=cfg.pack_length,
        overlong=cfg.overlong,
        fields=cfg.fields,
    )


def _init_worker(cfg: PreprocessConfig) -> None:
    global _ENCODER
    _ENCODER = _make_encoder(cfg)


def encode_records(records: list[tuple[RecordFormat, RawRecord]], encoder: ChatEncoder | None = None):
    """[(location, Document | DataError)] for a chunk of (record format, raw record) (run in a worker)."""
    enc = encoder or _ENCODER
    out = []
    for record_format, rec in records:
        try:
            record = parse_record(rec)
            rec.raw = None  # the line as read is not needed any more (a huge one is one copy fewer in memory)
            out.append((rec.location, enc.encode(record, rec.location, record_format)))
            del record
        except DataError as e:
            out.append((rec.location, e.at(rec.location)))
        except MemoryError:
            raise
        except Exception as e:  # e.g. a RecursionError from json.loads on absurdly nested input
            out.append((rec.location, unexpected_error(e, rec.location)))
    return out


def _chunks(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# --------------------------------------------------------------------------------------------- driver
def preprocess(cfg: PreprocessConfig, log=print) -> Stats:
    """Run the whole preprocessing; raises :class:`DataError` under ``on_error="fail"`` (nothing written).
    ``log`` gets the warnings (:func:`start_warnings`), once, before the records are read."""
    if cfg.on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be skip or fail, got {cfg.on_error!r}")
    t0 = time.perf_counter()
    check_inputs(cfg.inputs)  # every input, before anything is loaded, read or written
    check_output(cfg.out, cfg.overwrite)
    formats = input_formats(cfg)
    encoder = _make_encoder(cfg)  # fails early on a bad tokenizer folder / options
    warnings = start_warnings(cfg, encoder)
    for message in warnings:
        log(f"warning: {message}")
    out_dir = os.path.dirname(os.path.abspath(cfg.out))
    with _writing(out_dir):  # fails early, before the inputs are read, on a folder that cannot be written
        os.makedirs(out_dir, exist_ok=True)
        stage_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(cfg.out)}.stage-", dir=out_dir)
    stage = None
    try:
        total = count_records(cfg.inputs)
        stats = Stats(pack_length=cfg.pack_length, workers=cfg.workers, warnings=warnings)
        stats.formats = {path: fmt + (" (detected)" if cfg.record_format == "auto" else "") for path, fmt in formats}
        with _writing(out_dir):
            stage = DocumentStore(os.path.join(stage_dir, "docs"))
            with _encoded_chunks(cfg, encoder, formats) as results:
                _stage_documents(results, stage, stats, cfg, total, t0)
                stage.finalize()
        if stats.conversations_emitted == 0:
            raise DataError(_nothing_left(stats), "empty")
        bins = best_fit_decreasing(np.asarray(stage.lengths), cfg.pack_length)
        stats.packs = len(bins)
        stats.packing_efficiency = packing_efficiency(stats.tokens, len(bins), cfg.pack_length)
        stats.response_fraction = stats.response_tokens / max(1, stats.tokens)
        meta = _pack_metadata(cfg, encoder, formats)
        # The timing goes into OUT.json, so it is taken before the packs are written (that last copy is
        # not counted); the returned stats (--stats-json, the summary) are the very same numbers.
        stats.seconds = time.perf_counter() - t0
        stats.tokens_per_second = stats.tokens / max(1e-9, stats.seconds)
        with _writing(out_dir):
            write_packs(cfg.out, stage.documents(), bins, {**meta, "stats": stats.to_dict()})
        return stats
    finally:
        if stage is not None:
            stage.close()
        shutil.rmtree(stage_dir, ignore_errors=True)


def start_warnings(cfg: PreprocessConfig, encoder: ChatEncoder) -> list[str]:
    """What the run does that the user may not expect, said once (not per worker or record): the built-in
    renderer standing in for a missing chat template, and added tokens the model may not have."""
    out = []
    if cfg.renderer == "auto" and isinstance(encoder.renderer, Qwen25Renderer):
        out.append(builtin_renderer_warning(encoder.tokenizer))
    if cfg.added_tokens is None or cfg.model_vocab_size is not None:
        message = added_token_warning(encoder.tokenizer, cfg.model_vocab_size)
        out += [message] if message else []
    return out


def input_formats(cfg: PreprocessConfig) -> list[tuple[str, RecordFormat]]:
    """(input, record format) for every input: ``cfg.record_format``, or under ``auto`` each input's own
    (:func:`~megatron_focusft.data.formats.detect_format`; a layout it cannot tell is a ``bad_file`` error)."""
    if cfg.record_format == "auto":
        return [(path, detect_format(path, cfg.fields)) for path in cfg.inputs]
    if cfg.record_format not in FORMATS:
        raise ValueError(f"record_format must be auto or one of {', '.join(FORMATS)}, got {cfg.record_format!r}")
    return [(path, cfg.record_format) for path in cfg.inputs]


def check_output(prefix: str, overwrite: bool) -> None:
    """Refuse, before any work, an output prefix that cannot be written: a dataset file already there unless
    ``overwrite`` (``DataError(reason="exists")``, naming the files), a folder where a dataset file goes, or an
    output folder (its nearest existing parent when it is still to be made) that is not a writable folder
    (``reason="write_failed"``)."""
    existing = [p for p in dataset_files(prefix) if os.path.lexists(p)]
    for p in existing:
        if os.path.isdir(p):
            raise DataError(f"{p}: a folder is where a file of the dataset goes", "write_failed")
    if existing and not overwrite:
        names = ", ".join(os.path.basename(p) for p in existing)
        raise DataError(f"{prefix}: a dataset is already there ({names}); --overwrite replaces it", "exists")
    folder = os.path.dirname(os.path.abspath(prefix))
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder, so the dataset cannot be written under it", "write_failed")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: the output folder is not writable", "write_failed")


def _os_reason(e: OSError) -> str:
    if e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextlib.contextmanager
def _writing(folder: str):
    """An ``OSError`` while writing (a read-only or full disk, a file over the size limit) as one
    ``DataError(reason="write_failed")`` naming the output folder, instead of a traceback."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{folder}: cannot write the dataset there ({_os_reason(e)})", "write_failed") from None


@contextlib.contextmanager
def _encoded_chunks(cfg: PreprocessConfig, encoder: ChatEncoder, formats: list[tuple[str, RecordFormat]]):
    """The records of every (input, record format) encoded chunk by chunk, in order: by ``cfg.workers``
    processes, or here with ``encoder``."""
    records = ((fmt, rec) for path, fmt in formats for rec in iter_file_records(path))
    chunks = _chunks(records, cfg.chunk_size)
    if cfg.workers <= 1:
        yield (encode_records(c, encoder) for c in chunks)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # forkserver, not fork: the caller may hold threads (torch's, a tokenizer's, a test runner's) whose locks a
    # forked child inherits held.  An executor, not multiprocessing.Pool: a worker that dies (killed, out of
    # memory) or whose set-up fails is an error here, where a Pool waits for its lost chunk forever.
    with ProcessPoolExecutor(
        cfg.workers, mp_context=mp.get_context("forkserver"), initializer=_init_worker, initargs=(cfg,)
    ) as pool:
        try:
            yield _in_order(pool, encode_records, chunks, window=4 * cfg.workers)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _in_order(pool: ProcessPoolExecutor, fn, chunks, window: int):
    """``fn`` (``encode_records``) of every chunk by ``pool``, in order, with at most ``window`` chunks in flight (so
    the input is read as it is encoded, never all at once)."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.submit(fn, chunk))
        if len(pending) >= window:
            yield _result(pending.popleft())
    while pending:
        yield _result(pending.popleft())


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise DataError(
            "a preprocessing worker died (killed, out of memory, or its tokenizer failed to load); "
            "rerun with --workers 1 to see the error in this process",
            "worker_died",
        ) from None


def _stage_documents(results, stage: DocumentStore, stats: Stats, cfg: PreprocessConfig, total: int, t0: float):
    """Every encoded document into ``stage``, counted in ``stats`` with the skipped ones and their first
    errors; under ``on_error="fail"`` the first error (other than a deliberately dropped or truncated
    overlong conversation) is raised."""
    from tqdm import tqdm

    skipped: Counter = Counter()
    bar = tqdm(total=total, unit="conv", disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5)
    try:
        for chunk in results:
            for _location, item in chunk:
                _count(item, stage, stats, skipped, cfg)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{stats.tokens / max(1e-9, time.perf_counter() - t0):,.0f}", refresh=False)
    finally:
        bar.close()  # on an error too: end the bar's line, so the error message starts on its own
    stats.skipped = dict(skipped)


def _count(item: Document | DataError, stage: DocumentStore, stats: Stats, skipped: Counter, cfg: PreprocessConfig):
    stats.conversations_read += 1
    if isinstance(item, Document):
        stage.add(item)
        stats.conversations_emitted += 1
        stats.truncated += int(item.truncated)
        stats.tokens += len(item)
        stats.response_tokens += item.num_loss_tokens
        return
    deliberate = item.reason == "too_long" and cfg.overlong in ("drop", "truncate")
    if cfg.on_error == "fail" and not deliberate:
        raise item
    skipped[item.reason] += 1
    stats.first_skipped.setdefault(item.reason, item.location)
    if len(stats.errors) < MAX_REPORTED_ERRORS:
        stats.errors.append(str(item))


def _nothing_left(stats: Stats) -> str:
    """Why there is nothing to write: every skip reason with its count and the first record it skipped."""
    if stats.conversations_read == 0:
        return "no conversation left to write (the inputs hold no records)"
    reasons = "; ".join(
        f"{reason}: {count}, first at {stats.first_skipped.get(reason) or '?'}"
        for reason, count in sorted(stats.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return f"no conversation left to write: all {stats.conversations_read} were skipped ({reasons})"


def _pack_metadata(cfg: PreprocessConfig, encoder: ChatEncoder, formats: list[tuple[str, RecordFormat]]) -> dict:
    """What OUT.json records of how the packs were made (the stats are added to it)."""
    return {
        "pack_length": cfg.pack_length,
        "pad_id": encoder.tokenizer.pad_id,
        "vocab_size": encoder.tokenizer.vocab_size,
        "tokenizer": os.path.abspath(cfg.tokenizer),
        "added_tokens": cfg.added_tokens or "file",
        "renderer": encoder.renderer.name,
        "loss_on": cfg.loss_on,
        "overlong": cfg.overlong,
        "inputs": [os.path.abspath(p) for p in cfg.inputs],
        "formats": [fmt for _, fmt in formats],
    }


def write_stats_json(path: str, stats: Stats) -> None:
    """``stats`` as JSON at ``path``, written under a temporary name and renamed (never a half-written file);
    a failure is a ``DataError(reason="write_failed")`` naming ``path``."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stats.to_dict(), f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise DataError(f"{path}: cannot write the stats file ({_os_reason(e)})", "write_failed") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
