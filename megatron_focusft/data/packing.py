"""Packing documents into long sequences: best-fit-decreasing bins, and the lengths the parallel layout needs.

The packed layout itself (positions, document ids, boundaries, labels) is built by
:class:`megatron_focusft.data.packed_input.PackedInput`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np


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
