#!/usr/bin/env python3
"""Time to build one packed micro-batch (the model's input) from a packed dataset on disk, on the CPU.

    python tools/benchmark_loader.py --pack-length 131072 --median-tokens 6000
    python tools/benchmark_loader.py --pack-length 131072 --median-tokens 300      # many short documents

Writes a synthetic dataset (random token ids, log-normal document lengths around ``--median-tokens``,
alternating context/response runs) into a temporary folder, or reads ``--data PREFIX``, then times
``next(PackLoader)``: reading the packs from the memory-mapped files and building tokens, positions,
document ids, labels, label mask and boundaries.  Prints the median and the slowest of ``--iters`` calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_focusft.data.chat import Document
from megatron_focusft.data.dataset import PackedDataset, PackLoader, write_documents


def synthetic_documents(pack_length: int, median: int, packs: int, seed: int) -> list[Document]:
    """Enough documents for about ``packs`` full packs; each has context and response runs."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < packs * pack_length:
        n = int(np.clip(rng.lognormal(np.log(median), 0.8), 8, pack_length))
        loss = np.zeros(n, np.uint8)
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, 6), replace=False))
        for a, b in zip(cuts[0::2], cuts[1::2]):
            loss[a:b] = 1
        docs.append(Document(rng.integers(0, 150000, n).astype(np.int32), loss))
        total += n
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--data", default=None, help="PREFIX of a packed dataset (default: write a synthetic one)")
    p.add_argument("--pack-length", type=int, default=131072)
    p.add_argument("--median-tokens", type=int, default=6000, help="synthetic documents' median length")
    p.add_argument("--packs", type=int, default=4, help="synthetic packs to write")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.iters < 1 or args.packs < 1 or args.micro_batch_size < 1:
        print("error: --iters, --packs and --micro-batch-size must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.data
        if prefix is None:
            prefix = str(Path(tmp) / "synthetic")
            docs = synthetic_documents(args.pack_length, args.median_tokens, args.packs, args.seed)
            write_documents(prefix, docs, args.pack_length)
        dataset = PackedDataset(prefix)
        loader = PackLoader(dataset, 0, 1, seed=args.seed, micro_batch_size=args.micro_batch_size)
        next(loader)  # warm-up: page the files in
        seconds, documents = [], []
        for _ in range(args.iters):
            start = time.perf_counter()
            inp = next(loader)
            seconds.append(time.perf_counter() - start)
            documents.append(inp.num_documents)
        ms = [1e3 * s for s in seconds]
        print(
            f"micro-batch of {args.micro_batch_size} x {dataset.pack_length} tokens "
            f"({statistics.mean(documents):.1f} documents on average): "
            f"median {statistics.median(ms):.2f} ms, slowest {max(ms):.2f} ms over {args.iters} calls"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
