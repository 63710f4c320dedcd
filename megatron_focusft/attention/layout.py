"""The two tensor layouts Megatron hands a core attention, and the one the kernels want.

- ``sbhd`` (padded batch): query/key/value [s, b, heads, d]; the output must be [s, b, heads * d].
- ``thd`` (packed, ``packed_seq_params.qkv_format == "thd"``): Megatron's SelfAttention has squeezed the
  dummy batch dimension (b = 1), so query/key/value are [t, heads, d]; the output must be [t, heads * d].

SDPA and FlexAttention take ``bhsd`` [b, heads, s, d].  Document separation inside a pack comes from the
mask, so the ``cu_seqlens`` of ``packed_seq_params`` are not needed here (Megatron already used them to
restart RoPE positions in every document).
"""

from __future__ import annotations

import torch


def is_thd(packed_seq_params: object | None) -> bool:
    return packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", None) == "thd"


def to_bhsd(t: torch.Tensor, thd: bool) -> torch.Tensor:
    """sbhd [s, b, h, d] or thd [t, h, d] -> bhsd [b, h, s, d] (a view)."""
    if thd:
        if t.dim() != 3:
            raise ValueError(f"thd attention input must be [t, heads, d], got {tuple(t.shape)}")
        return t.permute(1, 0, 2).unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"sbhd attention input must be [s, b, heads, d], got {tuple(t.shape)}")
    return t.permute(1, 2, 0, 3)


def from_bhsd(out: torch.Tensor, thd: bool) -> torch.Tensor:
    """bhsd [b, h, s, d] -> [s, b, h * d] (sbhd) or [t, h * d] (thd)."""
    b, h, s, d = out.shape
    if thd:
        return out[0].permute(1, 0, 2).reshape(s, h * d)
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
