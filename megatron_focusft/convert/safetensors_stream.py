"""Reading and writing safetensors files one tensor at a time, with plain file I/O.

``safetensors.safe_open`` memory-maps a file, and every page a conversion touches then counts towards the
process's resident memory: converting a 3 GB checkpoint peaked at twice its size.  Reading a tensor with
``readinto`` and writing each tensor straight after a precomputed header keep the peak at one model copy
plus one tensor.  The format (8-byte little-endian header length, JSON header with dtype, shape and byte
offsets, then the data) is the documented safetensors layout, so ``safetensors`` itself reads our files.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds (name -> dtype, shape, absolute byte range)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    return {
        name: TensorEntry(
            CODE_DTYPES[e["dtype"]],
            tuple(e["shape"]),
            base + e["data_offsets"][0],
            base + e["data_offsets"][1],
        )
        for name, e in header.items()
    }


def read_tensor(path: Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into fresh memory (no memory map)."""
    buf = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(entry.begin)
        if f.readinto(buf.numpy()) != buf.numel():
            raise OSError(f"{path}: file ends inside a tensor (truncated?)")
    return buf.view(entry.dtype).reshape(entry.shape)


class StreamingShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are known before their data."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in plan:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._plan = list(plan)
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._plan[self._next]
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != expected:
            raise RuntimeError(f"tensor {got} written where {expected} was planned")
        if tensor.numel():
            self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._plan):
            raise RuntimeError(f"shard closed after {self._next} of {len(self._plan)} tensors")


def plan_shards(
    tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors (in order) into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    return shards
