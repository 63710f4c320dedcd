"""The ``te`` core-attention backend: TransformerEngine's fused attention, ``causal`` mode on packed (thd)
sequences only.

TransformerEngine is imported lazily, inside the functions, so this module imports without it.

Why no ``glm``: TE's fused kernels (cuDNN / flash) know a fixed menu of masks (causal, padding, sliding
window, ...), each given by ``cu_seqlens``.  The glm mask (bidirectional context blocks inside a causal
document) is not on the menu; TE takes an arbitrary mask only through its unfused path, which materialises
[b, heads, s, s] scores: about 57 GB per layer at 32K tokens for Qwen2.5-7B.  Use ``flex`` for ``glm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_focusft.masks import MaskInputs


class TEUnavailableError(RuntimeError):
    """The ``te`` backend was asked for where it cannot run (TE missing, or the glm mask)."""


def require_transformer_engine() -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise TEUnavailableError(
            "--attention-backend te needs TransformerEngine, which is not installed "
            "(pip install 'megatron-focusft[te]' on a CUDA machine); use --attention-backend flex "
            "(GPU) or --attention-backend dense (CPU, tests)"
        ) from None


def check_mode(mode: str) -> None:
    if mode != "causal":
        raise TEUnavailableError(
            f"--attention-backend te supports only --attention-mask causal, not {mode!r}: "
            "TransformerEngine has no fused kernel for the glm mask (bidirectional context blocks), "
            "and its unfused fallback "
            "materialises S x S scores (about 57 GB per layer at 32K tokens for a 7B model); "
            "use --attention-backend flex"
        )


@dataclass(frozen=True)
class TECausalMask:
    """The te backend's ``attention_mask``: nothing to materialise, TE masks from ``cu_seqlens``.

    It only records the check that the batch was built for the te backend in ``causal`` mode.
    """

    seq_len: int


def build_mask(inputs: MaskInputs) -> TECausalMask:
    check_mode(inputs.mode)
    require_transformer_engine()
    if inputs.batch_size != 1:
        raise ValueError("--attention-backend te takes packed (thd) micro-batches of batch size 1")
    return TECausalMask(inputs.seq_len)


def core_attention_class() -> type:
    """Megatron's ``TEDotProductAttention`` fixed to padding-causal attention over a thd pack."""
    require_transformer_engine()
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_focusft.attention.layout import is_thd

    class TECausalAttention(TEDotProductAttention):
        def forward(
            self,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: object,
            attn_mask_type: AttnMaskType | None = None,
            attention_bias: torch.Tensor | None = None,
            packed_seq_params: object | None = None,
        ) -> torch.Tensor:
            if not isinstance(attention_mask, TECausalMask):
                raise TypeError("the te backend needs build_attention_mask('te', ..., mode='causal')")
            if not is_thd(packed_seq_params):
                raise ValueError("the te backend runs packed (thd) batches: pass packed_seq_params")
            # cu_seqlens separate the documents; the padding tail is its own (ignored) segment.
            return super().forward(
                query,
                key,
                value,
                None,
                attn_mask_type=AttnMaskType.padding_causal,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
            )

    return TECausalAttention
