"""RMSNorm that works with sequence parallelism and matches Hugging Face Qwen2 to the last bit.

Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism, and its fused norms need apex or
TransformerEngine.  This one computes in fp32 exactly as ``Qwen2RMSNorm`` does and marks its weight
``sequence_parallel`` so that Megatron's gradient finalisation all-reduces it over the TP group (each TP
rank only sees its own slice of the sequence under SP).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``y = w * (x / sqrt(mean(x^2) + eps))``, with the statistics in fp32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_param_device(config))
        )
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _param_device(config: TransformerConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
