"""Randomly initialised Hugging Face Qwen2 checkpoints (no weights can be downloaded in tests or CI).

Every tensor gets a non-trivial random value (biases and norm weights too, which ``transformers`` would set
to 0 and 1), so that a layout mistake in a converter changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_focusft.models.qwen2 import Qwen2Arch


def make_random_hf_checkpoint(
    arch: Qwen2Arch,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "2GB",
) -> Path:
    """Write a random ``Qwen2ForCausalLM`` of shape ``arch`` to ``out_dir`` with ``save_pretrained``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{k: v for k, v in arch.to_hf_config().items() if k not in ("architectures",)})
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, arch.initializer_range * (2.0 if name.endswith("bias") else 1.0))
    model = model.to(dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    return out_dir
