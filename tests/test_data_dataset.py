"""Packed datasets on disk and the per-rank loader: coverage per epoch, exact resume, layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_focusft.data import Document
from megatron_focusft.data.dataset import PackedDataset, PackLoader, dataset_files, write_documents
from megatron_focusft.masks import blocks_from_loss_mask


def make_docs(lengths, seed=0):
    """Documents whose first token is their index (so they can be recognised after packing)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = rng.integers(0, 150000, n).astype(np.int32)
        ids[0] = i
        mask = np.zeros(n, np.uint8)
        # context then alternating response / context runs
        cuts = np.sort(rng.choice(np.arange(1, n + 1), size=min(n, 4), replace=False)) if n > 1 else [1]
        for a, b in zip(cuts[0::2], list(cuts[1::2]) + [n]):
            mask[a:b] = 1
        docs.append(Document(ids, mask, f"doc{i}"))
    return docs


def rows(b, length):
    """The per-pack rows of a packed micro-batch [1, packs x length]: (tokens, loss, positions, documents,
    blocks) as NumPy arrays, and each row's segment boundaries."""
    blocks = blocks_from_loss_mask(b.loss_mask, b.document_ids)
    arrays = [t[0].numpy() for t in (b.tokens, b.loss_mask, b.position_ids, b.document_ids, blocks)]
    cu = b.cu_seqlens.numpy()
    for r in range(b.length // length):
        lo, hi = r * length, (r + 1) * length
        row_cu = [0] + [c - lo for c in cu if lo < c <= hi]
        yield [a[lo:hi] for a in arrays], row_cu


def packs_of(b) -> list[int]:
    """The packs of a micro-batch, in order (every pack has a document 0)."""
    return [pack for pack, d in b.document_keys if d == 0]


def check_pack_against_docs(tokens, loss, pos, doc_ids, blocks, cu, docs):
    """Every document segment of a packed row equals one unpacked document; returns their indices."""
    seen = []
    for s, e in zip(cu[:-1], cu[1:]):
        d = doc_ids[s]
        if d < 0:  # padding segment
            assert (doc_ids[s:e] == -1).all() and (loss[s:e] == 0).all()
            assert (pos[s:e] == np.arange(e - s)).all()
            continue
        doc = docs[int(tokens[s])]
        assert e - s == len(doc)
        assert (tokens[s:e] == doc.input_ids).all()
        assert (loss[s:e] == doc.loss_mask).all()
        # the mask's blocks: the document's own, numbered on through the pack
        assert (blocks[s:e] - blocks[s] == blocks_from_loss_mask(torch.from_numpy(doc.loss_mask)).numpy()).all()
        assert (pos[s:e] == np.arange(e - s)).all()
        assert (doc_ids[s:e] == d).all()
        seen.append(int(tokens[s]))
    return seen


@pytest.fixture
def written(tmp_path):
    lengths = [5, 17, 3, 30, 12, 9, 25, 1, 8, 14, 20, 6, 2, 11]
    docs = make_docs(lengths)
    prefix = str(tmp_path / "ds")
    write_documents(prefix, docs, pack_length=32, meta={"pad_id": 151643})
    return prefix, docs


def test_write_and_read_back(written):
    prefix, docs = written
    ds = PackedDataset(prefix)
    assert ds.pack_length == 32 and ds.pad_id == 151643
    assert ds.meta["num_documents"] == len(docs) and ds.meta["num_tokens"] == sum(len(d) for d in docs)
    seen = []
    for i in range(len(ds)):
        p = ds.micro_batch([i], pad_to=32)
        assert p.length == 32 and p.num_tokens == ds.pack_lengths()[i] <= 32
        ((arrays, cu),) = rows(p, 32)
        seen += check_pack_against_docs(*arrays, cu, docs)
    assert sorted(seen) == list(range(len(docs)))


def test_loader_epochs_ranks_and_resume(written):
    prefix, docs = written
    ds = PackedDataset(prefix)
    n = len(ds)
    dp, mbs = 2, 2
    loaders = [PackLoader(ds, r, dp, seed=3, micro_batch_size=mbs) for r in range(dp)]
    stream = []
    for _ in range(3 * n):  # 6 epochs' worth of global batches
        for ld in loaders:
            stream += packs_of(next(ld))
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))  # each pack once per epoch
    assert stream[:n] != stream[n : 2 * n]  # reshuffled per epoch
    # exact resume from any consumed-samples count
    ref = PackLoader(ds, 1, dp, seed=3, micro_batch_size=mbs)
    batches = [next(ref) for _ in range(7)]
    resumed = PackLoader(ds, 1, dp, seed=3, micro_batch_size=mbs, consumed_samples=3 * dp * mbs)
    for b in batches[3:]:
        r = next(resumed)
        assert torch.equal(r.tokens, b.tokens) and r.document_keys == b.document_keys
    assert resumed.consumed_samples == ref.consumed_samples == 7 * dp * mbs
    # a different seed, a different order; num_epochs stops before an incomplete global batch
    other = PackLoader(ds, 0, 1, seed=4, micro_batch_size=1, num_epochs=1)
    assert sorted(p for b in other for p in packs_of(b)) == list(range(n))


