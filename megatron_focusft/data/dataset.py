"""Packed datasets on disk (Megatron-Core indexed datasets, memory-mapped) and the per-rank loader.

Files of a dataset with prefix ``P``:

* ``P.bin`` / ``P.idx``                     token ids (int32).  One Megatron *sequence* per conversation, one
                                            Megatron *document* per pack, so ``document_indices`` are the pack
                                            boundaries and ``sequence_lengths`` the per-conversation lengths.
* ``P.loss_mask.bin`` / ``P.loss_mask.idx`` the loss masks (uint8), same structure.
* ``P.json``                               metadata: pack length, pad id, tokenizer, preprocessing statistics.

(Format version 1 also stored block ids, ``P.block_ids.*``; they are derivable from the loss masks
(:mod:`megatron_focusft.masks` owns that rule), so version 2 writes none and a version-1 dataset reads the
same.)

:class:`PackLoader` yields :class:`~megatron_focusft.data.packed_input.PackedInput` micro-batches (the
model's packed layout, built with array operations) for one data-parallel rank.  The global sample stream is the
concatenation of per-epoch permutations of all packs (``numpy.random.default_rng([seed, epoch])``); global
step ``k`` takes stream positions ``[k * G, (k + 1) * G)`` with ``G = micro_batch_size * dp_size`` and rank
``r`` the slice ``[r * mbs, (r + 1) * mbs)`` of it.  So every pack appears exactly once per epoch across
ranks, and a loader built with ``consumed_samples`` (global samples, as Megatron counts them) resumes
exactly there.

Two more sources feed the same loader, for Megatron-LM's ``--split`` and ``--data-path`` blends:
:class:`PackRange` (the packs ``[start, stop)`` of one dataset: a train, validation or test part) and
:class:`BlendedPacks` (several datasets drawn in proportion to their weights, with Megatron's own blending
indices).  A blend is already a shuffled stream: the loader reads it in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .chat import Document
from .indexed import IndexedWriter
from .packing import round_up

if TYPE_CHECKING:
    from .packed_input import PackedInput

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LOSS_SUFFIX = ".loss_mask"


def _indexed():
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def dataset_files(prefix: str) -> list[str]:
    """All files a packed dataset consists of (the metadata last)."""
    out = []
    for suffix in ("", LOSS_SUFFIX):
        out += [prefix + suffix + ".bin", prefix + suffix + ".idx"]
    return out + [prefix + ".json"]


# --------------------------------------------------------------------------------------------- writing
class DocumentStore:
    """Documents (tokens + loss mask) appended to two flat files, for staging: :meth:`documents` reads them
    back by position (memory-mapped) once :meth:`finalize` has closed them."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.tokens = open(prefix + ".bin", "wb")
        self.loss = open(prefix + LOSS_SUFFIX + ".bin", "wb")
        self.lengths: list[int] = []

    def add(self, doc: Document) -> None:
        self.tokens.write(np.asarray(doc.input_ids, dtype=np.int32).tobytes())
        self.loss.write(np.asarray(doc.loss_mask, dtype=np.uint8).tobytes())
        self.lengths.append(len(doc))

    def finalize(self) -> None:
        self.tokens.close()
        self.loss.close()

    def close(self) -> None:
        """Close the data files (after a failure; ``finalize`` closes them otherwise), ignoring a failing last
        flush (e.g. on a full disk): a file left to the garbage collector would print that error again."""
        for f in (self.tokens, self.loss):
            if not f.closed:
                with contextlib.suppress(OSError):
                    f.close()

    def documents(self) -> _StagedDocuments:
        return _StagedDocuments(self.prefix, self.lengths)


class _StagedDocuments:
    """``docs[i]`` = (input_ids, loss_mask) of the ``i``-th staged document (at least one), views of the
    memory-mapped files."""

    def __init__(self, prefix: str, lengths: list[int]):
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.tokens = np.memmap(prefix + ".bin", dtype=np.int32, mode="r")
        self.loss = np.memmap(prefix + LOSS_SUFFIX + ".bin", dtype=np.uint8, mode="r")

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        return self.tokens[a:b], self.loss[a:b]


