"""Core-attention backends plugged into the layer spec, selected by ``--attention-backend``.

- ``flex``: FlexAttention with a block-sparse mask (GPU; CPU forward only) -- the training backend;
- ``dense``: SDPA with a bool mask (CPU, tests, the reference);
- ``te``: TransformerEngine fused attention, ``causal`` mode on packed sequences only.

One micro-batch::

    mask = build_attention_mask(backend, inp.document_ids, inp.loss_mask, mode)  # once, shared by every layer
    params = packed_seq_params(inp.cu_seqlens)                                  # packed (thd), b = 1
    logits = model(inp.tokens, inp.position_ids, mask, packed_seq_params=params)

(``inp``: a :class:`megatron_focusft.data.packed_input.PackedInput`.)
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_focusft.masks import MaskInputs, MaskMode

BACKENDS: tuple[str, ...] = ("flex", "dense", "te")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown --attention-backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def core_attention_class(backend: str) -> type:
    """The Megatron core-attention module of ``backend`` (for ``qwen2.layer_spec``)."""
    _check_backend(backend)
    if backend == "dense":
        from megatron_focusft.attention.dense import DenseAttention

        return DenseAttention
    if backend == "flex":
        from megatron_focusft.attention.flex import FlexAttention

        return FlexAttention
    from megatron_focusft.attention import te

    return te.core_attention_class()


def build_attention_mask(
    backend: str,
    document_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: MaskMode,
    *,
    block_size: int | None = None,
    query_index: torch.Tensor | None = None,
) -> object:
    """The ``attention_mask`` every layer of ``backend`` consumes, built once per micro-batch.

    ``document_ids``/``loss_mask``: [b, s] (or [s]); a packed thd micro-batch is b = 1.  ``query_index``:
    the positions of this rank's query rows under context parallelism (default: every position).

    - dense: bool [b, 1, s, s], True = allowed;
    - flex: a ``BlockMask`` (``block_size`` tiles, default 128), never an S x S tensor;
    - te: a marker (TE masks from ``cu_seqlens``); ``glm`` or a missing TransformerEngine is an error.
    """
    _check_backend(backend)
    inputs = MaskInputs(document_ids, loss_mask, mode, query_index)
    if backend == "dense":
        return inputs.dense()[:, None]
    if backend == "flex":
        from megatron_focusft.attention.flex import DEFAULT_BLOCK_SIZE, build_block_mask

        return build_block_mask(inputs, block_size or DEFAULT_BLOCK_SIZE)
    from megatron_focusft.attention import te

    return te.build_mask(inputs)


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """Megatron's ``PackedSeqParams`` (qkv_format thd) for one pack with document boundaries ``cu_seqlens``.

    Megatron's SelfAttention then restarts RoPE positions at every boundary and hands the core attention
    [t, heads, d] tensors.  ``max_seqlen`` must be the longest *segment* (Megatron's unfused thd RoPE
    switches to whole-pack offsets when the RoPE table is exactly as long as the pack).
    """
    cu = cu_seqlens.to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max().item())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
