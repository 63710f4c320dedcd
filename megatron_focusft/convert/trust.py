"""Reading a checkpoint folder this process did not write: what may be unpickled, and whether the files are
the ones that were written.

Nothing in a checkpoint folder runs code:

- torch files (``train_state.pt``, the per-rank RNG and CPU optimizer files, Megatron's ``common.pt``, the
  byte items inside ``.distcp`` files) are read with ``weights_only=True``: tensors and plain values, plus the
  numpy array of an RNG state written by older versions (:func:`torch_load`);
- a distributed checkpoint's ``.metadata``, which torch reads with plain ``pickle.load``, is first read by
  :class:`MetadataUnpickler`, which admits only the classes of torch.distributed.checkpoint's metadata
  (:func:`screen_dist_checkpoint`, which also checks ``metadata.json``'s backends, that every storage item lies
  in a file of the folder itself, and that the byte items Megatron's loader would unpickle are plain values).

Corruption: every writer ends with :func:`write_checksums` (``checksums.json``: size and SHA-256 of every file),
every reader starts with :func:`verify_checksums` (sizes always; the hashes unless skipped, for huge
checkpoints: ``checksums=False`` or ``FOCUSFT_VERIFY_CHECKSUMS=0``).  A checkpoint without ``checksums.json``
(written by an older version) loads with a one-time warning.  :func:`check_shapes` compares every tensor's
global shape in the checkpoint with the model's before anything is loaded.

Every refusal is a :class:`CheckpointError` (a ``ConfigError``: one line, naming the file).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from megatron_focusft.models.qwen2 import ConfigError

CHECKSUM_FILE = "checksums.json"
CHECKSUM_VERSION = 1
VERIFY_ENV = "FOCUSFT_VERIFY_CHECKSUMS"  # "0": skip hashing everywhere (sizes, pickles and shapes still checked)
_CHUNK = 8 << 20  # hashing reads 8 MiB at a time
_METADATA = ".metadata"
_COMMON = "common.pt"
# Folders whose every file a reader may open: a file there that checksums.json does not list is refused.
_READ_DIRS = ("model/", "optimizer/", "rank_state/")
_warned: set[str] = set()


class CheckpointError(ConfigError):
    """A checkpoint file that is refused (would run code, is corrupted, or belongs to another model)."""


def checksums_enabled(requested: bool = True) -> bool:
    """Whether to hash files against ``checksums.json``: ``requested`` unless ``FOCUSFT_VERIFY_CHECKSUMS=0``."""
    return requested and os.environ.get(VERIFY_ENV, "1").strip() != "0"


def _rank0() -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        if _rank0():
            print(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- torch files
def _numpy_globals() -> list:
    """What ``np.random.get_state()`` pickles to (older RNG files), under both numpy 1 and numpy 2 names."""
    import numpy as np

    out: list = [np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    out += [(reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [dtypes.UInt32DType, dtypes.Int64DType, dtypes.Float64DType]
    return out


def _refusal(e: BaseException) -> str:
    """The one-line reason of a weights-only unpickling error (torch's message spans paragraphs)."""
    text = str(e)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return f"it would call {found.group(1).rstrip('.')}, which no checkpoint file needs"
    lines = [s.strip() for s in text.splitlines() if s.strip() and "weights_only" not in s and "PyTorch" not in s]
    return lines[0] if lines else type(e).__name__


def torch_load(path: str | Path, *, mmap: bool = False, data: bytes | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` (or of ``data``, bytes read from ``path``): tensors, plain
    values and numpy arrays only.  A file that would load anything else is refused, naming it."""
    source = io.BytesIO(data) if data is not None else path
    try:
        with torch.serialization.safe_globals([*_numpy_globals(), io.BytesIO]):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap if data is None else False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: {_refusal(e)} (a crafted file?); nothing was loaded") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {first})") from None


# --------------------------------------------------------------------------------------------- .metadata
def _metadata_globals() -> frozenset[tuple[str, str]]:
    """(module, name) of everything a torch.distributed.checkpoint ``.metadata`` file written by Megatron-Core
    refers to: the metadata and plan dataclasses and enums, torch.Size, dtypes, the layout and memory-format
    decoders, and Megatron's two (empty) legacy classes."""
    names = {
        "torch.distributed.checkpoint.metadata": (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        ),
        "torch.distributed.checkpoint.planner": (
            "SavePlan",
            "LoadPlan",
            "WriteItem",
            "ReadItem",
            "WriteItemType",
            "LoadItemType",
            "TensorWriteData",
            "BytesIOWriteData",
        ),
        "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "_StoragePrefix", "SerializationFormat"),
        "megatron.core.dist_checkpointing.strategies.torch": ("MCoreMetadata", "MCoreSavePlan"),
        "torch.serialization": ("_get_layout",),
        "torch": ("Size",),
        "collections": ("OrderedDict",),
        "builtins": ("set", "frozenset"),
    }
    allowed = {(module, name) for module, members in names.items() for name in members}
    allowed |= {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    return frozenset(allowed)


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a checkpoint's metadata (:func:`_metadata_globals`)."""

    allowed = _metadata_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"persistent id {pid!r}")


def read_metadata(path: Path) -> Any:
    """The ``Metadata`` of a ``.metadata`` file, read by :class:`MetadataUnpickler` (refused otherwise)."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: it would load {e}, which is no part of a checkpoint's metadata (a crafted file?); "
            "nothing was loaded"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated, corrupted, not a pickle
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: refused: it holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def screen_dist_checkpoint(folder: Path) -> Any:
    """Check a Megatron ``torch_dist`` checkpoint folder before Megatron or torch read it; its ``Metadata``.

    ``metadata.json`` must name the ``torch_dist`` backend (and ``torch`` for the common state where it names
    one); ``.metadata`` is read by :class:`MetadataUnpickler`; every item must lie in a plain file of the
    folder (no ``..``, no storage transforms); ``common.pt`` and every byte item (which torch's loader
    unpickles with ``weights_only=False``) must load with ``weights_only=True``, and a layer's
    ``_extra_state`` must be empty (no FP8 metadata, which TransformerEngine would unpickle)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = Path(folder)
    backends = folder / "metadata.json"
    try:
        config = json.loads(backends.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{backends}: unreadable ({e}); is {folder} a Megatron checkpoint?") from None
    found = (config.get("sharded_backend"), config.get("common_backend")) if isinstance(config, dict) else config
    # megatron-core up to 0.16 writes common_backend "torch"; later versions drop the field (common.pt, checked below)
    if not isinstance(found, tuple) or found[0] != "torch_dist" or found[1] not in ("torch", None):
        raise CheckpointError(
            f"{backends}: refused: backends {found}, where this project reads only Megatron's torch_dist format"
        )
    metadata = read_metadata(folder / _METADATA)
    files: dict[str, Path] = {}
    for index, info in (metadata.storage_data or {}).items():
        rel = str(getattr(info, "relative_path", ""))
        if rel not in files:
            if not rel or rel != Path(rel).name or rel in (".", "..") or not (folder / rel).is_file():
                raise CheckpointError(
                    f"{folder / _METADATA}: refused: item {index.fqn} lies in {rel!r}, not a file of {folder}"
                )
            files[rel] = folder / rel
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{folder / _METADATA}: refused: item {index.fqn} uses storage transforms "
                f"{info.transform_descriptors}, which this project never writes"
            )
    if (folder / _COMMON).exists():
        torch_load(folder / _COMMON, mmap=True)
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn in byte_keys:
            _screen_byte_item(files[info.relative_path], index.fqn, info.offset, info.length)
    return metadata


def _screen_byte_item(path: Path, key: str, offset: int, length: int) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise CheckpointError(f"{path}: truncated (item {key} ends past the end of the file)")
    value = torch_load(path, data=data)  # Megatron stores a list: one entry per shard of the object
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, io.BytesIO):  # TransformerEngine before 1.6 wrapped its state in a torch file
            entry = torch_load(path, data=entry.getvalue())
        empty = entry is None or (isinstance(entry, torch.Tensor) and entry.numel() == 0)
        if key.split("/")[0].endswith("_extra_state") and not empty:
            raise CheckpointError(
                f"{path}: refused: {key} holds {type(entry).__name__} extra state (FP8 metadata that "
                "TransformerEngine would unpickle); this project writes none"
            )


def sharded_shapes(sharded_state_dict: dict) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor of a model's ``sharded_state_dict``, by checkpoint key."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    expected: dict[str, tuple[int, ...]] = {}

    def add(values: Iterable) -> None:
        for v in values:
            if isinstance(v, ShardedTensorFactory):
                add(nested_values(v.build()))
            elif isinstance(v, ShardedTensor):
                expected[v.key] = tuple(v.global_shape)

    add(nested_values(sharded_state_dict))
    return expected


def check_shapes(sharded_state_dict: dict, metadata: Any, folder: Path, other_stages: Iterable[str] = ()) -> None:
    """Every tensor of the model's ``sharded_state_dict`` must be in the checkpoint (``metadata``) with the same
    global shape, and the checkpoint must hold no other tensor (``other_stages``: the keys the other pipeline
    stages load); otherwise an error naming the tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    expected = sharded_shapes(sharded_state_dict)
    stored = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    for key, shape in expected.items():
        if key in stored and stored[key] != shape:
            raise CheckpointError(
                f"{folder}: tensor {key} has shape {list(stored[key])} in the checkpoint but {list(shape)} in the "
                "model (a checkpoint of another model?); nothing was loaded"
            )
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected) - set(other_stages))
    for what, keys in (("lacks", missing), ("has unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise CheckpointError(
                f"{folder}: the checkpoint {what} tensors {', '.join(keys[:3])}{more} (a checkpoint of another "
                "model?); nothing was loaded"
            )


# --------------------------------------------------------------------------------------------- checksums
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, a few files at once (hashlib releases the GIL)."""
    workers = max(1, min(len(paths), 4, os.cpu_count() or 1))
    if workers == 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_sha256, paths))


def _files(ckpt_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(ckpt_dir).as_posix()
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.name not in (CHECKSUM_FILE, f".{CHECKSUM_FILE}.tmp")
    )


def write_checksums(ckpt_dir: Path) -> None:
    """Write ``ckpt_dir/checksums.json``: the size and SHA-256 of every file of the (complete) checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    rels = _files(ckpt_dir)
    paths = [ckpt_dir / r for r in rels]
    digests = _hash_all(paths)
    manifest = {
        "version": CHECKSUM_VERSION,
        "algorithm": "sha256",
        "files": {r: {"size": p.stat().st_size, "sha256": d} for r, p, d in zip(rels, paths, digests)},
    }
    tmp = ckpt_dir / f".{CHECKSUM_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, ckpt_dir / CHECKSUM_FILE)


def _in_parts(rel: str, parts: tuple[str, ...] | None) -> bool:
    return parts is None or any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in parts)


def verify_checksums(ckpt_dir: Path, parts: tuple[str, ...] | None = None, checksums: bool = True) -> bool:
    """Check the files of ``ckpt_dir`` (those under ``parts``: file names or ``folder/`` prefixes; None: all)
    against its ``checksums.json``: every listed file present with its size, no unlisted file where a reader
    looks (``model/``, ``optimizer/``, ``rank_state/``), and, if ``checksums`` (and not turned off by
    ``FOCUSFT_VERIFY_CHECKSUMS=0``), its SHA-256.  False (and a one-time warning) if there is no manifest."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / CHECKSUM_FILE
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint folder")
    if not path.is_file():
        _warn_once(
            str(ckpt_dir.resolve()),
            f"{ckpt_dir} has no {CHECKSUM_FILE} (written by an older version): its files cannot be checked for "
            "corruption",
        )
        return False
    try:
        manifest = json.loads(path.read_text())
        files = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e!r})") from None
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{path}: refused: it lists {rel!r}, which is not a file inside {ckpt_dir}")
    wanted = sorted(r for r in files if _in_parts(r, parts))
    for rel in wanted:
        file = ckpt_dir / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {path}); the checkpoint is incomplete")
        size = file.stat().st_size
        if size != files[rel][0]:
            raise CheckpointError(
                f"{file}: {size} bytes where {CHECKSUM_FILE} records {files[rel][0]}: the file is truncated or "
                "was changed after the checkpoint was written"
            )
    unlisted = [r for r in _files(ckpt_dir) if r not in files and _in_parts(r, parts) and r.startswith(_READ_DIRS)]
    if unlisted:
        raise CheckpointError(f"{ckpt_dir / unlisted[0]}: not in {path} (added after the checkpoint was written)")
    if checksums_enabled(checksums):
        digests = _hash_all([ckpt_dir / r for r in wanted])
        for rel, digest in zip(wanted, digests):
            if digest != files[rel][1]:
                raise CheckpointError(
                    f"{ckpt_dir / rel}: checksum mismatch (sha256 {digest[:16]}..., {CHECKSUM_FILE} records "
                    f"{files[rel][1][:16]}...): the file is corrupted or was changed after the checkpoint was "
                    "written; restore it or use an earlier checkpoint"
                )
    return True


def check_checkpoint(ckpt_dir: Path, parts: tuple[str, ...] | None = None, checksums: bool = True) -> dict:
    """Everything a reader checks before any file of ``ckpt_dir`` (under ``parts``) is loaded: the checksums
    (:func:`verify_checksums`), every distributed checkpoint folder (:func:`screen_dist_checkpoint`) and every
    other torch file (:func:`torch_load`, memory-mapped: no tensor data is read).  The ``Metadata`` of each
    distributed checkpoint folder, by its path relative to ``ckpt_dir`` (e.g. ``model``)."""
    ckpt_dir = Path(ckpt_dir)
    verify_checksums(ckpt_dir, parts, checksums)
    rels = [r for r in _files(ckpt_dir) if _in_parts(r, parts)]
    dist_dirs = sorted({Path(r).parent.as_posix() for r in rels if Path(r).name == _METADATA})
    screened = {d: screen_dist_checkpoint(ckpt_dir / d) for d in dist_dirs}
    for rel in rels:
        if rel.endswith(".pt") and Path(rel).parent.as_posix() not in screened:
            torch_load(ckpt_dir / rel, mmap=True)
    return screened
