"""Held-out chat data as evaluation samples: the model answers each conversation's last assistant turn.

A conversation (any format ``tools/preprocess_data.py`` reads) is rendered exactly as training renders it
(:class:`~megatron_focusft.data.ChatEncoder`, the same renderer), so the prompt is every token before the
last assistant turn's response block (the assistant header included) and the reference is that turn's
text.  The score (``metric="exact"``, :func:`~megatron_focusft.analysis.tasks.scoring.exact_match`) is an
exact match up to case, surrounding white space and a final full stop: the model has to give the answer in
the data's own form, which is what supervised fine-tuning teaches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_focusft.data import (
    ChatEncoder,
    DataError,
    detect_format,
    iter_records,
    normalize_conversation,
    parse_record,
)
from megatron_focusft.data.chat import RendererName

__all__ = ["conversation_samples"]

# Decoding budget when --max-new-tokens is not given: the reference answer's length plus this margin, so a
# model that goes on past the answer is seen doing so.
ANSWER_MARGIN_TOKENS = 16


def conversation_samples(path: str, tokenizer, renderer: RendererName = "auto", limit: int | None = None) -> list[dict]:
    """The first ``limit`` conversations of ``path`` (all when None) as samples for
    :func:`megatron_focusft.analysis.evaluate.evaluate`: ``prompt_ids``, ``outputs`` (the reference) and
    ``metric="exact"``.  The task is ``data:<file name>``; its ``length`` is the longest prompt of the file
    (one column of the accuracy table).  A conversation whose last turn is not an assistant's text is a
    :class:`DataError` naming its location."""
    fmt = detect_format(path)
    encoder = ChatEncoder(tokenizer, renderer=renderer, loss_on="last")
    samples = []
    for rec in iter_records([path]):
        if limit is not None and len(samples) >= limit:
            break
        record = parse_record(rec)
        try:
            messages, _ = normalize_conversation(record, encoder.fields, fmt)
        except DataError as e:
            raise e.at(rec.location) from None
        last = messages[-1] if messages else {}
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str) or not last["content"]:
            raise DataError(
                f"{rec.location}: the last turn must be an assistant's text answer (the reference); "
                f"got {last.get('role', 'nothing')!r}",
                reason="no_reference",
            )
        doc = encoder.encode(record, rec.location, fmt)
        start = _last_response_start(doc.loss_mask)
        samples.append(
            {
                "task": f"data:{Path(path).name}",
                "index": len(samples),
                "prompt_ids": [int(t) for t in doc.input_ids[:start]],
                "outputs": [last["content"]],
                "metric": "exact",
                "max_new_tokens": len(doc.input_ids) - start + ANSWER_MARGIN_TOKENS,
            }
        )
    if not samples:
        raise DataError(f"{path}: no conversation to evaluate", reason="empty")
    longest = max(len(s["prompt_ids"]) for s in samples)
    for s in samples:
        s["length"] = longest
    return samples


def _last_response_start(loss_mask: np.ndarray) -> int:
    """Where the last run of response tokens begins (the loss mask of a ``loss_on="last"`` encoding)."""
    ones = np.flatnonzero(loss_mask)
    start = int(ones[-1])
    while start > 0 and loss_mask[start - 1]:
        start -= 1
    return start
