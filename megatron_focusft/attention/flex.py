"""The ``flex`` core-attention backend: PyTorch FlexAttention with a block-sparse mask.

The :class:`~torch.nn.attention.flex_attention.BlockMask` is built once per micro-batch by
:func:`build_block_mask` from the mask rule in :mod:`megatron_focusft.masks` and shared by every layer and
by the inner and outer passes.  It is built a band of query tiles at a time, so no S x S tensor ever exists
(a band is at most 2**25 booleans, 32 MB); the kernel then evaluates the same rule
(``MaskInputs.mask_mod``) inside the partial tiles only.

On CUDA the kernel is ``torch.compile``-d once per process; on CPU it runs eagerly and PyTorch only supports
the forward pass there (use ``--attention-backend dense`` to train on CPU).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from megatron_focusft.attention.context_parallel import gather_kv
from megatron_focusft.attention.layout import from_bhsd, is_thd, to_bhsd
from megatron_focusft.masks import MaskInputs

DEFAULT_BLOCK_SIZE = 128
# Largest [b, rows, s] band of the mask evaluated at once while building a BlockMask.
_MAX_BAND_ELEMENTS = 1 << 25

_compiled_flex_attention = None


def compiled_flex_attention():
    """``flex_attention`` under ``torch.compile`` (static shapes), built once per process.

    The BlockMask and the per-token tensors its ``mask_mod`` reads are graph inputs, so a new batch of
    the same length reuses the compiled kernel; only a new sequence length compiles again.
    """
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def flex_kernel(device: torch.device):
    """The kernel the backend runs: compiled on CUDA, eager elsewhere (compiling on CPU costs more than
    it saves for the forward-only use FlexAttention has there)."""
    return compiled_flex_attention() if device.type == "cuda" else flex_attention


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tile mask [b, 1, nq, nk] -> (count [b, 1, nq], tile indices [b, 1, nq, nk]) as int32."""
    as_int = blocks.to(torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True)
    return as_int.sum(-1).to(torch.int32), indices.to(torch.int32)


def tile_masks(inputs: MaskInputs, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query tile, key tile) pairs are partially / fully allowed: two bool [b, 1, nq, nk].

    Positions past the end of the queries or keys count as masked (as in ``create_block_mask``), so a
    ragged last tile is never "full".
    """
    b, s, q = inputs.batch_size, inputs.seq_len, inputs.num_queries
    nk, nq = -(-s // block_size), -(-q // block_size)
    padded = nk * block_size
    band_tiles = max(1, _MAX_BAND_ELEMENTS // (b * padded * block_size))
    partial, full = [], []
    for t0 in range(0, nq, band_tiles):
        t1 = min(nq, t0 + band_tiles)
        rows = inputs.rows(t0 * block_size, min(q, t1 * block_size))  # [b, r, s]
        rows = torch.nn.functional.pad(rows, (0, padded - s, 0, (t1 - t0) * block_size - rows.shape[1]))
        tiles = rows.view(b, t1 - t0, block_size, nk, block_size)
        any_ = tiles.any(dim=4).any(dim=2)
        all_ = tiles.all(dim=4).all(dim=2)
        partial.append(any_ & ~all_)
        full.append(all_)
    return torch.cat(partial, 1)[:, None], torch.cat(full, 1)[:, None]


def build_block_mask(inputs: MaskInputs, block_size: int = DEFAULT_BLOCK_SIZE) -> BlockMask:
    """The FlexAttention BlockMask of one micro-batch (heads broadcast), equal to ``create_block_mask``."""
    partial, full = tile_masks(inputs, block_size)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    n = max(partial.shape[-1], partial.shape[-2])
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=inputs.mask_mod(pad_to=n * block_size),
        seq_lengths=(inputs.num_queries, inputs.seq_len),
    )


class FlexAttention(MegatronModule):
    """Megatron core attention computed by FlexAttention with a prebuilt :class:`BlockMask`.

    ``attention_mask`` is the BlockMask from ``build_attention_mask("flex", ...)`` (batch size b, or 1 for
    a packed thd batch).  Layouts as in :mod:`megatron_focusft.attention.layout`.  GQA is native
    (``enable_gqa``): K/V are not repeated.  No attention dropout (FocuSFT and Qwen2.5 use none).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        recompute: bool = False,
        **_: object,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"the flex attention backend has no attention dropout (got {dropout})")
        tp = config.tensor_model_parallel_size
        self.enable_gqa = divide(config.num_attention_heads, tp) != divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale
        self.recompute = recompute  # selective activation recompute (a layer-spec parameter)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: BlockMask,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("FlexAttention does not take an attention_bias")
        if not isinstance(attention_mask, BlockMask):
            raise TypeError(
                "the flex backend needs the BlockMask from build_attention_mask('flex', ...), "
                f"got {type(attention_mask).__name__}"
            )
        thd = is_thd(packed_seq_params)
        key, value = gather_kv(key, self.config), gather_kv(value, self.config)  # context parallelism
        q, k, v = (to_bhsd(t, thd) for t in (query, key, value))
        if tuple(attention_mask.seq_lengths) != (q.shape[2], k.shape[2]):
            raise ValueError(
                f"BlockMask built for {tuple(attention_mask.seq_lengths)} tokens, attention sees {q.shape[2]}"
            )
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise NotImplementedError(
                "PyTorch's FlexAttention has no backward pass on CPU: run the flex backend on CUDA, "
                "under torch.no_grad(), or use --attention-backend dense"
            )

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return flex_kernel(q.device)(
                q, k, v, block_mask=attention_mask, scale=self.softmax_scale, enable_gqa=self.enable_gqa
            )

        if self.recompute and torch.is_grad_enabled():  # selective recompute: keep no output, no logsumexp
            out = checkpoint(attend, q, k, v, use_reentrant=False)
        else:
            out = attend(q, k, v)
        return from_bhsd(out, thd)
