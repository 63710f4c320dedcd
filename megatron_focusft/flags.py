"""Command-line flags that several tools share, each defined once: the parallel layout, the device, the FocuSFT
knobs (``--bilevel``, ``--attention-mask``, ``--attention-backend``, ``--focusft-*``), activation recompute, the
micro-batch size, the progress bar and ``--no-verify-checksums``.

``tools/train.py``, ``tools/memory_plan.py``, ``tools/benchmark.py``, ``tools/analyze_attention.py`` and
``tools/evaluate.py`` (the last two through :mod:`megatron_focusft.analysis.cli`) add the groups that apply to
them; a tool may narrow a flag's choices (e.g. the backends it models) or change its default, never its name,
its meaning or its destination.  Choices and defaults come from the modules that define them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, get_args

from megatron_focusft.attention import BACKENDS
from megatron_focusft.config import LOSS_REDUCTIONS, RECOMPUTE_GRANULARITIES, FocuSFTConfig
from megatron_focusft.masks import MASK_MODES
from megatron_focusft.runtime import Device, ParallelLayout

RECOMPUTE_OFF = "none"  # accepted by --recompute-granularity: no recompute (the default)
_DEFAULTS = FocuSFTConfig()


# --------------------------------------------------------------------------------------------- parallel layout
def add_parallel_flags(
    p: Any, *, context: bool = True, sequence: bool = True, pipeline: bool = False, tp_help: str | None = None
) -> None:
    """``--tensor-model-parallel-size``/``--tp``, ``--context-parallel-size``/``--cp``, ``--sequence-parallel``
    and (``pipeline``) ``--pipeline-model-parallel-size``/``--pp`` with Megatron's uneven-split flags
    (``p``: a parser or an argument group)."""
    p.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        dest="tensor_model_parallel_size",
        type=int,
        default=1,
        metavar="TP",
        help=tp_help or "tensor-parallel size",
    )
    if context:
        p.add_argument(
            "--context-parallel-size",
            "--cp",
            dest="context_parallel_size",
            type=int,
            default=1,
            metavar="CP",
            help="context-parallel size (all-gather KV, load-balanced chunks)",
        )
    if sequence:
        p.add_argument(
            "--sequence-parallel",
            action="store_true",
            help="split the activations outside attention along the tensor-parallel group",
        )
    if pipeline:
        p.add_argument(
            "--pipeline-model-parallel-size",
            "--pp",
            dest="pipeline_model_parallel_size",
            type=int,
            default=1,
            metavar="PP",
            help="pipeline-parallel size (Megatron's 1F1B schedule; layers split evenly unless given below)",
        )
        for end in ("first", "last"):
            p.add_argument(
                f"--decoder-{end}-pipeline-num-layers",
                type=int,
                default=None,
                metavar="N",
                help=f"decoder layers on the {end} pipeline stage (uneven split; the rest split evenly)",
            )


def parallel_layout(args: argparse.Namespace) -> ParallelLayout:
    """The layout the flags of :func:`add_parallel_flags` give (CP 1 and no SP where a tool has no such flag)."""
    return ParallelLayout(
        args.tensor_model_parallel_size,
        getattr(args, "context_parallel_size", 1),
        getattr(args, "sequence_parallel", False),
        getattr(args, "pipeline_model_parallel_size", 1),
        getattr(args, "decoder_first_pipeline_num_layers", None),
        getattr(args, "decoder_last_pipeline_num_layers", None),
    )


# --------------------------------------------------------------------------------------------- device
def add_device_flag(p: Any, *, default: str, help: str | None = None) -> None:
    p.add_argument("--device", choices=get_args(Device), default=default, help=help)


# --------------------------------------------------------------------------------------------- FocuSFT knobs
def add_attention_mask_flag(p: Any, *, default: str = _DEFAULTS.attention_mask, help: str | None = None) -> None:
    p.add_argument(
        "--attention-mask",
        choices=MASK_MODES,
        default=default,
        help=help or "glm: bidirectional inside each context block, causal inside responses; causal: standard",
    )


def add_attention_backend_flag(p: Any, *, backends: Sequence[str] = BACKENDS, default: str | None = None) -> None:
    """``--attention-backend`` (alias ``--backend``); ``backends``: the subset a tool supports.  Default None:
    :func:`attention_backend` picks by device."""
    p.add_argument(
        "--attention-backend",
        "--backend",
        dest="attention_backend",
        choices=tuple(backends),
        default=default,
        help="default: flex on cuda, dense on cpu (FlexAttention has no CPU backward)" if default is None else None,
    )


def attention_backend(value: str | None, device: str) -> str:
    """The backend of ``--attention-backend value`` on ``device`` (None: flex on cuda, dense on cpu)."""
    return value or ("flex" if device == "cuda" else "dense")


_FOCUSFT_FLAGS: dict[str, dict[str, Any]] = {
    "--bilevel": dict(
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.bilevel,
        help="FocuSFT's inner loop on fast weights (default); --no-bilevel: standard SFT with the chosen mask",
    ),
    "--focusft-inner-steps": dict(type=int, default=_DEFAULTS.inner_steps, help="K: inner SGD steps per sample"),
    "--focusft-inner-lr": dict(type=float, default=_DEFAULTS.inner_lr, help="the inner SGD step size"),
    "--focusft-inner-grad-clip": dict(
        type=float, default=_DEFAULTS.inner_grad_clip, help="per-tensor clip of the inner gradients"
    ),
    "--focusft-lora-rank": dict(type=int, default=_DEFAULTS.lora_rank, help="rank of the fast-weight LoRA adapters"),
    "--focusft-lora-alpha": dict(type=float, default=_DEFAULTS.lora_alpha, help="their scale is alpha / rank"),
    "--focusft-layer-fraction": dict(
        type=float, default=_DEFAULTS.layer_fraction, help="the top fraction of layers carrying fast weights"
    ),
    "--loss-reduction": dict(
        choices=LOSS_REDUCTIONS,
        default=_DEFAULTS.loss_reduction,
        help="sample: per-document mean response loss, averaged; token: over all response tokens",
    ),
}
FOCUSFT_FLAGS: tuple[str, ...] = tuple(_FOCUSFT_FLAGS)

# FocuSFTConfig's field behind each flag destination.
_FOCUSFT_FIELDS = {
    "bilevel": "bilevel",
    "focusft_inner_steps": "inner_steps",
    "focusft_inner_lr": "inner_lr",
    "focusft_inner_grad_clip": "inner_grad_clip",
    "focusft_lora_rank": "lora_rank",
    "focusft_lora_alpha": "lora_alpha",
    "focusft_layer_fraction": "layer_fraction",
    "loss_reduction": "loss_reduction",
    "attention_mask": "attention_mask",
}


def add_focusft_flags(p: Any, *names: str) -> None:
    """The FocuSFT knobs ``names`` (default: every one of :data:`FOCUSFT_FLAGS`), defaults from FocuSFTConfig."""
    for name in names or FOCUSFT_FLAGS:
        p.add_argument(name, **_FOCUSFT_FLAGS[name])


def focusft_config(args: argparse.Namespace, *, device: str, seed: int | None = None) -> FocuSFTConfig:
    """The FocuSFTConfig of the flags a tool has (the others keep FocuSFTConfig's defaults); not validated."""
    values: dict[str, Any] = {f: getattr(args, dest) for dest, f in _FOCUSFT_FIELDS.items() if hasattr(args, dest)}
    if hasattr(args, "attention_backend"):
        values["attention_backend"] = attention_backend(args.attention_backend, device)
    if hasattr(args, "recompute_granularity"):
        values["recompute"] = recompute_granularity(args)
    if seed is not None:
        values["seed"] = seed
    return FocuSFTConfig(**values)


# --------------------------------------------------------------------------------------------- recompute
def add_recompute_flag(p: Any) -> None:
    """``--recompute-granularity`` (alias ``--recompute``): full, selective, or none (off, the default)."""
    p.add_argument(
        "--recompute-granularity",
        "--recompute",
        dest="recompute_granularity",
        choices=(*RECOMPUTE_GRANULARITIES, RECOMPUTE_OFF),
        default=None,
        help="activation recompute: selective (core attention in backward) or full (whole layers); none: off (default)",
    )


def recompute_granularity(args: argparse.Namespace) -> str | None:
    """'full', 'selective', or None for no recompute (``none`` or the flag not given)."""
    value = args.recompute_granularity
    return None if value in (None, RECOMPUTE_OFF) else value


# --------------------------------------------------------------------------------------------- batch, progress
def add_micro_batch_flag(p: Any) -> None:
    p.add_argument("--micro-batch-size", type=int, default=1, help="packs per micro-batch and DP rank")


def add_progress_flag(p: Any) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar (even on a terminal)")


# --------------------------------------------------------------------------------------------- checkpoints
def add_verify_checksums_flag(p: Any) -> None:
    """``--no-verify-checksums`` (dest ``no_verify_checksums``): the tools that read a checkpoint."""
    p.add_argument(
        "--no-verify-checksums",
        action="store_true",
        help="do not hash the checkpoint's files against its checksums.json (huge checkpoints; also "
        "FOCUSFT_VERIFY_CHECKSUMS=0); file sizes, pickle screening and tensor shapes are still checked",
    )
