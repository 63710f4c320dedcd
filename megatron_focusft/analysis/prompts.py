"""Prompt helpers shared by the long-context tasks, evaluation and attention analysis.

:func:`prompt_ids` renders one user turn plus the assistant header in the checkpoint's chat format (the
tasks measure their length with it, evaluation decodes from it), :func:`eos_ids` are the chat's stop tokens,
and :func:`check_token_ids` refuses token ids beyond the model's vocabulary.
"""

from __future__ import annotations

import warnings

import numpy as np

from megatron_focusft.data.chat import Qwen25Renderer, TemplateRenderer, make_renderer

__all__ = ["check_token_ids", "eos_ids", "prompt_ids"]


def prompt_ids(tokenizer, text: str, answer_prefix: str = "") -> list[int]:
    """Token ids of ``text`` as a user turn plus the assistant header, in the checkpoint's chat format,
    followed by ``answer_prefix`` (RULER's per-task start of the answer; the model continues it)."""
    renderer = make_renderer(tokenizer)
    messages = [{"role": "user", "content": text}]
    if isinstance(renderer, TemplateRenderer):
        rendered = renderer.full(messages, None, add_generation_prompt=True)
    else:
        assert isinstance(renderer, Qwen25Renderer)
        rendered = "".join(s.text for s in renderer.render(messages, None)) + "<|im_start|>assistant\n"
    return tokenizer.encode(rendered + answer_prefix)


def eos_ids(tokenizer) -> list[int]:
    ids = [tokenizer.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return [i for i in ids if i is not None]


def check_token_ids(ids, vocab_size: int, *, fold: bool = False, source: str = ""):
    """``ids`` unchanged when every id is below ``vocab_size``.  Otherwise the tokenizer does not belong to
    the model: a ValueError naming ``source`` (e.g. the tokenizer folder and the checkpoint), unless ``fold``
    (an explicit opt-in for tiny test models read with a real tokenizer) folds them modulo the vocabulary."""
    top = int(np.max(np.asarray(ids))) if len(ids) else -1
    if top < vocab_size:
        return ids
    if not fold:
        where = f" ({source})" if source else ""
        raise ValueError(
            f"token id {top} is outside the model's vocabulary of {vocab_size}: the tokenizer does not belong "
            f"to the checkpoint{where}; pass the checkpoint's own tokenizer"
        )
    warnings.warn(
        f"token ids up to {top} exceed the model's vocabulary ({vocab_size}); folded modulo the vocabulary size "
        "as asked (only meaningful for tiny test models)",
        stacklevel=2,
    )
    return [int(i) % vocab_size for i in ids] if isinstance(ids, list) else np.asarray(ids) % vocab_size
