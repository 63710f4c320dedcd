"""``tools/train.py``'s flags (Megatron's names plus FocuSFT's), an optional YAML config, and the checks
that must pass before any work starts.

A YAML config uses the flag names as keys (``lr: 1.0e-5``, ``focusft-inner-steps: 2`` or
``focusft_inner_steps: 2``); flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from megatron_focusft.config import FocuSFTConfig, FocuSFTConfigError
from megatron_focusft.convert.megatron_io import LATEST_FILE, CheckpointMeta, latest_checkpoint
from megatron_focusft.models.qwen2 import ConfigError


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="FocuSFT training on Megatron-Core")
    p.add_argument("--config", type=Path, default=None, help="YAML file whose keys are these flags' names")
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--pretrained-checkpoint",
        type=Path,
        default=None,
        help="starting weights (tools/convert_hf_to_megatron.py output); not needed to resume",
    )
    g.add_argument("--data-path", type=str, default=None, help="PREFIX written by tools/preprocess_data.py")
    g.add_argument(
        "--valid-data-path",
        type=str,
        default=None,
        help="PREFIX of a validation set: its mean response loss with the current base weights (standard forward, "
        "the run's mask, no fast weights: no inner loop) at every --eval-interval and at the end",
    )
    g.add_argument("--seq-length", type=int, default=None, help="pack length (default: the data's)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    g = p.add_argument_group("optimisation")
    g.add_argument("--micro-batch-size", type=int, default=1, help="packs per micro-batch and DP rank")
    g.add_argument("--global-batch-size", type=int, default=32, help="packs per optimizer step")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.1)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (0: off)")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 master weights")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None)
    length.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g = p.add_argument_group("FocuSFT")
    g.add_argument("--bilevel", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--attention-mask", choices=("causal", "glm"), default="glm")
    g.add_argument(
        "--attention-backend",
        choices=("flex", "dense", "te"),
        default=None,
        help="default: flex on cuda, dense on cpu",
    )
    g.add_argument("--focusft-inner-steps", type=int, default=2)
    g.add_argument("--focusft-inner-lr", type=float, default=1.0)
    g.add_argument("--focusft-inner-grad-clip", type=float, default=1.0)
    g.add_argument("--focusft-lora-rank", type=int, default=32)
    g.add_argument("--focusft-lora-alpha", type=float, default=64.0)
    g.add_argument("--focusft-layer-fraction", type=float, default=0.35)
    g.add_argument("--loss-reduction", choices=("sample", "token"), default="sample")
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument(
        "--load",
        type=Path,
        default=None,
        help="resume from the latest checkpoint of this --save folder (none there yet: start fresh)",
    )
    g.add_argument("--save", type=Path, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit after this many iterations")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--export-hf", type=Path, default=None, help="write a Hugging Face folder at the end")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument(
        "--eval-interval", type=int, default=None, help="validation loss every N iterations (needs --valid-data-path)"
    )
    g.add_argument("--tensorboard-dir", type=Path, default=None)
    g.add_argument("--wandb-project", type=str, default=None)
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with YAML values as defaults; raises :class:`ArgumentError` for unknown YAML keys."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        parser.set_defaults(**_read_yaml(pre.config, parser))
    return parser.parse_args(argv)


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
    if out.get("epochs") is not None and out.get("train_iters") is not None:
        raise ArgumentError(f"--config {path}: give 'epochs' or 'train-iters', not both")
    return out


def _yaml_value(path: Path, key: object, value: object, action: argparse.Action) -> object:
    """``value`` checked as argparse checks the flag on the command line: its type and its choices."""
    if value is None:
        return None
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


def focusft_config(args: argparse.Namespace) -> FocuSFTConfig:
    return FocuSFTConfig(
        bilevel=args.bilevel,
        inner_steps=args.focusft_inner_steps,
        inner_lr=args.focusft_inner_lr,
        inner_grad_clip=args.focusft_inner_grad_clip,
        lora_rank=args.focusft_lora_rank,
        lora_alpha=args.focusft_lora_alpha,
        layer_fraction=args.focusft_layer_fraction,
        attention_mask=args.attention_mask,
        attention_backend=args.attention_backend or ("flex" if args.device == "cuda" else "dense"),
        loss_reduction=args.loss_reduction,
        seed=args.seed,
        recompute=args.recompute_granularity,
    )


TRAIN_STATE_FILE = "train_state.pt"


def resume_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint ``--load`` resumes from, None for a fresh start, or an error for a bad ``--load``.

    A ``--load`` folder that holds no checkpoint yet (no ``latest``, no ``iter_*`` folder: e.g. only the
    ``tokenizer/`` and logs a first job wrote into ``SAVE`` before it crashed) starts fresh, so a requeued
    job with ``--load SAVE --save SAVE`` works.  A model checkpoint without training state (a converted
    model) is an error pointing at ``--pretrained-checkpoint``.
    """
    if args.load is None:
        return None
    load = Path(args.load)
    if not load.exists():
        if args.save is not None and load.resolve() == Path(args.save).resolve():
            return None  # a first run with --load == --save (auto-resume on SLURM)
        raise ArgumentError(f"--load {load}: no such checkpoint folder")
    if not load.is_dir():
        raise ArgumentError(f"--load {load} is not a folder (give a --save folder of an earlier run)")
    try:
        found = latest_checkpoint(load)
    except ConfigError as e:
        raise ArgumentError(f"--load {load}: {e}") from None
    if found is None:
        iters = sorted(p.name for p in load.iterdir() if p.is_dir() and p.name.startswith("iter_"))
        if iters:
            raise ArgumentError(
                f"--load {load} holds {', '.join(iters)} but no '{LATEST_FILE}' file; write the name of the "
                f"checkpoint to resume from into {load / LATEST_FILE}, or --load that iter_* folder itself"
            )
        return None  # no checkpoint yet: a fresh start (setup says so)
    if not (found / TRAIN_STATE_FILE).is_file():
        raise ArgumentError(
            f"--load {load}: {found} is a model checkpoint without training state (no {TRAIN_STATE_FILE}), "
            f"e.g. a converted model; to start training from it use --pretrained-checkpoint {found}"
        )
    return found


