#!/usr/bin/env python3
"""One row per training run (model, method, layout, step time, tokens/s, MFU, peak memory, final train and
validation loss, evaluation score), read from what each run wrote; a Markdown table on stdout.

    python tools/collect_runs.py runs/study/*/ --csv runs.csv --json runs.json --plot scaling.png
    python tools/collect_runs.py runs/qwen7b-sft/ slurm-1234.log --warmup-steps 20

A RUN is a ``tools/train.py`` run folder (its ``--save`` folder or a log folder: its ``metrics.jsonl`` and
``run_config.json``, else TensorBoard events anywhere below it, ``*.log`` console logs; checkpoints,
``eval.json`` from ``tools/evaluate.py --json``) or one console log file.  Where each column comes from, and
why: ``megatron_focusft/analysis/runs.py``.  ``--plot``: the evaluation score and FocuSFT's step-time overhead
(FocuSFT / SFT step time) against model size.  Exit status: 0 on success, 2 when a RUN is not a run or cannot
be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_focusft.analysis.runs import (
    CollectError,
    collect,
    markdown_table,
    records,
    scaling_figure,
    step_time_overhead,
    write_csv,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders and/or console log files")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=10,
        help="logged steps of each launch left out of the medians (default 10; at least 1)",
    )
    p.add_argument("--csv", type=Path, default=None, metavar="OUT", help="the rows as CSV")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="the rows as JSON (with eval cells)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="score and overhead vs model size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = collect(args.runs, args.warmup_steps)
        figure = scaling_figure(rows) if args.plot else None  # before writing anything: matplotlib may be missing
    except CollectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in step_time_overhead(rows)[1]:
        print(f"warning: {note}", file=sys.stderr)
    print(markdown_table(rows, args.warmup_steps), end="")
    for out in (args.csv, args.json, args.plot):
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
    if args.csv:
        write_csv(rows, args.csv)
    if args.json:
        args.json.write_text(json.dumps(records(rows), indent=2) + "\n")
    if figure is not None:
        figure.savefig(args.plot, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
