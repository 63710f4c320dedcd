#!/usr/bin/env python3
"""Convert a Hugging Face Qwen2 / Qwen2.5 folder into a megatron_focusft (Megatron-Core) checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --out ckpt/qwen7b --tp 2 --dtype bf16 --verify

The written checkpoint loads at any tensor-parallel size; ``--tp N`` writes it from N CPU processes, each
holding 1/N of the model.  The output folder appears only when everything was written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_focusft import runtime
from megatron_focusft.convert import pipeline
from megatron_focusft.convert.megatron_io import DTYPES
from megatron_focusft.models.qwen2 import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--hf-dir", type=Path, required=True, help="Hugging Face checkpoint folder (config.json)")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored dtype (default bf16)")
    p.add_argument("--verify", action="store_true", help="compare logits with transformers afterwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        arch = pipeline.check_hf_to_megatron(args.hf_dir, args.out, args.tp)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    convert_args = (args.hf_dir, args.out, DTYPES[args.dtype], not args.no_progress)
    try:
        runtime.launch_cpu_processes(pipeline.hf_to_megatron, args.tp, runtime.ParallelLayout(args.tp), convert_args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"converted {args.hf_dir} -> {args.out} ({arch.num_layers} layers, tp={args.tp}, {args.dtype}) "
        f"in {time.perf_counter() - start:.1f} s, peak RSS {runtime.peak_rss_gib():.2f} GiB"
    )
    if args.verify:
        result = runtime.launch_cpu_processes(pipeline.verify, 1, args=(args.hf_dir, args.out))
        print(f"verify: {result}")
        return 0 if result.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
