#!/usr/bin/env python3
"""Predicted per-GPU memory of a bf16 training run (distributed optimizer), component by component.

    python tools/memory_plan.py --preset qwen2.5-7b --seq-length 4096 --tp 2 --sequence-parallel --dp 4
    python tools/memory_plan.py --preset qwen2.5-7b --seq-length 131072 --tp 4 --cp 8 --sequence-parallel \\
        --recompute selective --num-gpus 32 --json
    python tools/memory_plan.py --hf-config Qwen2.5-7B-Instruct/config.json --seq-length 32768 --tp 4 --no-bilevel

What each component counts: ``megatron_focusft/memory_plan.py``.  Exit status 2 on a bad model or layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_focusft import flags, memory_plan
from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch, get_preset


def _arch(args: argparse.Namespace) -> Qwen2Arch:
    if args.hf_config:
        path = Path(args.hf_config)
        if path.is_dir():
            return Qwen2Arch.from_hf_dir(path)
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: unreadable ({e})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return Qwen2Arch.from_hf_config(config, source=str(path))
    return get_preset(args.preset)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", default="qwen2.5-7b", help="a Qwen2.5 preset (qwen2.5-0.5b ... qwen2.5-72b)")
    model.add_argument("--hf-config", help="a Hugging Face config.json (or the folder holding it)")
    p.add_argument("--seq-length", type=int, default=4096, help="pack length in tokens")
    flags.add_parallel_flags(p)
    p.add_argument("--dp", type=int, default=None, help="data-parallel size [num-gpus / (TP*CP), else 1]")
    p.add_argument("--num-gpus", type=int, default=None, help="world size (gives DP when --dp is not set)")
    flags.add_micro_batch_flag(p)
    flags.add_recompute_flag(p)
    flags.add_attention_backend_flag(p, backends=memory_plan.BACKENDS, default="flex")
    flags.add_focusft_flags(p, "--bilevel", "--focusft-inner-steps", "--focusft-layer-fraction", "--focusft-lora-rank")
    p.add_argument("--documents-per-pack", type=int, default=8, help="documents per packed sequence (fast weights)")
    p.add_argument("--response-fraction", type=float, default=0.15, help="share of tokens that are response tokens")
    p.add_argument(
        "--inner-graph",
        choices=("freed", "kept"),
        default="freed",
        help="freed (default): the last inner pass's graph is gone before the outer pass (bilevel.py drops it); "
        "kept: count it next to the outer pass (the step before that fix, for comparison)",
    )
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--overhead-gib", type=float, default=1.5, help="CUDA context, NCCL buffers")
    p.add_argument("--overhead-fraction", type=float, default=0.05, help="allocator fragmentation, x the rest")
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        arch = _arch(args)
        parallel = flags.parallel_layout(args)
        tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
        dp = args.dp
        if dp is None:
            dp = 1
            if args.num_gpus is not None:
                if args.num_gpus < 1 or args.num_gpus % (tp * cp):
                    raise ConfigError(f"--num-gpus {args.num_gpus} is not a multiple of TP*CP = {tp * cp}")
                dp = parallel.data_parallel_size(args.num_gpus)
        layout = memory_plan.Layout(tp, cp, dp, parallel.sequence_parallel, args.micro_batch_size)
        work = memory_plan.Workload(
            seq_length=args.seq_length,
            recompute=flags.recompute_granularity(args) or flags.RECOMPUTE_OFF,
            attention_backend=args.attention_backend,
            focusft=args.bilevel,
            inner_steps=args.focusft_inner_steps,
            layer_fraction=args.focusft_layer_fraction,
            lora_rank=args.focusft_lora_rank,
            documents_per_pack=args.documents_per_pack,
            response_fraction=args.response_fraction,
            inner_graph=args.inner_graph,
        )
        result = memory_plan.plan(
            arch,
            layout,
            work,
            gpu_memory_gib=args.gpu_memory_gib,
            overhead_gib=args.overhead_gib,
            overhead_fraction=args.overhead_fraction,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(result.to_json())
        return 0
    name = args.hf_config or args.preset
    sp = " SP" if layout.sp else ""
    mode = f"FocuSFT K={work.inner_steps}" if work.focusft else "standard SFT"
    print(
        f"{name}: S={work.seq_length} TP={layout.tp}{sp} CP={layout.cp} DP={layout.dp} "
        f"micro-batch={layout.micro_batch_size} recompute={work.recompute} {work.attention_backend} {mode}\n"
    )
    print(result.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
