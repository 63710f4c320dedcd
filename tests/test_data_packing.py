"""Best-fit-decreasing packing and the packed layout (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.data.packing import (
    best_fit_decreasing,
    packing_efficiency,
    pad_multiple,
    round_up,
)
from megatron_focusft.masks import blocks_from_loss_mask

SETTINGS = settings(max_examples=50, deadline=None)


@SETTINGS
@given(st.integers(1, 300).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=80))))
def test_every_document_in_exactly_one_bin_and_no_bin_overflows(case):
    cap, lengths = case
    bins = best_fit_decreasing(lengths, cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    assert all(b for b in bins)
    # No two bins could be merged into one (a first-fit-style guarantee: at most one bin is half empty).
    fills = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(fills) < 2 or fills[0] + fills[1] > cap
    assert bins == best_fit_decreasing(lengths, cap)  # deterministic


def test_best_fit_choice_and_errors():
    # 6 goes to a new bin, 4 to the bin with 6 (room 4, exact fit), 3 to a new bin; 2 to the bin with 3.
    assert best_fit_decreasing([3, 6, 4, 2], 10) == [[1, 2], [0, 3]]
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([11], 10)
    with pytest.raises(ValueError, match="at least one token"):
        best_fit_decreasing([0], 10)
    assert best_fit_decreasing([], 10) == []


def test_efficiency_on_a_realistic_length_mix():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(6000), 0.8, 3000).astype(int), 64, None)
    lengths = lengths[lengths <= 32768]
    bins = best_fit_decreasing(lengths, 32768)
    assert packing_efficiency(int(lengths.sum()), len(bins), 32768) >= 0.97


def test_pad_multiple_for_parallel_layouts():
    assert pad_multiple() == 1
    assert pad_multiple(tensor_parallel=4) == 1
    assert pad_multiple(tensor_parallel=4, sequence_parallel=True) == 4
    assert pad_multiple(context_parallel=2) == 4
    assert pad_multiple(tensor_parallel=3, context_parallel=2, sequence_parallel=True) == 12
    assert round_up(4097, 8) == 4104 and round_up(4096, 8) == 4096


documents = st.lists(
    st.integers(1, 40).flatmap(lambda n: st.lists(st.integers(0, 1), min_size=n, max_size=n)),
    min_size=0,
    max_size=6,
)


@SETTINGS
@given(documents, st.integers(0, 7))
def test_pack_layout_agrees_with_the_unpacked_documents(masks, extra):
    rng = np.random.default_rng(len(masks))
    loss = [np.array(m, dtype=np.uint8) for m in masks]
    ids = [rng.integers(0, 1000, len(m)).astype(np.int32) for m in masks]
    real = sum(len(m) for m in masks)
    pack = _pack(ids, loss, pad_to=real + extra, pad_id=7)
    assert pack.length == real + extra and pack.num_tokens == real
    cu = pack.cu_seqlens.numpy()
    assert cu[0] == 0 and cu[-1] == pack.length and (np.diff(cu) > 0).all()
    assert len(cu) == len(masks) + 1 + (1 if extra else 0)
    assert pack.num_documents == len(masks)
    tokens, lm, pos, doc = (t[0].numpy() for t in (pack.tokens, pack.loss_mask, pack.position_ids, pack.document_ids))
    blocks = blocks_from_loss_mask(pack.loss_mask, pack.document_ids)[0].numpy()
    for d in range(len(masks)):
        s, e = cu[d], cu[d + 1]
        assert (tokens[s:e] == ids[d]).all()
        assert (lm[s:e] == loss[d]).all()
        assert (pos[s:e] == np.arange(e - s)).all()
        assert (doc[s:e] == d).all()
        # the mask's blocks of the pack are the document's own blocks, numbered on through the pack
        alone = blocks_from_loss_mask(torch.from_numpy(loss[d]))
        assert (blocks[s:e] - blocks[s] == alone.numpy()).all()
        assert d == 0 or blocks[s] > blocks[s - 1]  # a new document is a new block
    if extra:  # the padding: its own segment, positions from 0, document -1, no loss
        s = cu[-2]
        assert (tokens[s:] == 7).all() and (lm[s:] == 0).all()
        assert (pos[s:] == np.arange(extra)).all()
        assert (doc[s:] == -1).all()
    # the label rule: the next token; the loss counts where it is a response token of the same document
    if pack.length:
        assert (pack.labels[0, :-1] == pack.tokens[0, 1:]).all() and pack.labels[0, -1] == 7
        same = pack.document_ids[0, 1:] == pack.document_ids[0, :-1]
        assert torch.equal(pack.label_mask[0, :-1], pack.loss_mask[0, 1:] * same.float())
        assert pack.label_mask[0, -1] == 0 and pack.num_response_tokens == int(pack.label_mask.sum())
    with pytest.raises(ValueError, match="do not fit"):
        _pack(ids + [np.zeros(1, np.int32)], loss + [np.zeros(1, np.uint8)], pad_to=real, pad_id=7)


def _pack(ids, loss, pad_to, pad_id):
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    cat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    cat_loss = np.concatenate(loss) if loss else np.zeros(0, np.uint8)
    return PackedInput.from_packs([cat], [cat_loss], [lengths], [0], pad_to=pad_to, pad_id=pad_id)
