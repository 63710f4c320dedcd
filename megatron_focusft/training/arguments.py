"""``tools/train.py``'s flags (Megatron's names plus FocuSFT's) and an optional YAML config, parsed into a
:class:`~megatron_focusft.training.config.TrainConfig`.  Nothing here reads a checkpoint or a data set, and
nothing checks how flags combine: that is :func:`megatron_focusft.training.plan.plan`, once, before any work.

A YAML config uses the flag names as keys (``lr: 1.0e-5``, ``focusft-inner-steps: 2`` or
``focusft_inner_steps: 2``; ``data-path`` takes a list or a string of words); flags given on the command line win
over the file.  The flags several tools share
(parallel layout, device, FocuSFT knobs, recompute, micro-batch size, progress bar) are defined once, in
:mod:`megatron_focusft.flags`; defaults come from the config dataclasses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_focusft import flags
from megatron_focusft.training.config import (
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizationConfig,
    TrainConfig,
)
from megatron_focusft.training.divergence import DivergenceConfig
from megatron_focusft.training.errors import SetupError
from megatron_focusft.training.optimizer import DECAY_STYLES, DEFAULT_WARMUP_FRACTION, OPTIMIZERS


class ArgumentError(SetupError):
    """A bad flag value or YAML config; the message names the flag."""


_OPT, _BATCH, _CKPT, _LOG = OptimizationConfig(), BatchConfig(), CheckpointConfig(), LoggingConfig()
_CHECKS = DivergenceConfig()

# Megatron-LM flags for what this trainer always does: accepted, so that a Megatron-LM launch line runs, and
# said once at the start (training/plan.py's notes); flag -> its destination.
ALWAYS_ON_FLAGS = {
    "--use-distributed-optimizer": "use_distributed_optimizer",
    "--exit-signal-handler": "exit_signal_handler",
}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a Megatron-LM flag we lack (--tensorboard) must not be taken for one we have.
    p = argparse.ArgumentParser(prog="train.py", description="FocuSFT training on Megatron-Core", allow_abbrev=False)
    p.add_argument("--config", type=Path, default=None, help="YAML file whose keys are these flags' names")
    _add_model_and_data(p.add_argument_group("model and data"))
    g = p.add_argument_group("parallelism")
    flags.add_parallel_flags(g, pipeline=True)
    flags.add_device_flag(g, default=ModelConfig().device)
    g.add_argument(
        "--distributed-timeout-minutes",
        type=int,
        default=ModelConfig().distributed_timeout_minutes,
        help="how long a collective waits for the other ranks before the job fails",
    )
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="always on with --device cuda (Megatron's distributed optimizer); accepted for Megatron-LM launch lines",
    )
    _add_optimisation(p.add_argument_group("optimisation"))
    g = p.add_argument_group("FocuSFT")
    flags.add_focusft_flags(g, "--bilevel")
    flags.add_attention_mask_flag(g)
    flags.add_attention_backend_flag(g)
    flags.add_focusft_flags(g, *(f for f in flags.FOCUSFT_FLAGS if f != "--bilevel"))
    _add_checkpoints_and_logs(p.add_argument_group("checkpoints and logs"))
    return p


def _add_model_and_data(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--pretrained-checkpoint",
        type=Path,
        default=None,
        help="starting weights (tools/convert_hf_to_megatron.py output); not needed to resume",
    )
    g.add_argument(
        "--data-path",
        nargs="+",
        default=(),
        metavar="PREFIX",
        help="PREFIX written by tools/preprocess_data.py, or a blend as in Megatron-LM: WEIGHT PREFIX WEIGHT PREFIX "
        "... (packs drawn in proportion to the weights), or PREFIX PREFIX ... (weighted by their pack counts)",
    )
    g.add_argument(
        "--split",
        type=str,
        default=None,
        help="train,valid,test shares of --data-path's packs, e.g. 98,2,0 (Megatron-LM's: consecutive pack index "
        "ranges of each dataset); the valid part is the validation set; default: every pack trains",
    )
    g.add_argument(
        "--valid-data-path",
        type=str,
        default=None,
        help="PREFIX of a validation set: its mean response loss with the current base weights (standard forward, "
        "the run's mask, no fast weights: no inner loop) at every --eval-interval and at the end",
    )
    g.add_argument("--seq-length", type=int, default=None, help="pack length (default: the data's)")


def _add_optimisation(g: argparse._ArgumentGroup) -> None:
    flags.add_micro_batch_flag(g)
    g.add_argument("--global-batch-size", type=int, default=_BATCH.global_batch_size, help="packs per optimizer step")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=_OPT.optimizer)
    g.add_argument("--lr", type=float, default=_OPT.lr)
    g.add_argument("--min-lr", type=float, default=_OPT.min_lr)
    g.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help=f"warm-up share of the decay iterations (default {DEFAULT_WARMUP_FRACTION:g} unless --lr-warmup-iters)",
    )
    g.add_argument(
        "--lr-warmup-iters", type=int, default=None, help="warm-up iterations (not with --lr-warmup-fraction)"
    )
    g.add_argument(
        "--lr-decay-iters", type=int, default=None, help="iterations of the decay to --min-lr (default: all)"
    )
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default=_OPT.lr_decay_style)
    g.add_argument("--weight-decay", type=float, default=_OPT.weight_decay)
    g.add_argument("--adam-beta1", type=float, default=_OPT.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=_OPT.adam_beta2)
    g.add_argument("--clip-grad", type=float, default=_OPT.clip_grad, help="global grad-norm clip (0: off)")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 master weights")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training packs")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps")
    g.add_argument(
        "--train-samples", type=int, default=None, help="packs in all: --train-samples // --global-batch-size steps"
    )
    g.add_argument("--seed", type=int, default=_BATCH.seed)
    flags.add_recompute_flag(g)


def _add_checkpoints_and_logs(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--load",
        type=Path,
        default=None,
        help="resume from the latest checkpoint of this --save folder (none there yet: start fresh)",
    )
    g.add_argument(
        "--finetune",
        action="store_true",
        help="start from the weights of --load's checkpoint only: iteration 0, no optimizer, schedule, RNG or data "
        "position (a converted model folder works too)",
    )
    g.add_argument("--no-load-optim", action="store_true", help="resume without the optimizer state (it starts fresh)")
    g.add_argument("--no-load-rng", action="store_true", help="resume without the RNG states (they come from --seed)")
    g.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="resume with the flags' learning-rate schedule where it differs from the checkpoint's (else refused)",
    )
    g.add_argument("--save", type=Path, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit after this many iterations")
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="always on: SIGTERM or SIGUSR1 saves a checkpoint and exits; accepted for Megatron-LM launch lines",
    )
    g.add_argument(
        "--keep-checkpoints", type=int, default=_CKPT.keep_checkpoints, help="how many recent checkpoints to keep"
    )
    g.add_argument("--export-hf", type=Path, default=None, help="write a Hugging Face folder at the end")
    flags.add_verify_checksums_flag(g)
    g.add_argument("--log-interval", type=int, default=_LOG.log_interval)
    g.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help="validation loss every N iterations (needs --valid-data-path or a --split with a valid part)",
    )
    g.add_argument(
        "--eval-iters",
        type=int,
        default=None,
        help="validation packs per evaluation, in global batches: the first N x --global-batch-size (default: every "
        "pack; 0: no validation)",
    )
    g.add_argument("--tensorboard-dir", type=Path, default=None)
    g.add_argument("--wandb-project", type=str, default=None)
    g.add_argument("--wandb-exp-name", type=str, default=None, help="the W&B run's name")
    g.add_argument("--wandb-save-dir", type=Path, default=None, help="where W&B writes its local files")
    flags.add_progress_flag(g)
    g.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=_CHECKS.max_nonfinite_steps,
        help="stop (exit 1, nothing saved) after this many steps in a row with a non-finite loss or gradient norm "
        "(0: never)",
    )
    g.add_argument(
        "--check-for-spiky-loss",
        action="store_true",
        help=f"stop also on a loss spike (over {_CHECKS.spike_factor:g}x the running mean) or a zero gradient norm "
        "(without it they are reported in the log)",
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags, with YAML values as defaults; raises :class:`ArgumentError` for a bad YAML config."""
    return train_config(_parse_flags(argv))