def write_packs(prefix: str, docs, bins: list[list[int]], meta: dict) -> None:
    """Write ``bins`` (lists of indices into ``docs``) as a packed dataset at ``prefix``.

    ``docs[i]`` is a :class:`Document` or a ``(input_ids, loss_mask)`` pair.  All files are written into a
    temporary folder beside the output and moved into place at the end (the metadata last), so a failure
    leaves nothing behind under ``prefix``.
    """
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(prefix)}.tmp-", dir=out_dir)
    tok_b = loss_b = None
    try:
        tprefix = os.path.join(tmp, "out")
        tok_b = IndexedWriter(tprefix + ".bin", np.int32)
        loss_b = IndexedWriter(tprefix + LOSS_SUFFIX + ".bin", np.uint8)
        real = 0
        for b in bins:
            items = [docs[i] for i in b]
            items = [(d.input_ids, d.loss_mask) if isinstance(d, Document) else d for d in items]
            lengths = [len(t) for t, _ in items]
            tok_b.add_document(np.concatenate([t for t, _ in items]), lengths)
            loss_b.add_document(np.concatenate([m for _, m in items]), lengths)
            real += sum(lengths)
        tok_b.finalize(tprefix + ".idx")
        loss_b.finalize(tprefix + LOSS_SUFFIX + ".idx")
        meta = {
            "format": "megatron_focusft.packed",
            "version": FORMAT_VERSION,
            "num_packs": len(bins),
            "num_documents": sum(len(b) for b in bins),
            "num_tokens": real,
            **meta,
        }
        with open(tprefix + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        for src, dst in zip(dataset_files(tprefix), dataset_files(prefix)):
            os.replace(src, dst)
    finally:
        for writer in (tok_b, loss_b):
            if writer is not None:
                writer.close()
        shutil.rmtree(tmp, ignore_errors=True)


def write_documents(prefix: str, docs: list[Document], pack_length: int, meta: dict | None = None) -> None:
    """Pack ``docs`` with best-fit-decreasing and write them (a convenience for tests and small data)."""
    from .packing import best_fit_decreasing

    bins = best_fit_decreasing([len(d) for d in docs], pack_length)
    write_packs(prefix, docs, bins, {"pack_length": pack_length, **(meta or {})})


# --------------------------------------------------------------------------------------------- reading
class PackedDataset:
    """Random access to the packs of a dataset written by :func:`write_packs` (memory-mapped)."""

    def __init__(self, prefix: str):
        meta_path = prefix + ".json"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path}: not a packed dataset (missing metadata)")
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        version = self.meta.get("version", FORMAT_VERSION)
        if self.meta.get("format", "megatron_focusft.packed") != "megatron_focusft.packed" or (
            version not in READABLE_VERSIONS
        ):
            raise ValueError(
                f"{meta_path}: format {self.meta.get('format')!r} version {version!r} is not a packed dataset "
                f"this version reads (versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        ix = _indexed()
        self.prefix = prefix
        self.tokens = ix.IndexedDataset(prefix, mmap=True)
        self.loss = ix.IndexedDataset(prefix + LOSS_SUFFIX, mmap=True)
        self.pack_bounds = np.asarray(self.tokens.document_indices, dtype=np.int64)
        n_seq = len(self.tokens.sequence_lengths)
        if len(self.loss.sequence_lengths) != n_seq or self.pack_bounds[-1] != n_seq:
            raise ValueError(f"{prefix}: token and loss-mask files disagree")
        self.pack_length = int(self.meta["pack_length"])
        self.pad_id = int(self.meta.get("pad_id", 0))
        self._pack_lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pack_bounds) - 1

    def pack_lengths(self) -> np.ndarray:
        """Real tokens per pack (computed once)."""
        if self._pack_lengths is None:
            cum = np.concatenate([[0], np.cumsum(self.tokens.sequence_lengths, dtype=np.int64)])
            self._pack_lengths = cum[self.pack_bounds[1:]] - cum[self.pack_bounds[:-1]]
        return self._pack_lengths

    def documents(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (input_ids, loss_mask) of every conversation in pack ``i``."""
        s, e = self._bounds(i)
        return list(zip(self.tokens[s:e], self.loss[s:e]))

    def _bounds(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} of a dataset of {len(self)} packs ({self.prefix})")
        return int(self.pack_bounds[i]), int(self.pack_bounds[i + 1])

    def pack(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack ``i``: its tokens, its loss mask and its conversations' lengths."""
        s, e = self._bounds(i)
        return np.concatenate(self.tokens[s:e]), np.concatenate(self.loss[s:e]), self.tokens.sequence_lengths[s:e]

    def micro_batch(self, indices: list[int], pad_to: int | None = None) -> PackedInput:
        """Packs ``indices`` back to back as one packed micro-batch, each padded to ``pad_to`` tokens."""
        return _micro_batch([self.pack(i) for i in indices], indices, pad_to, self.pad_id)


def _micro_batch(
    packs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ids: Sequence[int], pad_to: int | None, pad_id: int
) -> PackedInput:
    """``packs`` (each as :meth:`PackedDataset.pack` gives it) as one micro-batch; ``ids``: each pack's id (the
    first half of its documents' keys, which seed their fast weights)."""
    from .packed_input import PackedInput  # (torch: imported where a micro-batch is built, not to write data)

    tokens, losses, lengths = zip(*packs) if packs else ((), (), ())
    return PackedInput.from_packs(list(tokens), list(losses), list(lengths), ids, pad_to=pad_to, pad_id=pad_id)


def split_ranges(fractions: Sequence[float], num_packs: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` pack ranges of the train, validation and test parts of ``num_packs`` packs for
    normalised ``fractions`` (Megatron-LM's ``--split``): consecutive index ranges, their bounds rounded from the
    cumulative fractions as ``megatron.core.datasets`` rounds them, so a split here holds the packs Megatron's
    would (an empty part: ``(stop, stop)`` of the part before it)."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    ranges, stop = [], 0
    for bounds in convert_split_vector_to_split_matrix(list(fractions)):
        if bounds is not None:
            start, stop = int(round(bounds[0] * num_packs)), int(round(bounds[1] * num_packs))
        ranges.append((stop, stop) if bounds is None else (start, stop))
    return ranges


class PackRange:
    """The packs ``[start, stop)`` of a packed dataset, numbered from 0: one part of a ``--split``.  A pack keeps
    its index in the file as its id, so it draws the same fast weights whatever the split."""

    def __init__(self, dataset: PackedDataset, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(dataset):
            raise ValueError(f"packs [{start}, {stop}) are not a range of the {len(dataset)} of {dataset.prefix}")
        self.dataset, self.start, self.stop = dataset, start, stop
        self.prefix, self.pack_length, self.pad_id = dataset.prefix, dataset.pack_length, dataset.pad_id

    def __len__(self) -> int:
        return self.stop - self.start

    def _index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} of a range of {len(self)} packs ({self.prefix})")
        return self.start + i

    def pack(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.dataset.pack(self._index(i))

    def micro_batch(self, indices: list[int], pad_to: int | None = None) -> PackedInput:
        return self.dataset.micro_batch([self._index(i) for i in indices], pad_to=pad_to)


class BlendedPacks:
    """``size`` samples drawn from several packed datasets (``parts``) in proportion to ``weights``: Megatron-LM's
    blended dataset (``--data-path 0.7 A 0.3 B``).

    Which part each sample comes from is Megatron's own blending index (``megatron.core.datasets.helpers``:
    each next sample goes to the part furthest below its share, so every prefix of the stream is in proportion
    to within a sample per part).  A part's k-th draw is pack ``k % n`` of its pass ``k // n`` over its ``n``
    packs, every pass a fresh permutation seeded by ``(seed, part, pass)`` (``shuffle=False``: the packs in
    order).  Nothing depends on ``size`` but the length: a longer blend begins with the shorter one, so a run
    resumed at any sample with another length (a new schedule) reads on where it stopped.

    ``weights=None``: every pack of every part exactly once, interleaved in proportion to their sizes
    (Megatron's unweighted blend); ``size`` is then their total.  A sample's id (its documents' fast-weight
    seed) is its pack's index in the parts laid end to end.
    """

    def __init__(
        self,
        parts: Sequence[PackedDataset | PackRange],
        weights: Sequence[float] | None,
        size: int | None,
        seed: int,
        *,
        shuffle: bool = True,
    ) -> None:
        from megatron.core.datasets import helpers

        self.parts = tuple(parts)
        self.weights = None if weights is None else tuple(float(x) for x in weights)
        if not self.parts or any(len(p) == 0 for p in self.parts):
            raise ValueError("a blend needs parts with at least one pack each")
        pad_ids = {p.pad_id for p in self.parts}
        if len(pad_ids) > 1:
            described = ", ".join(f"{p.prefix}: {p.pad_id}" for p in self.parts)
            raise ValueError(f"the parts' pad ids differ ({described}); were they tokenized for different models?")
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        size = int(sizes.sum()) if weights is None else size
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.sample_index = np.zeros(size, dtype=np.int64)
        if weights is None:
            helpers.build_exhaustive_blending_indices(self.dataset_index, self.sample_index, sizes, len(sizes))
        else:
            w = np.asarray(weights, dtype=np.float64)
            helpers.build_blending_indices(self.dataset_index, self.sample_index, w / w.sum(), len(w), size, False)
        self.seed, self.shuffle = seed, shuffle
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.prefix = " + ".join(p.prefix for p in self.parts)
        self.pack_length = max(p.pack_length for p in self.parts)
        self.pad_id = self.parts[0].pad_id
        self._passes: dict[int, tuple[int, np.ndarray]] = {}  # part -> (pass, its order), the last one used

    def __len__(self) -> int:
        return len(self.dataset_index)

    def locate(self, i: int) -> tuple[int, int]:
        """Sample ``i``: (its part, the pack of that part)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a blend of {len(self)} ({self.prefix})")
        part, k = int(self.dataset_index[i]), int(self.sample_index[i])
        n = len(self.parts[part])
        if not self.shuffle:
            return part, k % n
        epoch = k // n
        if self._passes.get(part, (None,))[0] != epoch:
            self._passes[part] = (epoch, np.random.default_rng([self.seed, part, epoch]).permutation(n))
        return part, int(self._passes[part][1][k % n])

    def pack(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        part, j = self.locate(i)
        return self.parts[part].pack(j)

    def micro_batch(self, indices: list[int], pad_to: int | None = None) -> PackedInput:
        located = [self.locate(i) for i in indices]
        packs = [self.parts[part].pack(j) for part, j in located]
        return _micro_batch(packs, [int(self.offsets[part]) + j for part, j in located], pad_to, self.pad_id)


Packs = PackedDataset | PackRange | BlendedPacks  # what the loader and the validation loop read


class PackLoader:
    """Micro-batches of packs for one data-parallel rank: deterministic per-epoch shuffles, exact resume.

    ``consumed_samples`` counts *global* samples (all ranks), as Megatron does; after each yielded batch it
    grows by ``micro_batch_size * dp_size``, and ``PackLoader(..., consumed_samples=loader.consumed_samples)``
    continues with the very next batch.  ``sequence_length`` (default: the pack length) rounded up to
    ``pad_multiple`` gives every row the same static length; ``fixed_length=False`` pads each batch only to
    its longest pack rounded up to ``pad_multiple`` (see :func:`megatron_focusft.data.packing.pad_multiple`).
    ``num_epochs=None`` iterates forever; otherwise iteration stops before the first incomplete global batch.
    A :class:`BlendedPacks` is read in its order (it is shuffled already); ``fixed_length=False`` needs a
    :class:`PackedDataset` (it reads ``pack_lengths()``).
    """

    def __init__(
        self,
        prefix: str | Packs,
        dp_rank: int,
        dp_size: int,
        seed: int,
        micro_batch_size: int,
        consumed_samples: int = 0,
        *,
        shuffle: bool = True,
        num_epochs: int | None = None,
        sequence_length: int | None = None,
        pad_multiple: int = 1,
        fixed_length: bool = True,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if micro_batch_size < 1 or consumed_samples < 0:
            raise ValueError("micro_batch_size must be >= 1 and consumed_samples >= 0")
        self.dataset = PackedDataset(prefix) if isinstance(prefix, str) else prefix
        if len(self.dataset) == 0:
            raise ValueError("the dataset has no packs")
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.micro_batch_size = micro_batch_size
        self.consumed_samples = consumed_samples
        self.shuffle, self.num_epochs = shuffle and not isinstance(self.dataset, BlendedPacks), num_epochs
        self.pad_multiple = pad_multiple
        self.fixed_length = fixed_length
        length = sequence_length or self.dataset.pack_length
        self.sequence_length = round_up(length, pad_multiple)
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The packs' order in ``epoch`` (the same on every rank)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return self._perm

    def sample_at(self, position: int) -> int:
        """The pack at a position of the global sample stream."""
        n = len(self.dataset)
        return int(self.epoch_order(position // n)[position % n])

    def rank_positions(self, consumed: int) -> list[int]:
        start = consumed + self.dp_rank * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))

    def __iter__(self) -> Iterator[PackedInput]:
        return self

    def __next__(self) -> PackedInput:
        n = len(self.dataset)
        if self.num_epochs is not None and self.consumed_samples + self.global_batch_size > n * self.num_epochs:
            raise StopIteration
        indices = [self.sample_at(p) for p in self.rank_positions(self.consumed_samples)]
        if self.fixed_length:
            pad_to = self.sequence_length
        else:
            longest = max(int(self.dataset.pack_lengths()[i]) for i in indices)
            pad_to = round_up(longest, self.pad_multiple)
        self.consumed_samples += self.global_batch_size
        return self.dataset.micro_batch(indices, pad_to=pad_to)
