"""One micro-batch in the model's packed layout (Megatron THD: a single row of T tokens).

The data loader yields ``[b, s]`` packs; the model runs them as one flattened row (b = 1 in Megatron's
THD sense), with ``cu_seqlens`` marking documents so that RoPE restarts in each.  Document ids are made
unique across the flattened rows so that the mask never joins two packs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_focusft.attention import packed_seq_params
from megatron_focusft.fast_weights import DocumentSegments


@dataclass
class PackedInput:
    """All tensors are [1, T] except ``cu_seqlens`` (int32 [n + 1]); padding has document id -1.

    ``label_mask[t]`` = 1 where the loss at position t (predicting ``labels[t]`` = token t+1) counts;
    ``loss_mask[t]`` = 1 where token t is a response token (what the attention-mask rule reads).
    ``document_keys[d]`` identifies document d across steps and ranks (pack index, document index): the
    fast weights' random draws are keyed by it.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    loss_mask: torch.Tensor
    document_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    document_keys: list[tuple[int, int]]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_documents(self) -> int:
        return len(self.document_keys)

    def segments(self, index: torch.Tensor | None = None) -> DocumentSegments:
        """Document runs of the whole pack, or of the tokens at ``index`` (a context-parallel rank's)."""
        docs = self.document_ids[0] if index is None else self.document_ids[0, index]
        return DocumentSegments.from_document_ids(docs, self.num_documents)

    def packed_seq_params(self) -> PackedSeqParams:
        return packed_seq_params(self.cu_seqlens)

    def to(self, device: torch.device) -> PackedInput:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return PackedInput(**moved)

    @classmethod
    def from_batch(cls, batch: object) -> PackedInput:
        """From a :class:`megatron_focusft.data.dataset.Batch` ([b, s] packs) to one flattened row."""
        docs = batch.document_ids.clone()
        b = docs.shape[0]
        keys: list[tuple[int, int]] = []
        offset = 0
        for row in range(b):
            real = docs[row] >= 0
            ids = torch.unique_consecutive(docs[row][real]).tolist()
            remap = {d: offset + i for i, d in enumerate(ids)}
            docs[row][real] = torch.tensor([remap[d] for d in docs[row][real].tolist()], dtype=docs.dtype)
            keys += [(int(batch.sample_indices[row]), i) for i in range(len(ids))]
            offset += len(ids)
        return cls(
            tokens=batch.tokens.reshape(1, -1),
            position_ids=batch.position_ids.reshape(1, -1),
            labels=batch.labels.reshape(1, -1),
            label_mask=batch.label_mask.reshape(1, -1).float(),
            loss_mask=batch.loss_mask.reshape(1, -1).float(),
            document_ids=docs.reshape(1, -1),
            cu_seqlens=batch.cu_seqlens.to(torch.int32),
            document_keys=keys,
        )

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[tuple[torch.Tensor, torch.Tensor]],
        pad_to: int | None = None,
        pack_index: int = 0,
    ) -> PackedInput:
        """Pack (tokens, loss_mask) documents in order, padding the tail to ``pad_to`` (tests, tools)."""
        tokens, loss, docs, pos, labels, label_mask, bounds = [], [], [], [], [], [], [0]
        for d, (ids, lm) in enumerate(documents):
            n = ids.numel()
            tokens.append(ids.long())
            loss.append(lm.float())
            docs.append(torch.full((n,), d, dtype=torch.long))
            pos.append(torch.arange(n))
            labels.append(torch.cat([ids[1:].long(), ids.new_zeros(1).long()]))
            label_mask.append(torch.cat([lm[1:].float(), lm.new_zeros(1).float()]))
            bounds.append(bounds[-1] + n)
        total = bounds[-1]
        pad = (pad_to or total) - total
        if pad < 0:
            raise ValueError(f"documents of {total} tokens do not fit pad_to={pad_to}")
        if pad:
            tokens.append(torch.zeros(pad, dtype=torch.long))
            loss.append(torch.zeros(pad))
            docs.append(torch.full((pad,), -1, dtype=torch.long))
            pos.append(torch.arange(pad))
            labels.append(torch.zeros(pad, dtype=torch.long))
            label_mask.append(torch.zeros(pad))
            bounds.append(total + pad)

        def row(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts)[None]

        return cls(
            tokens=row(tokens),
            position_ids=row(pos),
            labels=row(labels),
            label_mask=row(label_mask),
            loss_mask=row(loss),
            document_ids=row(docs),
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
            document_keys=[(pack_index, d) for d in range(len(documents))],
        )