def train_schedule(args: argparse.Namespace, num_packs: int) -> tuple[int, int]:
    """(training iterations, warm-up iterations) of the learning-rate schedule."""
    train_iters = args.train_iters or max(1, math.floor(num_packs * args.epochs / args.global_batch_size))
    return train_iters, int(args.lr_warmup_fraction * train_iters)


def scheduler_values(args: argparse.Namespace, train_iters: int, warmup: int) -> dict:
    """What ``OptimizerParamScheduler.state_dict()`` holds for these flags, keyed like it."""
    return {
        "max_lr": args.lr,
        "min_lr": args.min_lr,
        "lr_warmup_steps": warmup,
        "lr_decay_steps": train_iters,
        "lr_decay_style": args.lr_decay_style,
        "start_wd": args.weight_decay,
    }


# The flags behind each scheduler value, for the message of a changed schedule on resume.
_SCHEDULER_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-fraction (warm-up iterations)",
    "lr_decay_steps": "--train-iters/--epochs (iterations)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
}


def run_identity(args: argparse.Namespace, num_packs: int) -> dict:
    """What a resumed run must share with the run that saved: otherwise the data position is wrong."""
    return {"seed": args.seed, "global_batch_size": args.global_batch_size, "num_packs": num_packs}


def check_resume_compatible(args: argparse.Namespace, saved: dict, num_packs: int) -> None:
    """Refuse a resume whose seed, global batch size, data or learning-rate schedule differ from the
    checkpoint's (``saved``: the checkpoint's ``train_state.pt``)."""
    ckpt = Path(args.load)
    run = saved.get("run", {})
    flags = {"seed": "--seed", "global_batch_size": "--global-batch-size", "num_packs": "--data-path (packs)"}
    for key, value in run_identity(args, num_packs).items():
        if key in run and run[key] != value:
            raise ArgumentError(
                f"{flags[key]} is {value} but the checkpoint in --load {ckpt} was trained with {run[key]}; "
                "resuming would read the data at the wrong position (use the same value or a new --save)"
            )
    train_iters, warmup = train_schedule(args, num_packs)
    sched = saved.get("scheduler", {})
    diffs = [
        f"{_SCHEDULER_FLAGS[k]} {v} (checkpoint: {sched[k]})"
        for k, v in scheduler_values(args, train_iters, warmup).items()
        if k in sched and sched[k] != v
    ]
    if diffs:
        raise ArgumentError(
            f"--load {ckpt}: the learning-rate schedule differs from the checkpoint's: {'; '.join(diffs)}; "
            "resume with the same values (or start a new run with --pretrained-checkpoint)"
        )


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def validate(args: argparse.Namespace, world_size: int | None = None) -> None:
    """Every check that needs no model and no GPU; raises :class:`ArgumentError` naming the flag."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    if tp < 1 or world_size % (tp * cp):
        raise ArgumentError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"x --context-parallel-size {cp}"
        )
    if cp > 1 and (args.attention_backend == "te"):
        raise ArgumentError("--context-parallel-size > 1 needs --attention-backend flex or dense (all-gather KV)")
    if args.attention_backend == "te" and not args.bf16:
        raise ArgumentError(
            "--attention-backend te needs --bf16: TransformerEngine's packed (thd) attention has only fused "
            "bf16/fp16 kernels"
        )
    dp = world_size // (tp * cp)
    if args.micro_batch_size < 1 or args.global_batch_size % (args.micro_batch_size * dp):
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}"
        )
    if args.data_path is None:
        raise ArgumentError("--data-path is required (a PREFIX written by tools/preprocess_data.py)")
    data_meta = {}
    for prefix, flag in ((args.data_path, "--data-path"), (args.valid_data_path, "--valid-data-path")):
        if prefix is not None:
            missing = [s for s in (".bin", ".idx", ".json") if not Path(prefix + s).is_file()]
            if missing:
                raise ArgumentError(f"{flag} {prefix}: missing {', '.join(prefix + s for s in missing)}")
            try:
                data_meta[flag] = json.loads(Path(prefix + ".json").read_text())
                int(data_meta[flag]["pack_length"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ArgumentError(f"{flag} {prefix}.json: unreadable metadata ({e!r})") from None
    if args.bf16 and args.device != "cuda":
        raise ArgumentError("--bf16 needs --device cuda (Megatron's mixed-precision optimizer is CUDA-only)")
    if args.epochs is None and args.train_iters is None:
        raise ArgumentError("give --epochs or --train-iters")
    if args.train_iters is not None and args.train_iters < 1:
        raise ArgumentError(f"--train-iters {args.train_iters} must be at least 1")
    if args.epochs is not None and not args.epochs > 0:
        raise ArgumentError(f"--epochs {args.epochs} must be positive")
    if not 0.0 <= args.lr_warmup_fraction < 1.0:
        raise ArgumentError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be in [0, 1)")
    if not 0.0 <= args.min_lr <= args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save")
    if args.exit_interval is not None and args.save is None:
        raise ArgumentError("--exit-interval needs --save (it saves a checkpoint and exits)")
    if args.eval_interval is not None and args.valid_data_path is None:
        raise ArgumentError("--eval-interval needs --valid-data-path")
    for flag, value in (("--eval-interval", args.eval_interval), ("--save-interval", args.save_interval)):
        if value is not None and value < 1:
            raise ArgumentError(f"{flag} {value} must be at least 1")
    for flag, meta in data_meta.items():
        pack_length = int(meta["pack_length"])
        if args.seq_length is not None and args.seq_length < pack_length:
            raise ArgumentError(
                f"--seq-length {args.seq_length} is smaller than the pack length {pack_length} of {flag} "
                "(packs cannot be cut; omit --seq-length or re-pack the data)"
            )
        if args.seq_length is not None and args.seq_length > pack_length and _rank0():
            print(
                f"warning: --seq-length {args.seq_length} is larger than the pack length {pack_length} of {flag}: "
                "every pack gets padded",
                file=sys.stderr,
            )
    resume = resume_checkpoint(args)
    source = resume or args.pretrained_checkpoint
    if source is None:
        if args.load is not None:
            raise ArgumentError(f"--load {args.load} holds no checkpoint yet; give --pretrained-checkpoint to start")
        raise ArgumentError("--pretrained-checkpoint is required unless --load resumes a run")
    try:
        meta = CheckpointMeta.read(latest_checkpoint(Path(source)) or Path(source))
        meta.arch.check_tensor_parallel(tp)
        if args.sequence_parallel and tp == 1:
            raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        focusft_config(args).validate(hidden_size=meta.arch.hidden_size, ffn_hidden_size=meta.arch.ffn_hidden_size)
    except (ConfigError, FocuSFTConfigError) as e:
        raise ArgumentError(str(e)) from None
    for flag, data in data_meta.items():
        vocab = data.get("vocab_size")
        if vocab is not None and int(vocab) > meta.arch.vocab_size:
            raise ArgumentError(
                f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: the data's vocab_size {vocab} is larger "
                f"than the model's {meta.arch.vocab_size} ({source}); was it tokenized for another model?"
            )
    num_packs = _num_packs(args.data_path)
    train_iters, _ = train_schedule(args, num_packs)
    if resume is not None:
        saved = _read_train_state(resume)
        check_resume_compatible(args, saved, num_packs)
    if args.export_hf is not None and Path(args.export_hf).exists():
        finished = resume is not None and CheckpointMeta.read(resume).iteration >= train_iters
        if not finished:
            raise ArgumentError(f"--export-hf {args.export_hf} already exists; choose a new folder (nothing was run)")


def _num_packs(prefix: str) -> int:
    from megatron_focusft.data.dataset import PackedDataset

    return len(PackedDataset(prefix))


def _read_train_state(ckpt: Path) -> dict:
    import torch

    try:
        return torch.load(ckpt / TRAIN_STATE_FILE, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise ArgumentError(f"{ckpt / TRAIN_STATE_FILE}: unreadable ({e})") from None
