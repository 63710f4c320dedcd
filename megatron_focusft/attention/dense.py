"""The ``dense`` core-attention backend: PyTorch SDPA with a boolean mask.

It materialises an S x S mask, so it is the reference (CPU, tests, short sequences), not the backend for
32K-token packs on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.utils.checkpoint import checkpoint

from megatron_focusft.attention.context_parallel import gather_kv
from megatron_focusft.attention.layout import from_bhsd, is_thd, to_bhsd


class DenseAttention(MegatronModule):
    """Megatron core attention computed by ``F.scaled_dot_product_attention``.

    ``attention_mask`` is a bool tensor broadcastable to [b, 1, s, s], True where a query may attend to a
    key (note: the opposite of Megatron's own convention), as built by
    ``megatron_focusft.attention.build_attention_mask("dense", ...)``; or ``None`` for plain causal
    attention over an unpacked batch.  Both Megatron layouts are accepted (sbhd, and thd for packed
    sequences; see :mod:`megatron_focusft.attention.layout`).  Grouped-query attention is passed to SDPA
    as is (``enable_gqa``), K/V are not repeated.
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
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.recompute = recompute  # selective activation recompute (a layer-spec parameter)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("DenseAttention does not take an attention_bias")
        thd = is_thd(packed_seq_params)
        if thd and attention_mask is None:
            raise ValueError(
                "a packed (thd) batch needs its document-aware mask: "
                "pass build_attention_mask('dense', document_ids, loss_mask, mode) as attention_mask"
            )
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError(f"DenseAttention wants a bool mask (True = allowed), got {attention_mask.dtype}")
        if attention_mask is None and self.config.context_parallel_size > 1:
            raise ValueError("under context parallelism DenseAttention needs the mask of this rank's query rows")
        key, value = gather_kv(key, self.config), gather_kv(value, self.config)  # context parallelism
        q, k, v = (to_bhsd(t, thd) for t in (query, key, value))

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask,
                is_causal=attention_mask is None,
                dropout_p=self.dropout_p if self.training else 0.0,
                scale=self.softmax_scale,
                enable_gqa=self.groups_per_partition != self.heads_per_partition,
            )

        if self.recompute and torch.is_grad_enabled():  # selective recompute: keep no S x S probabilities
            out = checkpoint(attend, q, k, v, use_reentrant=False)
        else:
            out = attend(q, k, v)
        return from_bhsd(out, thd)
