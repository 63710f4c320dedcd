"""Attention probabilities out of the Megatron model, chunk by chunk, without an S x S x heads tensor.

:class:`ProbeAttention` is a core-attention module for the layer spec (``build_model(arch, ProbeAttention)``).
Given an ordinary bool mask (or ``None``) it *is* :class:`~megatron_focusft.attention.dense.DenseAttention`.
Given an :class:`AttentionProbe` as ``attention_mask`` it computes the same attention in chunks of query
rows -- ``softmax(q[a:e] @ k^T * scale)`` with the mask rows ``MaskInputs.rows(a, e)`` -- and hands every
chunk of probabilities ``[heads, e - a, s]`` to the probe, which keeps only per-layer sums.  Peak extra
memory is one chunk (``chunk_elements`` floats), so a 32K sequence is analysed on the same footing as a
1K one.

Under tensor parallelism each rank holds ``heads / tp`` heads: the probe's per-head sums are all-reduced
over the TP group in :meth:`AttentionProbe.finish` and divided by the total number of heads.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_focusft.analysis.attention_stats import (
    CATEGORIES,
    LayerSums,
    key_categories,
    position_bins,
    sample_stats,
)
from megatron_focusft.attention.dense import DenseAttention
from megatron_focusft.attention.layout import from_bhsd, is_thd, to_bhsd
from megatron_focusft.masks import MaskInputs, MaskMode

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # floats per chunk of probabilities (128 MiB in fp32)


class AttentionProbe:
    """What one analysed forward pass records, passed to the model as its ``attention_mask``.

    One sample (batch size 1): ``input_ids``-aligned ``roles`` (see
    :func:`~megatron_focusft.analysis.attention_stats.token_roles`) and ``loss_mask`` [s] (response
    queries), the mask ``mode``.  ``heatmap_layer`` (0-based): also pool that layer's head-summed attention
    onto a ``grid`` x ``grid`` picture (mean over the queries of a row bin, sum over the keys of a
    column bin).
    """

    def __init__(
        self,
        roles: torch.Tensor,
        loss_mask: torch.Tensor,
        mode: MaskMode,
        bins: int = 32,
        heatmap_layer: int | None = None,
        grid: int = 128,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        loss_mask = torch.as_tensor(loss_mask).reshape(-1)
        s = loss_mask.numel()
        self.mask = MaskInputs(torch.zeros(s, dtype=torch.long), loss_mask.long(), mode)
        self.query_mask = loss_mask.bool()
        if not self.query_mask.any():
            raise ValueError("the sample has no response token (loss_mask is all 0): nothing to analyse")
        self.categories = key_categories(torch.as_tensor(roles).reshape(-1))
        self.n_bins = bins
        self.bins = position_bins(s, bins)
        self.heatmap_layer = heatmap_layer
        self.grid = min(grid, s)
        self.grid_index = position_bins(s, self.grid)
        self.chunk_elements = chunk_elements
        self.sums: dict[int, LayerSums] = {}
        self.heatmap_rows = torch.zeros(self.grid, dtype=torch.float64)
        self.local_heads: int | None = None

    @property
    def seq_len(self) -> int:
        return self.mask.seq_len

    def chunk_rows(self, heads: int) -> int:
        return max(1, self.chunk_elements // (heads * self.seq_len))

    def record(self, layer: int, probs: torch.Tensor, start: int) -> None:
        """Add the probabilities ``probs`` [heads, rows, s] of query rows ``start:start + rows``."""
        heads, rows, _ = probs.shape
        self.local_heads = heads
        qm = self.query_mask[start : start + rows]
        part = sample_stats(probs, qm, self.categories, self.bins, self.n_bins)
        acc = self.sums.get(layer)
        if acc is None:
            acc = self.sums[layer] = LayerSums(torch.zeros_like(part.category), torch.zeros_like(part.profile))
        acc.category += part.category
        acc.profile += part.profile
        if layer == self.heatmap_layer:
            if acc.heatmap is None:
                acc.heatmap = torch.zeros(self.grid, self.grid, dtype=torch.float64)
            by_key = torch.zeros(rows, self.grid, dtype=torch.float64)
            by_key.index_add_(1, self.grid_index, probs.to(torch.float64).sum(0).cpu())
            qbin = self.grid_index[start : start + rows]
            acc.heatmap.index_add_(0, qbin, by_key)
            self.heatmap_rows.index_add_(0, qbin, torch.ones(rows, dtype=torch.float64))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(category [layers, n_categories], profile [layers, bins], heatmap [grid, grid] or None).

        Sums over this rank's heads are all-reduced over the tensor-parallel group, then divided by the
        total number of heads and the number of response queries.  Collective under TP.
        """
        if not self.sums:
            raise RuntimeError("the probe recorded nothing: was the model built with ProbeAttention?")
        layers = sorted(self.sums)
        category = torch.stack([self.sums[i].category for i in layers])
        profile = torch.stack([self.sums[i].profile for i in layers])
        heat = self.sums[self.heatmap_layer].heatmap if self.heatmap_layer in self.sums else None
        heads = self.local_heads
        tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        tp = dist.get_world_size(tp_group) if dist.is_initialized() and tp_group is not None else 1
        if tp > 1:
            flat = [category, profile] + ([heat] if heat is not None else [])
            packed = torch.cat([t.reshape(-1) for t in flat])
            dist.all_reduce(packed, group=tp_group)
            n_cat, n_prof = category.numel(), profile.numel()
            category = packed[:n_cat].view_as(category)
            profile = packed[n_cat : n_cat + n_prof].view_as(profile)
            if heat is not None:
                heat = packed[n_cat + n_prof :].view_as(heat)
        total_heads = heads * tp
        n_queries = int(self.query_mask.sum())
        category = category / (total_heads * n_queries)
        profile = profile / (total_heads * n_queries)
        if heat is not None:
            heat = heat / (total_heads * self.heatmap_rows.clamp(min=1)[:, None])
        return category, profile, heat


