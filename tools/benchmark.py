#!/usr/bin/env python3
"""Step time of standard SFT, SFT + bidirectional context, causal bilevel and FocuSFT, side by side.

    python tools/benchmark.py --preset qwen2.5-1.5b --seq-length 4k,8k,16k,32k --device cuda --dtype bf16
    python tools/benchmark.py --preset tiny --seq-length 1024 --device cpu --dtype fp32 --backend dense

One process, one model, one synthetic pack of agentic trajectories; only the FocuSFT config differs
between the rows.  See ``megatron_focusft/benchmark.py`` for what is timed and ``megatron_focusft/flops.py`` for
how FLOPs are counted.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_focusft import benchmark, flags, memory_plan, runtime
from megatron_focusft.analysis.tasks import parse_length
from megatron_focusft.config import FocuSFTConfigError
from megatron_focusft.convert.megatron_io import DTYPES
from megatron_focusft.flops import peak_tflops
from megatron_focusft.models.qwen2 import ConfigError, get_preset, tiny_arch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--preset", default="tiny", help="'tiny' or a Qwen2.5 preset, e.g. qwen2.5-1.5b")
    p.add_argument("--seq-length", default="4096", help="tokens per pack; several: 4k,8k,16k,32k")
    flags.add_device_flag(p, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    flags.add_attention_backend_flag(p, backends=memory_plan.BACKENDS)  # each row is also planned
    flags.add_recompute_flag(p)
    flags.add_focusft_flags(p, "--focusft-inner-steps", "--focusft-lora-rank")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default: known GPUs' bf16 peak")
    args = p.parse_args(argv)
    try:
        arch = tiny_arch() if args.preset == "tiny" else get_preset(args.preset)
        seq_lens = [parse_length(x) for x in args.seq_length.split(",")]
        base = flags.focusft_config(args, device=args.device)
        backend = base.attention_backend
        base.validate(hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size)
    except (ConfigError, FocuSFTConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: --seq-length: {e}", file=sys.stderr)
        return 2
    runtime.initialize(args.device)
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(), DTYPES[args.dtype])
    rows = benchmark.run(arch, seq_lens, base, device, DTYPES[args.dtype], args.warmup, args.iters, peak)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{args.preset}, {args.dtype}, {backend} attention, recompute {base.recompute or flags.RECOMPUTE_OFF}, "
        f"K={base.inner_steps}, rank {base.lora_rank}, {device_name}, torch {torch.__version__}"
    )
    print(benchmark.format_table(rows))
    runtime.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
