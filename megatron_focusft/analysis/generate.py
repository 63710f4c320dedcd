"""Greedy decoding with the Megatron model (KV cache through Megatron's static inference context, prompt
prefilled in chunks) or with a Hugging Face model (``transformers.generate``).

Megatron's ``SelfAttention`` keeps the keys/values of every layer in a ``StaticInferenceContext`` and hands
the core attention the queries of the new tokens with *all* cached keys; RoPE positions come from the
context's ``sequence_len_offset``.  The core attention must then align the causal mask to the bottom right
(query ``i`` of a chunk sees the keys up to ``offset + i``): :class:`CachedAttention` does that;
DenseAttention's ``is_causal`` would align it to the top left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megatron_focusft.attention.dense import DenseAttention
from megatron_focusft.attention.layout import from_bhsd, is_thd, to_bhsd


class CachedAttention(DenseAttention):
    """DenseAttention that also serves KV-cached inference: with no mask and fewer queries than keys, query
    ``i`` attends to keys ``0 .. (keys - queries) + i`` (the new tokens come last)."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_mask is not None or query.shape[0] == key.shape[0]:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        thd = is_thd(packed_seq_params)
        q, k, v = (to_bhsd(t, thd) for t in (query, key, value))
        out = lower_right_causal_attention(q, k, v, self.softmax_scale)
        return from_bhsd(out, thd)


def lower_right_causal_attention(q, k, v, scale: float | None = None):
    """SDPA of ``q`` [b, hq, sq, d] on ``k``/``v`` [b, hk, sk, d] (``hq`` a multiple of ``hk``, sq <= sk) with
    the causal mask aligned to the bottom right: query ``i`` sees keys ``0 .. (sk - sq) + i``.

    Mask-free: the mask is ``torch.nn.attention.bias.causal_lower_right``, which SDPA serves with the flash /
    memory-efficient kernels.  A tensor mask (or ``enable_gqa`` with the bias, which those kernels may
    refuse) would send a long prefill chunk to the math backend, which materialises fp32 scores of
    sq x sk x heads (~15 GiB per layer call for a 7B model at 32K); K/V are repeated to the query heads
    instead (sk x hq x d, a small fraction of that).  One query (a decode step) sees every key: no mask, and
    SDPA's own GQA (its 1 x sk x heads scores are small), so the cache is not copied every token.
    """
    from torch.nn.attention.bias import causal_lower_right

    if q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale)


def load_generation_model(ckpt, dtype: torch.dtype | None = None, checksums: bool = True):
    """(model, arch) of a megatron_focusft checkpoint built with :class:`CachedAttention` (collective);
    ``checksums``: hash its files against its ``checksums.json`` first."""
    from megatron_focusft.convert.megatron_io import load_checkpoint_model

    model, meta, _ = load_checkpoint_model(ckpt, CachedAttention, checksums)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), meta.arch


@torch.no_grad()
def megatron_greedy(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    vocab_size: int,
    eos_ids: Sequence[int] = (),
    prefill_chunk: int | None = 4096,
    max_positions: int | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt`` (token ids) with a Megatron GPTModel and a KV cache.

    The prompt is prefilled in chunks of ``prefill_chunk`` tokens (None: at once); every new token then
    costs one forward pass of one token.  Stops after ``max_new_tokens`` or at a token in ``eos_ids``
    (included in the result).  Collective under tensor parallelism (every rank gets the same tokens).
    ``max_positions`` (default: the model's ``max_sequence_length``, i.e. ``max_position_embeddings``):
    a prompt plus ``max_new_tokens`` beyond it is an error.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("empty prompt")
    check_positions(len(prompt), max_new_tokens, max_positions or getattr(model, "max_sequence_length", None))
    ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=len(prompt) + max_new_tokens)
    step = prefill_chunk or len(prompt)
    device = next(model.parameters()).device

    def forward(ids: list[int]) -> int:
        start = ctx.sequence_len_offset
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(ids), device=device)[None]
        logits = model(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += len(ids)
        logits = logits[0, -1, :vocab_size]  # gathered over TP ranks by the output layer
        return int(torch.argmax(logits))

    with _inference_mode():
        for a in range(0, len(prompt), step):
            nxt = forward(prompt[a : a + step])
        ctx.enable_decode_mode()
        out: list[int] = []
        eos = set(int(e) for e in eos_ids)
        while True:
            out.append(nxt)
            if nxt in eos or len(out) >= max_new_tokens:
                return out
            nxt = forward([nxt])


def _inference_mode():
    """Megatron's process-wide inference flag (megatron-core >= 0.18), under which GPTModel computes the
    logits of the last token only.  Older releases infer it from ``inference_context`` (nothing to set)."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return contextlib.nullcontext()
    return InferenceMode.active()


def check_positions(prompt_len: int, max_new_tokens: int, max_positions: int | None) -> None:
    """ValueError when ``prompt_len + max_new_tokens`` exceeds the model's ``max_position_embeddings``."""
    if max_positions is not None and prompt_len + max_new_tokens > max_positions:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"positions exceed the model's max_position_embeddings ({max_positions})"
        )


def greedy_generation_config(max_new_tokens: int, eos_ids: Sequence[int] = ()):
    """A ``transformers.GenerationConfig`` for plain greedy decoding that overrides whatever the model
    folder's ``generation_config.json`` sets (Qwen2.5-Instruct: sampling, repetition_penalty 1.05, ...)."""
    from transformers import GenerationConfig

    eos = [int(e) for e in eos_ids]
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=None,  # (0 would warn "not valid"; greedy ignores it)
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos or None,
        pad_token_id=(eos or [0])[0],
    )


@torch.no_grad()
def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation with a ``transformers`` causal LM (its own KV cache).

    An explicit :func:`greedy_generation_config` replaces the model's own generation config, so a folder's
    ``generation_config.json`` (sampling, repetition penalty) cannot change the decoding.  A prompt plus
    ``max_new_tokens`` beyond ``config.max_position_embeddings`` is a ValueError."""
    check_positions(len(prompt), max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        generation_config=greedy_generation_config(max_new_tokens, eos_ids),
    )
    return out[0, ids.shape[1] :].tolist()
