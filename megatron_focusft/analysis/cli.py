"""Command-line flags that ``tools/analyze_attention.py`` and ``tools/evaluate.py`` share (kept free of
heavy imports, so ``--help`` stays fast)."""

from __future__ import annotations

import argparse


def add_launch_args(p: argparse.ArgumentParser, tp_help: str) -> None:
    """``--tp``, ``--device``, ``--fold-oversized-ids`` and ``--no-progress``."""
    p.add_argument("--tp", type=int, default=1, help=tp_help)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: run under torchrun with --nproc-per-node = --tp",
    )
    p.add_argument(
        "--fold-oversized-ids",
        action="store_true",
        help="fold token ids beyond the model's vocabulary modulo its size instead of failing (tiny test models)",
    )
    p.add_argument("--no-progress", action="store_true")
