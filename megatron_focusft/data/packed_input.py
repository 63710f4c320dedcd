"""One micro-batch in the model's packed layout: a single row of T tokens (Megatron's THD, b = 1).

The loader builds it straight from the packs on disk with array operations (no per-token Python); the
mask, the fast weights and the bilevel step read it as it is.  A micro-batch of b packs is the b packs
back to back, each padded with ``pad_id`` to the same length.  All tensors are [1, T] except
``cu_seqlens``:

* ``tokens``        int64   the documents' ids; ``pad_id`` on padding
* ``position_ids``  int64   0, 1, ... restarting in every segment (a document, or a pack's padding tail)
* ``document_ids``  int64   0 .. D-1 in order, unique over the whole row (never joining two packs); -1 on
                            padding
* ``loss_mask``     float32 1 where the *token* is a response token (what the attention-mask rule reads)
* ``labels``        int64   the next token (``tokens`` shifted left by one, ``pad_id`` at the very end)
* ``label_mask``    float32 1 where the loss at t counts: token t+1 is a response token of t's document
* ``cu_seqlens``    int32   [n + 1] segment boundaries: every document and every pack's padding tail is one
                            segment.  This is *the* statement of where documents are: RoPE restarts, TE's
                            THD attention, the fast weights' document runs and the FLOP count read it.

Context/response blocks are not stored: :mod:`megatron_focusft.masks` owns the block rule and derives
them from ``loss_mask`` and ``document_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

PADDING_DOCUMENT = -1  # the document id of padding tokens (megatron_focusft.masks reads the same value)


@dataclass
class PackedInput:
    """A packed micro-batch (see the module docstring for the layout).

    ``document_keys[d]`` identifies document d across steps and ranks, (pack index in the dataset, document
    index in that pack): the fast weights' random draws are keyed by it.  ``num_tokens`` (real tokens) and
    ``num_response_tokens`` (loss positions) are counted once, when the micro-batch is built.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    loss_mask: torch.Tensor
    document_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    document_keys: list[tuple[int, int]]
    num_tokens: int
    num_response_tokens: int

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_documents(self) -> int:
        return len(self.document_keys)

    def segment_documents(self) -> torch.Tensor:
        """The document id of each ``cu_seqlens`` segment (-1: padding), long [n]."""
        return self.document_ids[0, self.cu_seqlens[:-1].long()]

    def to(self, device: torch.device) -> PackedInput:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PackedInput(**moved)

    @classmethod
    def from_packs(
        cls,
        tokens: Sequence[np.ndarray],
        loss_masks: Sequence[np.ndarray],
        document_lengths: Sequence[np.ndarray],
        pack_indices: Sequence[int],
        pad_to: int | None = None,
        pad_id: int = 0,
    ) -> PackedInput:
        """Packs back to back, each padded to ``pad_to`` tokens (None: no padding).

        Pack p is ``tokens[p]`` (its documents' ids concatenated), ``loss_masks[p]`` (same length, 1 on
        response tokens) and ``document_lengths[p]`` (its documents' lengths, summing to that length).
        """
        seg_lengths, seg_is_document, keys = [], [], []
        for ids, lengths, pack in zip(tokens, document_lengths, pack_indices):
            lengths = np.asarray(lengths, dtype=np.int64)
            real = int(lengths.sum())
            if real != len(ids):
                raise ValueError(f"pack {pack}: document lengths sum to {real}, but it has {len(ids)} tokens")
            pad = (real if pad_to is None else pad_to) - real
            if pad < 0:
                raise ValueError(f"pack {pack}: {real} tokens do not fit pad_to={pad_to}")
            seg_lengths += [lengths, np.array([pad] if pad else [], dtype=np.int64)]
            seg_is_document += [np.ones(len(lengths), bool), np.zeros(1 if pad else 0, bool)]
            keys += [(int(pack), d) for d in range(len(lengths))]
        seg_len = np.concatenate(seg_lengths)
        is_document = np.concatenate(seg_is_document)
        cu = np.zeros(len(seg_len) + 1, dtype=np.int64)
        np.cumsum(seg_len, out=cu[1:])
        total = int(cu[-1])
        segment_document = np.where(is_document, np.cumsum(is_document) - 1, PADDING_DOCUMENT)
        document_ids = np.repeat(segment_document, seg_len)
        position_ids = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], seg_len)
        real = document_ids != PADDING_DOCUMENT
        ids = np.full(total, pad_id, dtype=np.int64)
        ids[real] = np.concatenate(tokens) if len(tokens) else []
        loss = np.zeros(total, dtype=np.float32)
        loss[real] = np.concatenate(loss_masks) if len(loss_masks) else []
        labels, label_mask = next_token_labels(ids, loss, document_ids, pad_id)

        def row(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a)[None]

        return cls(
            tokens=row(ids),
            position_ids=row(position_ids),
            labels=row(labels),
            label_mask=row(label_mask),
            loss_mask=row(loss),
            document_ids=row(document_ids),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            document_keys=keys,
            num_tokens=int(real.sum()),
            num_response_tokens=int(label_mask.sum()),
        )

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[tuple[torch.Tensor, torch.Tensor]],
        pad_to: int | None = None,
        pack_index: int = 0,
        pad_id: int = 0,
    ) -> PackedInput:
        """One pack of (tokens, loss_mask) documents in order, the tail padded to ``pad_to`` (tests, tools)."""
        if documents:
            ids = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t, _ in documents])
            loss = np.concatenate([np.asarray(m, dtype=np.float32).reshape(-1) for _, m in documents])
        else:
            ids, loss = np.zeros(0, np.int64), np.zeros(0, np.float32)
        lengths = np.array([np.asarray(t).size for t, _ in documents], dtype=np.int64)
        return cls.from_packs([ids], [loss], [lengths], [pack_index], pad_to=pad_to, pad_id=pad_id)


def next_token_labels(
    tokens: np.ndarray, loss_mask: np.ndarray, document_ids: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """The label rule, once: position t predicts token t+1, and its loss counts where token t+1 is a response
    token of the same document (so a document's last token predicts nothing, and padding never counts)."""
    labels = np.empty_like(tokens)
    labels[:-1], labels[-1:] = tokens[1:], pad_id
    label_mask = np.zeros(loss_mask.shape, dtype=np.float32)
    label_mask[:-1] = loss_mask[1:] * (document_ids[1:] == document_ids[:-1])
    return labels, label_mask
