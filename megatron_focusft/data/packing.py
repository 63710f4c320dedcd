"""Packing documents into long sequences: best-fit-decreasing bins, per-document boundaries and positions.

Layout of one :class:`Pack` (all 1-D, length ``S`` = real tokens + padding):

* ``tokens``        int32   the documents' ids back to back, then ``pad_id`` padding
* ``loss_mask``     uint8   1 on response tokens; 0 on context and padding
* ``position_ids``  int32   0, 1, ... restarting at 0 in every document (and in the padding segment)
* ``document_ids``  int32   0, 1, ... per document in this pack; -1 on padding
* ``block_ids``     int32   context/response blocks, restarting at 0 in every document; -1 on padding
* ``cu_seqlens``    int32   [0, end_0, ..., S]: document boundaries, the padding as its own last segment
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .chat import blocks_from_loss_mask


def pad_multiple(tensor_parallel: int = 1, context_parallel: int = 1, sequence_parallel: bool = False) -> int:
    """The multiple a packed sequence length must be for the parallel layout.

    Context parallelism splits a sequence into ``2 * CP`` chunks (load balancing); sequence parallelism splits
    it over the ``TP`` ranks.  With both: ``lcm(2 * CP, TP)``.
    """
    m = 2 * context_parallel if context_parallel > 1 else 1
    if sequence_parallel and tensor_parallel > 1:
        m = math.lcm(m, tensor_parallel)
    return m


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of document indices, each bin's total length <= ``capacity``.

    Documents are taken longest first (ties: lower index first) and each goes to the fullest bin it still
    fits in (ties: the older bin), else to a new bin.  Deterministic.  Raises ``ValueError`` when a document
    is longer than ``capacity``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError(f"a document of {int(lengths.max())} tokens does not fit in {capacity}")
    if lengths.size and int(lengths.min()) <= 0:
        raise ValueError("documents must have at least one token")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    # Sorted keys remaining * stride + bin: the first key >= length * stride is the best fit.
    stride = 1 << 32
    keys: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(keys, n * stride)
        if j < len(keys):
            key = keys.pop(j)
            b, rem = key % stride, key // stride
            bins[b].append(i)
        else:
            b, rem = len(bins), capacity
            bins.append([i])
        rem -= n
        if rem > 0:
            bisect.insort(keys, rem * stride + b)
    return bins


def packing_efficiency(total_real_tokens: int, num_packs: int, pack_length: int) -> float:
    """Real tokens / all tokens when every pack is padded to ``pack_length``."""
    return total_real_tokens / max(1, num_packs * pack_length)


@dataclass
class Pack:
    """One packed sequence (see the module docstring for the layout)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray
    block_ids: np.ndarray
    cu_seqlens: np.ndarray
    num_real_tokens: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_ids.max()) + 1 if self.num_real_tokens else 0

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.cu_seqlens)[: self.num_documents]


def make_pack(
    input_ids: Sequence[np.ndarray],
    loss_masks: Sequence[np.ndarray],
    block_ids: Sequence[np.ndarray] | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
) -> Pack:
    """Concatenate documents into one :class:`Pack`, padded to ``pad_to`` tokens when given."""
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    real = int(lengths.sum())
    total = real if pad_to is None else pad_to
    if total < real:
        raise ValueError(f"{real} tokens do not fit in a pack of {pad_to}")
    n_pad = total - real
    seg_lengths = np.concatenate([lengths, [n_pad]]) if n_pad else lengths
    cu = np.zeros(len(seg_lengths) + 1, dtype=np.int32)
    np.cumsum(seg_lengths, out=cu[1:])
    seg_starts = np.repeat(cu[:-1], seg_lengths)
    position_ids = (np.arange(total, dtype=np.int64) - seg_starts).astype(np.int32)

    tokens = np.full(total, pad_id, dtype=np.int32)
    loss = np.zeros(total, dtype=np.uint8)
    blocks = np.full(total, -1, dtype=np.int32)
    doc_ids = np.full(total, -1, dtype=np.int32)
    if real:
        tokens[:real] = np.concatenate(input_ids)
        loss[:real] = np.concatenate(loss_masks)
        if block_ids is None:
            block_ids = [blocks_from_loss_mask(np.asarray(m)) for m in loss_masks]
        blocks[:real] = np.concatenate(block_ids)
        doc_ids[:real] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return Pack(tokens, loss, position_ids, doc_ids, blocks, cu, real)
