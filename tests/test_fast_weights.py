"""Fast-weight bookkeeping on its own: the document runs of a pack and the per-run LoRA matmul."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_focusft.fast_weights import DocumentSegments, segment_linear


def _runs_by_loop(ids: list[int]) -> list[tuple[int, int, int]]:
    """Token by token: maximal runs of one non-negative document id."""
    runs: list[list[int]] = []
    for t, d in enumerate(ids):
        if d < 0:
            continue
        if runs and runs[-1][1] == t and runs[-1][2] == d:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1, d])
    return [tuple(r) for r in runs]


# Runs of (document id or padding, length): documents repeat (context parallelism gives a rank two chunks).
packs = st.lists(st.tuples(st.integers(-1, 4), st.integers(1, 6)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(packs)
def test_runs_equal_a_token_by_token_scan(blocks):
    ids = [d for d, n in blocks for _ in range(n)]
    segments = DocumentSegments.from_document_ids(torch.tensor(ids))
    assert list(segments.runs) == _runs_by_loop(ids)
    assert len(segments) == max(ids) + 1  # documents 0..max; all padding: none
    assert DocumentSegments.from_document_ids(torch.tensor(ids), num_documents=9).num_documents == 9


def test_segment_linear_applies_each_documents_weight_to_its_tokens_only():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0, -1, 1, 1, 0, 0, -1, -1])
    segments = DocumentSegments.from_document_ids(ids, num_documents=3)  # document 2: no tokens here
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
