"""All-gather-KV context parallelism (as Llama 3 trained past 100K tokens with document masks).

A pack of T tokens is cut into 2 x CP chunks; CP rank i holds chunks i and 2 CP - 1 - i, so that under a
causal-like mask every rank gets the same amount of attention work.  Each rank keeps its own queries and
all-gathers the keys and values of the whole pack (cheap under GQA: Qwen2.5-7B has 4 KV heads); the mask
is evaluated with global positions (``MaskInputs(query_index=...)``).  Backward reduce-scatters dK and dV.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig


def load_balanced_chunks(length: int, cp_size: int, cp_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The global ``(start, end)`` of the two chunks CP rank ``cp_rank`` holds, in its order: chunks
    ``cp_rank`` and ``2 CP - 1 - cp_rank`` of ``2 CP``."""
    if length % (2 * cp_size):
        raise ValueError(f"pack length {length} is not a multiple of 2 x context-parallel size {cp_size}")
    chunk = length // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return (first, first + chunk), (second, second + chunk)


def load_balanced_index(length: int, cp_size: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global positions of the tokens CP rank ``cp_rank`` holds (:func:`load_balanced_chunks`, concatenated)."""
    chunks = load_balanced_chunks(length, cp_size, cp_rank)
    return torch.cat([torch.arange(s, e, device=device) for s, e in chunks])


def _gathered_order(cp_size: int) -> torch.Tensor:
    """For each global chunk, where it sits in the all-gathered [rank 0's two chunks, rank 1's, ...]."""
    owner_slot = {}
    for rank in range(cp_size):
        owner_slot[rank] = 2 * rank
        owner_slot[2 * cp_size - 1 - rank] = 2 * rank + 1
    return torch.tensor([owner_slot[c] for c in range(2 * cp_size)])


def gather_kv(t: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """This rank's keys or values [s_local, b, groups, d] -> the whole pack's [T, b, groups, d] in global
    order (identity without context parallelism).  Backward: reduce-scatter, then back to local order."""
    cp = config.context_parallel_size
    if cp == 1:
        return t
    group = parallel_state.get_context_parallel_group()
    gathered = gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True, group=group)
    chunks = gathered.view(2 * cp, t.shape[0] // 2, *t.shape[1:])
    order = _gathered_order(cp).to(t.device)
    return chunks.index_select(0, order).reshape(-1, *t.shape[1:])
