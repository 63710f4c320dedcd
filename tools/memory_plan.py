#!/usr/bin/env python3
"""Predicted per-GPU memory of a bf16 training run (distributed optimizer), component by component, and
(``--suggest``) the parallel layouts of a cluster that fit, fastest first.

    python tools/memory_plan.py --preset qwen2.5-7b --seq-length 4096 --tp 2 --sequence-parallel --dp 4
    python tools/memory_plan.py --preset qwen2.5-7b --seq-length 131072 --tp 4 --cp 8 --sequence-parallel \\
        --recompute selective --num-gpus 32 --json
    python tools/memory_plan.py --hf-config Qwen2.5-7B-Instruct/config.json --seq-length 32768 --tp 4 --no-bilevel
    python tools/memory_plan.py --preset qwen2.5-72b --seq-length 4096 --tp 8 --pp 2 --cp 2 --sequence-parallel \\
        --decoder-first-pipeline-num-layers 50 --num-gpus 32
    python tools/memory_plan.py --suggest --num-gpus 32 --gpu-memory-gib 80 --preset qwen2.5-72b --seq-length 4096
    eval "$(python tools/memory_plan.py --shell --num-gpus 32 --preset qwen2.5-72b --seq-length 4096)"

Under pipeline parallelism (``--pp``) every stage is planned (what each holds: its layers, the embedding on the
first, the output layer on the last, the graphs of the micro-batches Megatron's 1F1B schedule keeps in flight
there) and the step's predicted time per stage is shown too (``megatron_focusft/pipeline/cost.py``).

``--suggest`` tries TP x CP x PP x recompute (and the pipeline splits) on ``--num-gpus`` GPUs for the same
``--global-batch-size`` and lists the layouts that fit, ranked by predicted step time, then the rejected ones
grouped by reason (``megatron_focusft/pipeline/planner.py``); ``--shell`` (implies ``--suggest``) prints only the
best layout as ``TP=.. PP=.. CP=.. DP=.. SP=0|1 RECOMPUTE=.. FIRST_STAGE_LAYERS=.. LAST_STAGE_LAYERS=..`` (empty:
the even split) for a launch script to eval.

What each component counts: ``megatron_focusft/memory_plan.py``.  Exit status 2 on a bad model or layout;
1 when ``--suggest`` finds no layout that fits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from megatron_focusft import flags, memory_plan
from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch, get_preset
from megatron_focusft.pipeline import cost, planner

GLOBAL_BATCH_SIZE = 32  # the recipe's (examples/run_focusft_qwen7b.sh)


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
    flags.add_parallel_flags(p, pipeline=True)
    p.add_argument("--dp", type=int, default=None, help="data-parallel size [num-gpus / (TP*CP*PP), else 1]")
    p.add_argument("--num-gpus", type=int, default=None, help="world size (gives DP when --dp is not set)")
    flags.add_micro_batch_flag(p)
    p.add_argument(
        "--global-batch-size",
        type=int,
        default=GLOBAL_BATCH_SIZE,
        help="packs per optimizer step (the recipe's 32); under PP it gives --micro-batches",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="PP: micro-batches per optimizer step and model replica (how many the 1F1B schedule can keep in "
        "flight; spanning fast stages keep fast weights for each) [--global-batch-size / (--micro-batch-size x DP)]",
    )
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
    p.add_argument(
        "--achieved-tflops",
        type=float,
        default=None,
        help=f"TFLOP/s one GPU achieves, for the predicted step time [{cost.DEFAULT_ACHIEVED_TFLOPS:.0f}: 40%% of "
        "the H100 SXM dense bf16 peak]",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    search = p.add_argument_group("layout search")
    search.add_argument(
        "--suggest",
        action="store_true",
        help="try every TP x CP x PP x recompute layout of --num-gpus GPUs; list those that fit, fastest first, "
        "and the rejected ones with their reasons",
    )
    search.add_argument(
        "--shell",
        action="store_true",
        help="(implies --suggest) print only the best layout as shell assignments: TP= PP= CP= DP= SP= RECOMPUTE= "
        "FIRST_STAGE_LAYERS= LAST_STAGE_LAYERS= (empty: the even split)",
    )
    return p


# The flags --suggest chooses itself, with their defaults.
_CHOSEN = {
    "--tensor-model-parallel-size": ("tensor_model_parallel_size", 1),
    "--context-parallel-size": ("context_parallel_size", 1),
    "--pipeline-model-parallel-size": ("pipeline_model_parallel_size", 1),
    "--decoder-first-pipeline-num-layers": ("decoder_first_pipeline_num_layers", None),
    "--decoder-last-pipeline-num-layers": ("decoder_last_pipeline_num_layers", None),
    "--sequence-parallel": ("sequence_parallel", False),
    "--dp": ("dp", None),
    "--micro-batches": ("micro_batches", None),
    "--recompute-granularity": ("recompute_granularity", None),
}


def _workload(args: argparse.Namespace) -> memory_plan.Workload:
    return memory_plan.Workload(
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


def _mode(work: memory_plan.Workload) -> str:
    return f"{work.attention_backend} " + (f"FocuSFT K={work.inner_steps}" if work.focusft else "standard SFT")


def _suggest(args: argparse.Namespace, arch: Qwen2Arch, work: memory_plan.Workload) -> int:
    given = [flag for flag, (dest, default) in _CHOSEN.items() if getattr(args, dest) != default]
    if given:
        raise ConfigError(f"--suggest chooses the layout itself: leave out {', '.join(given)}")
    if args.num_gpus is None:
        raise ConfigError("--suggest needs --num-gpus")
    found = planner.suggest(
        arch,
        work,
        num_gpus=args.num_gpus,
        gpu_memory_gib=args.gpu_memory_gib,
        global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        achieved_tflops=args.achieved_tflops,
        overhead_gib=args.overhead_gib,
        overhead_fraction=args.overhead_fraction,
    )
    name = args.hf_config or args.preset
    if args.shell:
        if found.best is None:
            print(
                f"error: no layout of {args.num_gpus} GPUs fits {name} at S={work.seq_length} in "
                f"{args.gpu_memory_gib:g} GiB (--suggest lists why)",
                file=sys.stderr,
            )
            return 1
        print(found.best.shell())
        return 0
    if args.json:
        workload = {k: v for k, v in asdict(work).items() if k != "recompute"}  # recompute: per layout
        print(json.dumps({"model": name, "workload": workload, **found.to_dict()}, indent=2))
    else:
        tflops = args.achieved_tflops or cost.DEFAULT_ACHIEVED_TFLOPS
        print(
            f"{name}: S={work.seq_length} on {args.num_gpus} GPUs x {args.gpu_memory_gib:g} GiB, global batch "
            f"{args.global_batch_size} (micro-batch {args.micro_batch_size}), {_mode(work)}; predicted step "
            f"time at {tflops:.0f} TFLOP/s per GPU (FLOP model; communication not modelled)\n"
        )
        print(found.to_markdown())
    return 0 if found.best is not None else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.suggest = args.suggest or args.shell
    try:
        arch = _arch(args)
        work = _workload(args)
        if args.suggest:
            return _suggest(args, arch, work)
        parallel = flags.parallel_layout(args)
        tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
        pp = parallel.pipeline_model_parallel_size
        dp = args.dp
        if dp is None:
            dp = 1
            if args.num_gpus is not None:
                if args.num_gpus < 1 or args.num_gpus % parallel.model_parallel_size:
                    sizes = "TP*CP" if pp == 1 else "TP*CP*PP"
                    raise ConfigError(
                        f"--num-gpus {args.num_gpus} is not a multiple of {sizes} = {parallel.model_parallel_size}"
                    )
                dp = parallel.data_parallel_size(args.num_gpus)
        layout = memory_plan.Layout(
            tp,
            cp,
            dp,
            parallel.sequence_parallel,
            args.micro_batch_size,
            pp,
            parallel.decoder_first_pipeline_num_layers,
            parallel.decoder_last_pipeline_num_layers,
        )
        micro_batches = args.micro_batches
        if micro_batches is None and pp > 1:
            per_step = args.micro_batch_size * dp
            if args.global_batch_size < 1 or args.global_batch_size % per_step:
                raise ConfigError(
                    f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                    f"{args.micro_batch_size} x DP {dp}; give --micro-batches"
                )
            micro_batches = args.global_batch_size // per_step
        result = memory_plan.pipeline_plan(
            arch,
            layout,
            work,
            micro_batches=micro_batches,
            gpu_memory_gib=args.gpu_memory_gib,
            overhead_gib=args.overhead_gib,
            overhead_fraction=args.overhead_fraction,
        )
        step = cost.pipeline_cost(arch, layout, work, micro_batches, args.achieved_tflops) if pp > 1 else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.to_dict(), "cost": step.to_dict()}, indent=2) if step else result.to_json())
        return 0
    name = args.hf_config or args.preset
    sp = " SP" if layout.sp else ""
    pipeline = ""
    if step:
        pipeline = f" PP={pp} ({planner.split_text(layout)})"
    batches = f" micro-batches={micro_batches}" if step else ""
    print(
        f"{name}: S={work.seq_length} TP={layout.tp}{sp} CP={layout.cp}{pipeline} DP={layout.dp} "
        f"micro-batch={layout.micro_batch_size}{batches} recompute={work.recompute} {_mode(work)}\n"
    )
    print(result.to_markdown())
    if step:
        print(f"\nPredicted step time (FLOP model):\n\n{step.table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
