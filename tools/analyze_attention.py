#!/usr/bin/env python3
"""Where do response tokens look?  Per-layer attention sink mass, context engagement (system/user vs tool
turns) and positional profile of a checkpoint on conversations; optionally two checkpoints side by side.

    python tools/analyze_attention.py --ckpt ckpt/focusft --data convs.jsonl --samples 8 \\
        --attention-mask glm --json attn.json --plots attn_plots/
    python tools/analyze_attention.py --ckpt ckpt/sft --compare ckpt/focusft --data data/train \\
        --json compare.json --plots compare_plots/

``--data``: a JSONL file of conversations (rendered with the checkpoint's tokenizer/ folder) or a packed
dataset PREFIX from tools/preprocess_data.py (every conversation of the packs is one sample).
Attention is computed in chunks of query rows (never an S x S x heads tensor); ``--tp N`` splits the heads
over N processes.  The JSON names each checkpoint and its iteration; the figures (``--plots``:
``megatron_focusft/analysis/plots.py``) label each by its folder's name, iteration and mask.
Exit status: 0 on success, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_focusft import flags, runtime
from megatron_focusft.analysis.cli import add_launch_args
from megatron_focusft.masks import MASK_MODES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--ckpt", required=True, help="megatron_focusft checkpoint (or a training --save folder)")
    p.add_argument("--compare", default=None, metavar="CKPT", help="a second checkpoint, side by side")
    p.add_argument("--data", required=True, metavar="PREFIX_OR_JSONL", help="conversations to analyse")
    p.add_argument("--samples", type=int, default=8, help="conversations to average over (default 8)")
    flags.add_attention_mask_flag(p, default="causal", help="mask for the pass")
    p.add_argument(
        "--compare-attention-mask",
        choices=MASK_MODES,
        default=None,
        help="mask for --compare (default: --attention-mask)",
    )
    p.add_argument("--json", required=True, type=Path, metavar="OUT", help="write the statistics here")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write PNG figures here")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="default: CKPT/tokenizer")
    p.add_argument("--max-length", type=int, default=None, help="truncate JSONL conversations (whole turns)")
    p.add_argument("--bins", type=int, default=32, help="positional-profile bins (default 32)")
    p.add_argument("--heatmap-layer", type=int, default=None, help="0-based (default: the middle layer)")
    add_launch_args(p, tp_help="tensor-parallel processes (CPU)")
    args = p.parse_args(argv)
    for flag, value, least in [
        ("--samples", args.samples, 1),
        ("--bins", args.bins, 1),
        ("--tp", args.tensor_model_parallel_size, 1),
        ("--max-length", args.max_length, 1),
        ("--heatmap-layer", args.heatmap_layer, 0),
    ]:
        if value is not None and value < least:
            print(f"{p.prog}: error: {flag} must be at least {least}, got {value}", file=sys.stderr)
            raise SystemExit(2)
    return args


def _analyze_one(args, ckpt: str, mode: str):
    """(statistics, the checkpoint's iteration) of one checkpoint under ``mode``."""
    import torch.distributed as dist

    from megatron_focusft.analysis.analyze import analyze, load_probe_model, load_samples
    from megatron_focusft.convert.megatron_io import CheckpointMeta, resolve_checkpoint
    from megatron_focusft.data import load_tokenizer

    folder = resolve_checkpoint(ckpt)
    tok_dir = args.tokenizer or str(folder / "tokenizer")  # the analysed checkpoint's
    tokenizer = load_tokenizer(tok_dir)
    samples = load_samples(args.data, tokenizer, limit=args.samples, max_length=args.max_length)
    model, arch = load_probe_model(ckpt, checksums=not args.no_verify_checksums)
    if args.heatmap_layer is not None and args.heatmap_layer >= arch.num_layers:
        raise ValueError(
            f"--heatmap-layer {args.heatmap_layer}: {ckpt} has {arch.num_layers} layers (0..{arch.num_layers - 1})"
        )
    if args.device == "cuda":
        model = model.cuda()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    stats = analyze(
        model,
        samples,
        mode,
        vocab_size=arch.vocab_size,
        bins=args.bins,
        heatmap_layer=args.heatmap_layer,
        progress=rank0 and not args.no_progress,
        fold_vocab=args.fold_oversized_ids,
        source=f"tokenizer {tok_dir}, checkpoint {ckpt}",
    )
    return stats, CheckpointMeta.read(folder).iteration  # the metadata was checked when the model loaded


def run(args) -> dict:
    """Every rank: analyse (and compare); returns the JSON document."""
    import numpy as np

    stats, iterations = {}, {}
    stats["a"], iterations["a"] = _analyze_one(args, args.ckpt, args.attention_mask)
    if args.compare:
        mode = args.compare_attention_mask or args.attention_mask
        stats["b"], iterations["b"] = _analyze_one(args, args.compare, mode)
    doc = {"ckpt": str(args.ckpt), "iteration": iterations["a"], "data": args.data, **stats["a"].to_json()}
    if args.compare:
        a, b = stats["a"], stats["b"]
        eps = 1e-12
        doc = {
            "a": {"ckpt": str(args.ckpt), "iteration": iterations["a"], **a.to_json()},
            "b": {"ckpt": str(args.compare), "iteration": iterations["b"], **b.to_json()},
            "ratios": {
                "sink_mass_a_over_b": [float(x) for x in a.sink_mass / np.maximum(b.sink_mass, eps)],
                "context_engagement_b_over_a": [
                    float(x) for x in b.context_engagement / np.maximum(a.context_engagement, eps)
                ],
                "average_sink_mass_a_over_b": float(a.sink_mass.mean() / max(b.sink_mass.mean(), eps)),
                "average_context_engagement_b_over_a": float(
                    b.context_engagement.mean() / max(a.context_engagement.mean(), eps)
                ),
            },
        }
    return {"doc": doc, "stats": stats, "iterations": iterations}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # usage errors (and --help): the exit status
        return e.code if isinstance(e.code, int) else 2
    from megatron_focusft.models.qwen2 import ConfigError

    try:
        if args.device == "cpu":
            layout = flags.parallel_layout(args)
            out = runtime.launch_cpu_processes(run, layout.tensor_model_parallel_size, layout, (args,))
        else:
            runtime.initialize("cuda", flags.parallel_layout(args))
            out = run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out["doc"], indent=2))
    stats = out["stats"]
    for name, st in stats.items():
        avg = st.to_json()["average"]
        label = {"a": args.ckpt, "b": args.compare}[name]
        print(
            f"{label}: {st.num_samples} samples, mask {st.mask_mode}: sink mass {avg['sink_mass']:.4f}, "
            f"context engagement {avg['context_engagement']:.4f} "
            f"(system/user {avg['system_user']:.4f}, tool {avg['tool']:.4f})"
        )
    if args.compare:
        r = out["doc"]["ratios"]
        print(
            f"sink mass ratio a/b {r['average_sink_mass_a_over_b']:.2f}x, "
            f"context engagement ratio b/a {r['average_context_engagement_b_over_a']:.2f}x"
        )
    if args.plots:
        from megatron_focusft.analysis.plots import write_plots

        for path in write_plots(_plot_runs(args, stats, out["iterations"]), args.plots):
            print(f"wrote {path}")
    print(f"wrote {args.json}")
    return 0


def _plot_runs(args, stats: dict, iterations: dict) -> list:
    """The checkpoints as the figures label them: the folder's name (the paths as given where the two names
    are the same), its iteration and the pass's mask; "a: " / "b: " in front where that still reads the same."""
    from megatron_focusft.analysis.plots import PlotRun

    paths = {"a": str(args.ckpt), "b": str(args.compare)}
    names = {k: Path(p).name or p for k, p in paths.items()}
    if args.compare and names["a"] == names["b"]:
        names = paths
    runs = [PlotRun(names[k], iterations[k], st) for k, st in stats.items()]
    if len(runs) == 2 and runs[0].label == runs[1].label:
        runs = [PlotRun(f"{k}: {r.model}", r.iteration, r.stats) for k, r in zip("ab", runs)]
    return runs


if __name__ == "__main__":
    sys.exit(main())
