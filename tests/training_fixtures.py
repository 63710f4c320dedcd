"""A tiny pretrained checkpoint and a tiny packed dataset for the training tests (random token ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_focusft.data.chat import Document
from megatron_focusft.data.dataset import write_documents
from megatron_focusft.models.qwen2 import tiny_arch
from megatron_focusft.models.random_hf import make_random_hf_checkpoint


def tiny_pretrained(root: Path, **arch_changes) -> Path:
    """HF random tiny Qwen2 (vocab 256, or ``arch_changes``) converted into a megatron_focusft checkpoint at
    ``root/ckpt``."""
    import torch

    from megatron_focusft import runtime
    from megatron_focusft.convert.pipeline import hf_to_megatron

    arch = tiny_arch(**{"vocab_size": 256, "num_layers": 3, **arch_changes})
    make_random_hf_checkpoint(arch, root / "hf", seed=1)
    (root / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 4096}')  # travels with checkpoints
    runtime.launch_cpu_processes(hf_to_megatron, 1, args=(root / "hf", root / "ckpt", torch.float32, False))
    return root / "ckpt"


def tiny_dataset(
    prefix: Path, num_docs: int = 24, pack_length: int = 64, seed: int = 0, meta: dict | None = None
) -> str:
    """Multi-turn documents (context / response blocks) of 10-40 tokens, packed to ``pack_length``;
    ``meta`` goes into ``PREFIX.json`` (e.g. ``{"vocab_size": 256}``)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        blocks = [(0, int(rng.integers(3, 10))), (1, int(rng.integers(2, 8)))] * int(rng.integers(1, 4))
        mask = np.concatenate([np.full(n, v, dtype=np.uint8) for v, n in blocks])
        ids = rng.integers(0, 256, mask.size).astype(np.int32)
        docs.append(Document(ids, mask))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_documents(str(prefix), docs, pack_length, meta)
    return str(prefix)
