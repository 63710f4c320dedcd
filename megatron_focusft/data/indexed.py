"""Megatron-Core's indexed dataset files (``P.bin`` + ``P.idx``, index format ``MMIDIDX`` version 1), written with
numpy alone.

Preprocessing writes datasets and never reads them back through Megatron: importing ``megatron.core`` (and torch
with it) for its ``IndexedDatasetBuilder`` cost about 4 s of every run, more than rendering and masking all of
a 7M-token input.  The files are byte for byte the builder's (a test compares); training reads them with
Megatron's ``IndexedDataset``.

``.idx``: the header ``MMIDIDX\\0\\0``, ``<Q`` 1, ``<B`` dtype code, ``<Q`` sequence count, ``<Q`` document count,
then the sequence lengths (int32), the sequences' byte offsets in ``.bin`` (int64) and the document indices
(int64: the first sequence of each document, and the count at the end).
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType)
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}


class IndexedWriter:
    """``add_document`` / ``finalize`` as Megatron's ``IndexedDatasetBuilder`` has them (no multimodal modes)."""

    def __init__(self, bin_path: str, dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.code = DTYPE_CODES[self.dtype]
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_document(self, array: np.ndarray, lengths: list[int]) -> None:
        """One document of ``len(lengths)`` sequences, their elements back to back in ``array``."""
        self.data_file.write(np.asarray(array, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        """Close ``.bin`` and write ``.idx``."""
        self.data_file.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", self.code))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self.document_indices, dtype=np.int64).tobytes(order="C"))

    def close(self) -> None:
        """Close ``.bin`` after a failure, ignoring a failing last flush (e.g. on a full disk): a file left to the
        garbage collector would print that error again, as an 'Exception ignored' traceback."""
        if not self.data_file.closed:
            with contextlib.suppress(OSError):
                self.data_file.close()