def test_batch_layout(written):
    prefix, docs = written
    ld = PackLoader(prefix, 0, 1, seed=0, micro_batch_size=3, pad_multiple=12)
    b = next(ld)
    # three packs back to back in one row, each 32 rounded up to a multiple of 12
    assert b.tokens.shape == (1, 3 * 36) and b.tokens.dtype == torch.long
    cu = b.cu_seqlens.numpy()
    assert cu.dtype == np.int32 and cu[-1] == 3 * 36 and (np.diff(cu) > 0).all()
    for arrays, row_cu in rows(b, 36):
        assert row_cu[-1] == 36  # every row's segments end at the row's end
        check_pack_against_docs(*arrays, row_cu, docs)
    # document ids count on through the row: no two packs share one (the mask never joins packs)
    real = b.document_ids[0][b.document_ids[0] >= 0]
    assert torch.equal(real.unique_consecutive(), torch.arange(b.num_documents))
    ds = PackedDataset(prefix)
    assert b.document_keys == [(p, d) for p in packs_of(b) for d in range(len(ds.documents(p)))]
    # labels are the next token; the loss counts where the next token is a response token of the same doc
    assert torch.equal(b.labels[:, :-1], b.tokens[:, 1:])
    same = b.document_ids[:, 1:] == b.document_ids[:, :-1]
    assert torch.equal(b.label_mask[:, :-1], b.loss_mask[:, 1:] * same.float())
    assert (b.label_mask[0, 35::36] == 0).all()  # a row's last position predicts nothing
    assert b.num_tokens == sum(int(ds.pack_lengths()[p]) for p in packs_of(b))
    dyn = next(PackLoader(prefix, 0, 1, seed=0, micro_batch_size=3, pad_multiple=4, fixed_length=False))
    assert dyn.length % 3 == 0 and (dyn.length // 3) % 4 == 0 and dyn.length // 3 <= 32


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=30),
    pack_length=st.integers(64, 160),
    dp=st.integers(1, 3),
    mbs=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_every_document_once_per_epoch(tmp_path_factory, lengths, pack_length, dp, mbs, seed):
    docs = make_docs(lengths, seed)
    prefix = str(tmp_path_factory.mktemp("ds") / "p")
    write_documents(prefix, docs, pack_length)
    ds = PackedDataset(prefix)
    assert (ds.pack_lengths() <= pack_length).all()
    n = len(ds)
    loaders = [PackLoader(ds, r, dp, seed=seed, micro_batch_size=mbs) for r in range(dp)]
    steps = -(-2 * n // (dp * mbs))  # enough global batches to cover two epochs
    seen_docs, stream = [], []
    for _ in range(steps):
        for ld in loaders:
            b = next(ld)
            assert b.tokens.shape == (1, mbs * pack_length)
            stream += packs_of(b)
            for arrays, row_cu in rows(b, pack_length):
                seen_docs.append(check_pack_against_docs(*arrays, row_cu, docs))
    # Ranks in order within a step = the global stream: every pack, and so every document, once per epoch.
    assert stream == [loaders[0].sample_at(p) for p in range(len(stream))]
    for epoch in range(2):
        packs = stream[epoch * n : (epoch + 1) * n]
        assert sorted(packs) == list(range(n))
        assert sorted(d for p in packs for d in ds_docs(ds, p)) == list(range(len(docs)))
    assert sorted(d for row in seen_docs[:n] for d in row) == list(range(len(docs)))


def ds_docs(ds, i):
    return [int(t[0]) for t, _ in ds.documents(i)]


def test_missing_or_inconsistent_files(written, tmp_path):
    prefix, _ = written
    with pytest.raises(FileNotFoundError, match="missing metadata"):
        PackedDataset(str(tmp_path / "nothing"))
    assert all(os.path.exists(f) for f in dataset_files(prefix))


def test_a_version_1_dataset_reads_the_same(written, tmp_path):
    """Format 1 also stored block ids (``P.block_ids.bin/.idx``, derivable from the loss masks): such a
    dataset reads as it did, its micro-batches equal to those of the same packs written as format 2."""
    import json
    import shutil

    prefix, docs = written
    old = str(tmp_path / "v1")
    for src in dataset_files(prefix):
        shutil.copy(src, old + src[len(prefix) :])
    for suffix in (".bin", ".idx"):  # the block-id files of format 1 (their content is never read)
        shutil.copy(prefix + ".loss_mask" + suffix, old + ".block_ids" + suffix)
    meta = json.loads(open(old + ".json").read())
    meta["version"] = 1
    open(old + ".json", "w").write(json.dumps(meta))
    new, v1 = PackedDataset(prefix), PackedDataset(old)
    for i in range(len(new)):
        a, b = new.micro_batch([i], pad_to=32), v1.micro_batch([i], pad_to=32)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.label_mask, b.label_mask)
    meta["version"] = 3
    open(old + ".json", "w").write(json.dumps(meta))
    with pytest.raises(ValueError, match="version 3 is not a packed dataset this version reads"):
        PackedDataset(old)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
def test_indexed_writer_writes_megatron_builders_bytes(tmp_path, dtype):
    """data/indexed.py writes what Megatron's IndexedDatasetBuilder writes, byte for byte (no torch needed)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_focusft.data.indexed import IndexedWriter

    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 200, n) for n in rng.integers(1, 40, k)] for k in (3, 1, 5)]
    ours, theirs = IndexedWriter(str(tmp_path / "a.bin"), dtype), IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype)
    for doc in documents:
        for w in (ours, theirs):
            w.add_document(np.concatenate(doc), [len(s) for s in doc])
    ours.finalize(str(tmp_path / "a.idx"))
    theirs.finalize(str(tmp_path / "b.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes(), ext
    read = IndexedDataset(str(tmp_path / "a"), mmap=True)
    assert [s.tolist() for s in read] == [s.tolist() for doc in documents for s in doc]
