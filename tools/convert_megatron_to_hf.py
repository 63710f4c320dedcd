#!/usr/bin/env python3
"""Convert a megatron_focusft checkpoint (or a training run's latest) into a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --ckpt runs/qwen7b --out qwen7b-focusft-hf

The folder (sharded safetensors + index, config.json, tokenizer files) loads with
``transformers.AutoModelForCausalLM``.  Fast weights are never exported.  It gets a model card (README.md: the
base model, data, settings, steps, losses and evaluation the run recorded, when the checkpoint is an
``iter_*`` of a training ``--save`` folder; ``megatron_focusft/training/model_card.py``) and, from a training
run, its settings as ``training_args.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_focusft import flags, runtime
from megatron_focusft.convert import pipeline
from megatron_focusft.convert.megatron_io import DTYPES, resolve_checkpoint
from megatron_focusft.models.qwen2 import ConfigError
from megatron_focusft.training import model_card


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder or training --save folder")
    p.add_argument("--out", type=Path, required=True, help="output Hugging Face folder (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    flags.add_verify_checksums_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.ckpt)
        if args.out.exists():
            raise ConfigError(f"{args.out} already exists; choose a new output folder (nothing was written)")
        dtype = DTYPES[args.dtype] if args.dtype else None
        try:  # plain JSON files; the checkpoint's own files are checked before the export reads them
            card = model_card.card_files(model_card.facts_of_checkpoint(ckpt, dtype), args.out.name)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{ckpt}: its run's records are unreadable ({e})") from None
        start = time.perf_counter()
        runtime.launch_cpu_processes(
            pipeline.megatron_to_hf,
            1,
            args=(
                ckpt,
                args.out,
                dtype,
                int(args.max_shard_size_gb * 1024**3),
                not args.no_progress,
                not args.no_verify_checksums,
                card,
            ),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"exported {ckpt} -> {args.out} in {elapsed:.1f} s, peak RSS {runtime.peak_rss_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