class ProbeAttention(DenseAttention):
    """DenseAttention that, handed an :class:`AttentionProbe`, computes chunk by chunk and records.

    The output equals DenseAttention's (same mask rule, fp32 softmax).  Both Megatron layouts (sbhd, thd)
    are accepted; the probe path needs batch size 1.
    """

    def __init__(self, config, layer_number: int, *args, **kwargs) -> None:
        super().__init__(config, layer_number, *args, **kwargs)
        self.layer_number = layer_number

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if not isinstance(attention_mask, AttentionProbe):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        probe = attention_mask
        thd = is_thd(packed_seq_params)
        q, k, v = (to_bhsd(t, thd) for t in (query, key, value))
        b, heads, s, d = q.shape
        if b != 1 or s != probe.seq_len:
            raise ValueError(f"the probe analyses one sequence of {probe.seq_len} tokens, got {b} x {s}")
        if k.shape[1] != heads:  # grouped-query attention: each KV head serves heads / groups query heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(d)
        out = torch.empty_like(q)
        chunk = probe.chunk_rows(heads)
        kt = k[0].transpose(-1, -2).float()
        vf = v[0].float()  # once per layer, not once per query chunk
        for a in range(0, s, chunk):
            e = min(s, a + chunk)
            scores = torch.matmul(q[0, :, a:e].float(), kt) * scale  # [heads, rows, s]
            allowed = probe.mask.rows(a, e)[0].to(q.device)  # [rows, s]
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            out[0, :, a:e] = torch.matmul(probs, vf).to(out.dtype)
            probe.record(self.layer_number - 1, probs, a)
        return from_bhsd(out, thd)


def decoder_hidden_states(model, tokens: torch.Tensor, attention_mask) -> torch.Tensor:
    """Run the embedding and the decoder of a Megatron ``GPTModel`` (no output layer: no S x vocab logits).

    ``tokens`` [1, s]; positions 0..s-1 (RoPE).  Returns the final hidden states [s, 1, hidden].
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    decoder_input = model.embedding(input_ids=tokens, position_ids=positions)
    rotary = model.rotary_pos_emb(tokens.shape[1])
    return model.decoder(hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=rotary)


__all__ = [
    "CATEGORIES",
    "AttentionProbe",
    "ProbeAttention",
    "decoder_hidden_states",
]
