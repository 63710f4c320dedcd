#!/usr/bin/env python
"""Forward+backward time and peak memory of one attention layer, causal vs glm masks, flex vs SDPA.

Example (GPU, Qwen2.5-7B attention shape per TP=1 rank)::

    python tools/benchmark_attention.py --lengths 4k,16k,32k,64k --masks causal,glm --backend flex,sdpa

On CPU (``--device cpu``) only the forward pass is timed (PyTorch's FlexAttention has no CPU backward).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--lengths", default="4k,16k,32k,64k", help="sequence lengths, e.g. 4k,16k or 512")
    p.add_argument("--masks", default="causal,glm", help="mask modes: causal,glm")
    p.add_argument("--backend", default="flex,sdpa", help="flex, sdpa (flash causal), dense (bool mask)")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--forward-only", action="store_true", help="time the forward pass only")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    from megatron_focusft.analysis.tasks import parse_length
    from megatron_focusft.attention import bench

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    backward = not args.forward_only and args.device == "cuda"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    print(
        f"# attention micro-benchmark on {machine}, torch {torch.__version__}, heads {args.heads}/"
        f"{args.kv_heads}, head dim {args.head_dim}, {args.dtype}, {'fwd+bwd' if backward else 'fwd only'}",
        flush=True,
    )
    results = bench.run(
        [parse_length(x) for x in args.lengths.split(",")],
        args.masks.split(","),
        args.backend.split(","),
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=dtype,
        device=args.device,
        backward=backward,
        warmup=args.warmup,
        iters=args.iters,
        on_result=lambda r: print(f"# {r}", file=sys.stderr, flush=True),
    )
    print(bench.format_table(results, backward))
    return 0


if __name__ == "__main__":
    sys.exit(main())