def _parse_flags(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        parser.set_defaults(**_read_yaml(pre.config, parser))
    return parser.parse_args(argv)


def train_config(a: argparse.Namespace) -> TrainConfig:
    """The typed settings of parsed flags (no checks: :func:`plan.plan` makes them)."""
    return TrainConfig(
        model=ModelConfig(a.pretrained_checkpoint, a.device, a.bf16, a.distributed_timeout_minutes),
        data=DataConfig(tuple(a.data_path), a.valid_data_path, a.seq_length, a.eval_interval, a.eval_iters, a.split),
        parallel=flags.parallel_layout(a),
        focusft=flags.focusft_config(a, device=a.device, seed=a.seed),
        optimization=OptimizationConfig(
            optimizer=a.optimizer,
            lr=a.lr,
            min_lr=a.min_lr,
            lr_warmup_fraction=a.lr_warmup_fraction,
            lr_warmup_iters=a.lr_warmup_iters,
            lr_decay_iters=a.lr_decay_iters,
            lr_decay_style=a.lr_decay_style,
            weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2,
            clip_grad=a.clip_grad,
        ),
        batch=BatchConfig(a.micro_batch_size, a.global_batch_size, a.epochs, a.train_iters, a.train_samples, a.seed),
        checkpoints=CheckpointConfig(
            a.load,
            a.save,
            a.save_interval,
            a.exit_interval,
            a.keep_checkpoints,
            a.export_hf,
            verify_checksums=not a.no_verify_checksums,
            finetune=a.finetune,
            load_optim=not a.no_load_optim,
            load_rng=not a.no_load_rng,
            override_opt_param_scheduler=a.override_opt_param_scheduler,
        ),
        logging=LoggingConfig(
            a.log_interval,
            a.tensorboard_dir,
            a.wandb_project,
            a.wandb_exp_name,
            a.wandb_save_dir,
            progress=not a.no_progress,
        ),
        checks=DivergenceConfig(max_nonfinite_steps=a.max_nonfinite_steps, stop_on_anomaly=a.check_for_spiky_loss),
        always_on=tuple(flag for flag, dest in ALWAYS_ON_FLAGS.items() if getattr(a, dest)),
    )


def _read_yaml(path: Path, parser: argparse.ArgumentParser) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ArgumentError(f"--config {path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise ArgumentError(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known:
            raise ArgumentError(f"--config {path}: unknown key {key!r} (keys are train.py's flag names)")
        out[dest] = _yaml_value(path, key, value, known[dest])
    return out


def _yaml_value(path: Path, key: object, value: object, action: argparse.Action) -> object:
    """``value`` checked as argparse checks the flag on the command line: its type and its choices."""
    if value is None:
        return None
    if action.nargs == "+":  # --data-path: a list, or a string of words (as the shell splits them)
        words = value.split() if isinstance(value, str) else value
        if not isinstance(words, list) or not words or any(isinstance(w, (bool, list, dict)) for w in words):
            raise ArgumentError(f"--config {path}: {key}: expected a list or a string of words, got {value!r}")
        return [str(w) for w in words]
    if action.nargs == 0:  # store_true, --bilevel/--no-bilevel
        if not isinstance(value, bool):
            raise ArgumentError(f"--config {path}: {key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, (bool, list, dict)):
        raise ArgumentError(f"--config {path}: {key}: invalid value {value!r}")
    if action.type is not None:
        try:
            # As on the command line: the YAML scalar's text through the flag's type (so 32.0 is no int).
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", str(action.type))
            raise ArgumentError(f"--config {path}: {key}: invalid {name} value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ArgumentError(f"--config {path}: {key}: invalid choice {value!r} (choose from {choices})")
    return value
