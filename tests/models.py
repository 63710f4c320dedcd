"""Tiny Qwen2 shapes used across the tests (all fp32, a vocabulary that needs padding)."""

from __future__ import annotations

from megatron_focusft.models.qwen2 import Qwen2Arch, tiny_arch


def gqa_arch(ratio: int, tied: bool, vocab_size: int = 999, kv_heads: int = 2) -> Qwen2Arch:
    """A 3-layer model with ``ratio`` query heads per KV head (head dim 16)."""
    heads = ratio * kv_heads
    return tiny_arch(
        num_layers=3,
        hidden_size=16 * heads,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        ffn_hidden_size=96,
        vocab_size=vocab_size,
        tie_word_embeddings=tied,
    )


# (GQA ratio, tied): ratios 1, 3 and 7 (0.5B has 7), tied and untied output layers.
PARITY_CASES = [(1, False), (3, True), (7, False), (7, True)]
