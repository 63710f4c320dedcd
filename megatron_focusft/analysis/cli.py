"""Command-line flags that ``tools/analyze_attention.py`` and ``tools/evaluate.py`` share; the flags every tool
shares (tensor parallelism, device, progress bar) come from :mod:`megatron_focusft.flags`."""

from __future__ import annotations

import argparse

from megatron_focusft import flags


def add_launch_args(p: argparse.ArgumentParser, tp_help: str) -> None:
    """``--tp`` (``--tensor-model-parallel-size``), ``--device``, ``--fold-oversized-ids``, ``--no-progress`` and
    ``--no-verify-checksums``."""
    flags.add_parallel_flags(p, context=False, sequence=False, tp_help=tp_help)
    flags.add_device_flag(p, default="cpu", help="cuda: run under torchrun with --nproc-per-node = --tp")
    p.add_argument(
        "--fold-oversized-ids",
        action="store_true",
        help="fold token ids beyond the model's vocabulary modulo its size instead of failing (tiny test models)",
    )
    flags.add_progress_flag(p)
    flags.add_verify_checksums_flag(p)
