#!/usr/bin/env python3
"""Write a randomly initialised Hugging Face Qwen2 checkpoint (for benchmarks, tests and the quickstart).

python tools/make_random_checkpoint.py --preset qwen2.5-1.5b --dtype bf16 --out /tmp/qwen1.5b-random
python tools/make_random_checkpoint.py --preset tiny --out /tmp/tiny --tokenizer ../shared/qwen2-tokenizer
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from megatron_focusft.convert.hf_io import copy_tokenizer_files
from megatron_focusft.convert.megatron_io import DTYPES
from megatron_focusft.models.qwen2 import ConfigError, get_preset, tiny_arch
from megatron_focusft.models.random_hf import make_random_hf_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--preset", default="tiny", help="'tiny' or a Qwen2.5 preset name, e.g. qwen2.5-1.5b")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--tokenizer", type=Path, default=None, help="copy tokenizer files from this folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        arch = tiny_arch() if args.preset == "tiny" else get_preset(args.preset)
        if args.vocab_size:
            arch = replace(arch, vocab_size=args.vocab_size)
        if args.out.exists():
            raise ConfigError(f"{args.out} already exists; choose a new output folder")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    make_random_hf_checkpoint(arch, args.out, seed=args.seed, dtype=DTYPES[args.dtype])
    if args.tokenizer:
        copy_tokenizer_files(args.tokenizer, args.out)
    print(f"wrote a random {args.preset} ({args.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
