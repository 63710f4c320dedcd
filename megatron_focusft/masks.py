"""The attention-mask rule, written once.

Every attention backend (dense SDPA, FlexAttention, the tests' references) evaluates :func:`allowed`;
none restates it.  The inputs are per-token:

- ``document_ids``: which packed document a token belongs to (``-1`` for padding);
- ``loss_mask``: 1 on assistant-response tokens, 0 on context tokens (system, user, tool turns and the
  ``<|im_start|>assistant\\n`` header).

Blocks are the maximal runs of equal loss-mask value inside a document (:func:`blocks_from_loss_mask`):
runs of 0 are context blocks, runs of 1 response blocks.  The modes:

``causal``
    standard SFT: ``same_document(q, k) and k <= q``.
``glm``
    FocuSFT: ``same_document(q, k) and (block[k] < block[q] or (block[k] == block[q] and
    (is_context[q] or k <= q)))`` -- bidirectional inside a context block, causal inside a response
    block, never a later block.

Padding (document id ``-1``) attends to nothing and is attended by nothing, except that a padding query
attends to *itself*: a query row with no allowed key makes softmax return NaN (SDPA) and the NaN would
reach the gradients through ``0 * NaN``.  With the diagonal the padding rows are finite and harmless (their
loss is 0 and no real token reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_focusft.data.packed_input import PADDING_DOCUMENT

MaskMode = Literal["causal", "glm"]
MASK_MODES: tuple[str, ...] = ("causal", "glm")


def check_mode(mode: str) -> None:
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; choose one of {', '.join(MASK_MODES)}")


def blocks_from_loss_mask(loss_mask: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Block ids [..., s] (long): a new block starts wherever the loss mask or the document changes (THE block
    rule: nothing else in the project computes or stores blocks).

    ``block = cumsum(changed)`` with ``changed[0] = 0``.  Ids count up through the whole pack (they do not
    restart per document); the rule only compares blocks of one document, where that is the same thing.
    """
    lm = loss_mask.long()
    changed = lm[..., 1:] != lm[..., :-1]
    if document_ids is not None:
        changed = changed | (document_ids[..., 1:] != document_ids[..., :-1])
    zero = torch.zeros(*changed.shape[:-1], 1, dtype=torch.bool, device=changed.device)
    return torch.cat([zero, changed], dim=-1).long().cumsum(-1)


def allowed(
    b: torch.Tensor,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    document_ids: torch.Tensor,
    block_ids: torch.Tensor,
    is_context: torch.Tensor,
    mode: MaskMode,
) -> torch.Tensor:
    """True where query ``q_idx`` of sequence ``b`` may attend to key ``kv_idx`` (THE rule).

    Elementwise with broadcasting over index tensors; the per-token tensors are [batch, s] and indexed as
    ``t[b, q_idx]``.  This serves both a dense evaluation (``b = arange(batch)[:, None, None]``,
    ``q_idx = arange(s)[:, None]``, ``kv_idx = arange(s)[None, :]`` -> [batch, s, s]) and FlexAttention's
    ``mask_mod(b, h, q_idx, kv_idx)`` (scalar indices, traced by torch.compile).
    """
    doc_q = document_ids[b, q_idx]
    doc_k = document_ids[b, kv_idx]
    causal = kv_idx <= q_idx
    same_document = (doc_q == doc_k) & (doc_q != PADDING_DOCUMENT)
    if mode == "causal":
        ok = same_document & causal
    elif mode == "glm":
        block_q = block_ids[b, q_idx]
        block_k = block_ids[b, kv_idx]
        same_block = block_k == block_q
        ok = same_document & ((block_k < block_q) | (same_block & (is_context[b, q_idx] | causal)))
    else:
        check_mode(mode)
        raise AssertionError("unreachable")
    # Padding queries attend to themselves only (a row with no allowed key would be NaN).
    return ok | ((doc_q == PADDING_DOCUMENT) & (q_idx == kv_idx))


@dataclass(frozen=True)
class MaskInputs:
    """What the mask of one micro-batch is built from (built once per batch, shared by every layer).

    ``document_ids`` [b, s] long (``-1`` = padding), ``loss_mask`` [b, s] (1 = response token); 1-D
    inputs are taken as b = 1.  ``block_ids`` and ``is_context`` are derived.  ``query_index`` (optional,
    long [q]) gives the position in the sequence of each query row when a rank holds only some of the
    queries (context parallelism); keys are always the whole sequence.
    """

    document_ids: torch.Tensor
    loss_mask: torch.Tensor
    mode: MaskMode
    query_index: torch.Tensor | None = None
    block_ids: torch.Tensor = field(init=False)
    is_context: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        check_mode(self.mode)
        docs, lm = self.document_ids, self.loss_mask
        if docs.dim() == 1:
            docs, lm = docs[None], lm[None]
        if docs.shape != lm.shape or docs.dim() != 2:
            raise ValueError(
                f"document_ids {tuple(self.document_ids.shape)} and loss_mask {tuple(self.loss_mask.shape)} "
                "must both be [s] or [b, s]"
            )
        docs = docs.long()
        object.__setattr__(self, "document_ids", docs)
        object.__setattr__(self, "loss_mask", lm)
        object.__setattr__(self, "block_ids", blocks_from_loss_mask(lm, docs))
        object.__setattr__(self, "is_context", (lm == 0) & (docs != PADDING_DOCUMENT))
        if self.query_index is None:
            object.__setattr__(self, "query_index", torch.arange(docs.shape[1], device=docs.device))

    @property
    def batch_size(self) -> int:
        return self.document_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.document_ids.shape[1]

    @property
    def num_queries(self) -> int:
        return self.query_index.numel()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """The mask rows of query rows ``start:stop``: bool [b, stop - start, s]."""
        device = self.document_ids.device
        q = self.query_index[start:stop][:, None]
        k = torch.arange(self.seq_len, device=device)[None, :]
        b = torch.arange(self.batch_size, device=device)[:, None, None]
        return allowed(b, q, k, self.document_ids, self.block_ids, self.is_context, self.mode)

    def dense(self) -> torch.Tensor:
        """The whole mask, bool [b, q, s] (materialises q x S: tests, CPU and short sequences only)."""
        return self.rows(0, self.num_queries)

    def mask_mod(self, pad_to: int | None = None):
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` evaluating :func:`allowed`.

        ``pad_to``: indices up to this length (the last partial tiles of queries and keys) are valid and
        read as padding tokens, so the kernel never reads past the end of the per-token tensors.
        """
        docs, blocks, ctx, query = self.document_ids, self.block_ids, self.is_context, self.query_index
        length = max(pad_to or 0, self.seq_len, self.num_queries) + 1
        extra = length - self.seq_len
        docs = torch.nn.functional.pad(docs, (0, extra), value=PADDING_DOCUMENT)
        blocks = torch.nn.functional.pad(blocks, (0, extra), value=-1)
        ctx = torch.nn.functional.pad(ctx, (0, extra), value=False)
        # Query rows past the last real one read as the padding token at ``seq_len``.
        query = torch.nn.functional.pad(query, (0, length - self.num_queries), value=self.seq_len)
        mode = self.mode

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(b, query[q_idx], kv_idx, docs, blocks, ctx, mode)

        return mask_mod


def dense_mask(document_ids: torch.Tensor, loss_mask: torch.Tensor, mode: MaskMode) -> torch.Tensor:
    """Bool mask, True where attention is allowed: [s, s] for 1-D inputs, [b, s, s] for [b, s] inputs."""
    mask = MaskInputs(document_ids, loss_mask, mode).dense()
    return mask[0] if document_ids.dim() == 1 else mask
