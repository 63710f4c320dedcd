"""Best-fit-decreasing packing and the packed layout (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_focusft.data import blocks_from_loss_mask
from megatron_focusft.data.packing import (
    best_fit_decreasing,
    make_pack,
    packing_efficiency,
    pad_multiple,
    round_up,
)

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
    pack = make_pack(ids, loss, pad_to=real + extra, pad_id=7)
    assert len(pack) == real + extra and pack.num_real_tokens == real
    cu = pack.cu_seqlens
    assert cu[0] == 0 and cu[-1] == len(pack) and (np.diff(cu) > 0).all()
    assert len(cu) == len(masks) + 1 + (1 if extra else 0)
    assert pack.num_documents == len(masks)
    for d in range(len(masks)):
        s, e = cu[d], cu[d + 1]
        assert (pack.tokens[s:e] == ids[d]).all()
        assert (pack.loss_mask[s:e] == loss[d]).all()
        assert (pack.position_ids[s:e] == np.arange(e - s)).all()
        assert (pack.document_ids[s:e] == d).all()
        assert (pack.block_ids[s:e] == blocks_from_loss_mask(loss[d])).all()
    if extra:  # the padding: its own segment, positions from 0, document/block -1, no loss
        s = cu[-2]
        assert (pack.tokens[s:] == 7).all() and (pack.loss_mask[s:] == 0).all()
        assert (pack.position_ids[s:] == np.arange(extra)).all()
        assert (pack.document_ids[s:] == -1).all() and (pack.block_ids[s:] == -1).all()
    with pytest.raises(ValueError):
        make_pack(ids + [np.zeros(1, np.int32)], loss + [np.zeros(1, np.uint8)], pad_to=real)
