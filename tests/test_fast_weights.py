"""Fast-weight bookkeeping on its own: the document runs of a pack and the per-run LoRA matmul."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_focusft.attention.context_parallel import load_balanced_chunks
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.fast_weights import DocumentSegments, segment_linear


def _runs_by_loop(ids: list[int], breaks: set[int]) -> list[tuple[int, int, int]]:
    """Token by token: maximal runs of one non-negative document id, also cut at ``breaks`` (chunk starts)."""
    runs: list[list[int]] = []
    for t, d in enumerate(ids):
        if d < 0:
            continue
        if runs and runs[-1][1] == t and runs[-1][2] == d and t not in breaks:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1, d])
    return [tuple(r) for r in runs]


def _segments_of(ids: list[int], chunks=None) -> DocumentSegments:
    """DocumentSegments of a pack given token by token (documents in order, padding -1), via its bounds."""
    pack = PackedInput.from_packs(
        [np.zeros(sum(1 for d in ids if d >= 0), np.int64)],
        [np.zeros(sum(1 for d in ids if d >= 0), np.float32)],
        [np.bincount([d for d in ids if d >= 0]).astype(np.int64)],
        [0],
        pad_to=len(ids),
    )
    assert pack.document_ids[0].tolist() == ids
    return DocumentSegments.from_bounds(pack.cu_seqlens, pack.segment_documents(), pack.num_documents, chunks)


# A pack: documents of these lengths in order, then a padding tail; a CP layout cutting it into 2 CP chunks.
packs = st.tuples(st.lists(st.integers(1, 6), min_size=0, max_size=8), st.integers(0, 5), st.integers(1, 3))


@settings(max_examples=200, deadline=None)
@given(packs)
def test_runs_equal_a_token_by_token_scan(case):
    lengths, pad, cp = case
    ids = [d for d, n in enumerate(lengths) for _ in range(n)] + [-1] * pad
    ids += [-1] * (-len(ids) % (2 * cp))  # the pack length is a multiple of 2 CP
    if not ids:
        return
    segments = _segments_of(ids)
    assert list(segments.runs) == _runs_by_loop(ids, set())
    assert len(segments) == len(lengths)
    for rank in range(cp):  # each context-parallel rank's two load-balanced chunks, in its local order
        chunks = load_balanced_chunks(len(ids), cp, rank)
        local = [ids[t] for s, e in chunks for t in range(s, e)]
        got = _segments_of(ids, chunks)
        assert list(got.runs) == _runs_by_loop(local, {chunks[0][1] - chunks[0][0]})
        assert got.num_documents == len(lengths)  # every document of the pack, present on this rank or not


def test_segment_linear_applies_each_documents_weight_to_its_tokens_only():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0, -1, 1, 1, 0, 0, -1, -1])  # a CP rank's two chunks of one pack
    segments = DocumentSegments(((0, 3, 0), (4, 6, 1), (6, 8, 0)), num_documents=3)  # document 2: no tokens here
    x = torch.randn(10, 1, 5, generator=g)
    weight = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    y = segment_linear(x, weight, segments)
    want = torch.stack([weight[d] @ x[t, 0] if d >= 0 else torch.zeros(4) for t, d in enumerate(ids.tolist())])
    torch.testing.assert_close(y[:, 0], want)
    # a sequence-parallel chunk (rows 4..7 of the pack)
    torch.testing.assert_close(segment_linear(x[4:8], weight, segments, offset=4)[:, 0], want[4:8])
    # every document is in the graph, the one without tokens too (collectives stay aligned across ranks)
    (grad,) = torch.autograd.grad(y.sum(), weight)
    assert grad[2].abs().sum() == 0 and grad[0].abs().sum() > 0
