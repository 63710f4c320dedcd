"""FLOP and peak-TFLOP/s accounting, shared by training (throughput, MFU), the step-time benchmark and the
pipeline cost model (:mod:`megatron_focusft.pipeline.cost`).

:func:`sft_flops` counts the *SFT-equivalent* matmul FLOPs of a pack: what a standard SFT step on it needs
(6 x tokens x layer parameters, the output layer at response positions, document-causal attention), whatever
the step actually runs.  Its terms are stated once, as forward FLOPs at 2 per multiply-add:
:func:`layer_flops_per_token`, :func:`attention_flops` over :func:`causal_pairs`, :func:`output_layer_flops`.
:func:`peak_tflops` is the GPU's dense bf16 peak for MFU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_focusft.data.packed_input import PackedInput
    from megatron_focusft.models.qwen2 import Qwen2Arch

__all__ = [
    "PEAK_TFLOPS",
    "attention_flops",
    "causal_pairs",
    "layer_flops_per_token",
    "output_layer_flops",
    "peak_tflops",
    "sft_flops",
]

# Dense bf16 peak (no sparsity) of each GPU variant, for MFU: the PCIe and NVL boards run lower clocks.
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H200 NVL": 835.0}


def peak_tflops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The dense bf16 peak of the GPU ``torch.cuda.get_device_name()`` names, None where it is unknown (an
    unlisted variant) or meaningless (the run is not bf16: the peak is bf16's)."""
    if dtype != torch.bfloat16:
        return None
    words = set(re.split(r"[\s_-]+", device_name.upper()))
    if "H100" in words:
        if "PCIE" in words:
            return PEAK_TFLOPS["H100 PCIe"]
        if "NVL" in words:
            return PEAK_TFLOPS["H100 NVL"]
        if "SXM" in words or "SXM5" in words or "HBM3" in words:  # "NVIDIA H100 80GB HBM3" is the SXM board
            return PEAK_TFLOPS["H100 SXM"]
        return None
    if "H200" in words:
        return PEAK_TFLOPS["H200 NVL" if "NVL" in words else "H200"]
    return None


def layer_flops_per_token(arch: Qwen2Arch) -> int:
    """Forward matmul FLOPs of one decoder layer per token, attention scores aside: QKV, the output
    projection and the SwiGLU's gate, up and down."""
    h, ffn, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv = h * (arch.num_attention_heads + 2 * arch.num_key_value_heads) * d
    return 2 * (qkv + arch.num_attention_heads * d * h + 3 * h * ffn)


def causal_pairs(lengths: Iterable[int]) -> int:
    """(query, key) pairs of document-causal attention over documents of ``lengths``: n (n + 1) / 2 each."""
    return sum(n * (n + 1) // 2 for n in lengths)


def attention_flops(arch: Qwen2Arch, pairs: int) -> int:
    """Forward FLOPs of one layer's attention core over ``pairs`` (query, key) pairs: QK^T and PV."""
    return 4 * arch.num_attention_heads * arch.head_dim * pairs


def output_layer_flops(arch: Qwen2Arch, positions: int) -> int:
    """Forward FLOPs of the output layer at ``positions`` (the real vocabulary: padding rows are no work)."""
    return 2 * positions * arch.hidden_size * arch.vocab_size


def sft_flops(arch: Qwen2Arch, inp: PackedInput) -> float:
    """Matmul FLOPs of one standard-SFT step (forward + backward = 3x forward) on ``inp``."""
    lengths = (inp.cu_seqlens[1:] - inp.cu_seqlens[:-1]).long()[inp.segment_documents() >= 0]
    attention = attention_flops(arch, causal_pairs(lengths.tolist()))
    per_layer = inp.num_tokens * layer_flops_per_token(arch) + attention
    return 3.0 * (arch.num_layers * per_layer + output_layer_flops(arch, inp.num_response_tokens))
