"""The plan of a training run: every check that needs no model and no GPU, and every read from disk the
set-up needs, once, before any distributed start-up.

:func:`plan` checks the flags and how they combine, finds the checkpoint ``--load`` resumes from and reads its
training state, reads the metadata of the checkpoint whose weights the run loads, opens the data sets (pack
count, pack length, vocabulary), computes the iterations and the learning-rate schedule, and checks the
export folder.  A bad run raises :class:`~megatron_focusft.training.errors.SetupError` naming the flag; a good
one gives a :class:`TrainPlan`, from which :func:`megatron_focusft.training.loop.setup` only builds.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_focusft.config import FocuSFTConfigError
from megatron_focusft.convert import trust
from megatron_focusft.convert.megatron_io import MODEL_PARTS, CheckpointMeta, latest_checkpoint
from megatron_focusft.data.dataset import PackedDataset
from megatron_focusft.models.qwen2 import ConfigError
from megatron_focusft.pipeline.split import PipelineSplitError
from megatron_focusft.training.checkpoint import (
    RunIdentity,
    SavedTrainState,
    check_resume_compatible,
    find_resume,
    read_train_state,
)
from megatron_focusft.training.config import TrainConfig
from megatron_focusft.training.errors import SetupError


@dataclass(frozen=True)
class Schedule:
    """The run's length and its learning-rate schedule (Megatron's ``OptimizerParamScheduler``)."""

    train_iters: int
    warmup_iters: int
    lr: float
    min_lr: float
    decay_style: str
    weight_decay: float

    def scheduler_state(self) -> dict:
        """What ``OptimizerParamScheduler.state_dict()`` holds for this schedule, keyed like it."""
        return {
            "max_lr": self.lr,
            "min_lr": self.min_lr,
            "lr_warmup_steps": self.warmup_iters,
            "lr_decay_steps": self.train_iters,
            "lr_decay_style": self.decay_style,
            "start_wd": self.weight_decay,
        }


@dataclass(frozen=True)
class TrainPlan:
    """What :func:`plan` found: everything the set-up builds from."""

    config: TrainConfig
    world_size: int
    data_parallel_size: int
    micro_batches: int  # per DP rank and optimizer step
    source: Path  # the checkpoint whose weights the model loads: the resumed one, else the pretrained one
    meta: CheckpointMeta  # source's metadata
    resume: SavedTrainState | None  # the resumed checkpoint's train_state.pt; None: a fresh start
    train_data: PackedDataset  # opened (memory-mapped) once
    valid_data: PackedDataset | None
    schedule: Schedule
    run: RunIdentity  # stored in every checkpoint, checked on resume


def plan(config: TrainConfig, world_size: int | None = None) -> TrainPlan:
    """Every check of a run that needs no model and no GPU, and every read the set-up needs, in this order:
    layout, data files, flags, sequence length, resume, model, vocabulary, schedule, resume compatibility,
    export.  ``world_size``: default ``$WORLD_SIZE`` (1)."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dp = _check_layout(config, world_size)
    headers = _read_data_headers(config)
    _check_flags(config)
    _check_seq_length(config.data.seq_length, headers)
    resumed = find_resume(config.checkpoints.load, config.checkpoints.save)
    source, meta = _read_model(config, resumed)
    _check_vocab(headers, meta, resumed or config.model.pretrained_checkpoint)
    train_data = PackedDataset(config.data.data_path)
    schedule = make_schedule(config, len(train_data))
    run = RunIdentity(config.batch.seed, config.batch.global_batch_size, len(train_data))
    resume = None
    if resumed is not None:
        resume = read_train_state(resumed)
        check_resume_compatible(config.checkpoints.load, resume, run, schedule.scheduler_state())
    export = config.checkpoints.export_hf
    if export is not None and Path(export).exists():
        finished = resume is not None and meta.iteration >= schedule.train_iters
        if not finished:
            raise SetupError(f"--export-hf {export} already exists; choose a new folder (nothing was run)")
    valid = config.data.valid_data_path
    return TrainPlan(
        config=config,
        world_size=world_size,
        data_parallel_size=dp,
        micro_batches=config.batch.global_batch_size // (config.batch.micro_batch_size * dp),
        source=source,
        meta=meta,
        resume=resume,
        train_data=train_data,
        valid_data=PackedDataset(valid) if valid is not None else None,
        schedule=schedule,
        run=run,
    )


def make_schedule(config: TrainConfig, num_packs: int) -> Schedule:
    """Training iterations (``--train-iters``, or ``--epochs`` over ``num_packs`` packs) and the schedule."""
    batch, opt = config.batch, config.optimization
    train_iters = batch.train_iters or max(1, math.floor(num_packs * batch.epochs / batch.global_batch_size))
    warmup = int(opt.lr_warmup_fraction * train_iters)
    return Schedule(train_iters, warmup, opt.lr, opt.min_lr, opt.lr_decay_style, opt.weight_decay)


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_layout(config: TrainConfig, world_size: int) -> int:
    """The data-parallel size, once the layout, the backend and the batch sizes fit the world."""
    layout = config.parallel
    tp, cp, pp = layout.tensor_model_parallel_size, layout.context_parallel_size, layout.pipeline_model_parallel_size
    if min(tp, cp, pp) < 1 or world_size % (tp * cp * pp):
        raise SetupError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"x --context-parallel-size {cp} x --pipeline-model-parallel-size {pp}"
        )
    backend = config.focusft.attention_backend
    if cp > 1 and backend == "te":
        raise SetupError("--context-parallel-size > 1 needs --attention-backend flex or dense (all-gather KV)")
    if backend == "te" and not config.model.bf16:
        raise SetupError(
            "--attention-backend te needs --bf16: TransformerEngine's packed (thd) attention has only fused "
            "bf16/fp16 kernels"
        )
    dp = config.parallel.data_parallel_size(world_size)
    mbs, gbs = config.batch.micro_batch_size, config.batch.global_batch_size
    if mbs < 1 or gbs % (mbs * dp):
        raise SetupError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp}"
        )
    return dp


def _read_data_headers(config: TrainConfig) -> dict[str, tuple[str, dict]]:
    """``{flag: (prefix, PREFIX.json)}`` of the training data and the validation data, if any."""
    data = config.data
    if data.data_path is None:
        raise SetupError("--data-path is required (a PREFIX written by tools/preprocess_data.py)")
    headers = {}
    for prefix, flag in ((data.data_path, "--data-path"), (data.valid_data_path, "--valid-data-path")):
        if prefix is None:
            continue
        missing = [s for s in (".bin", ".idx", ".json") if not Path(prefix + s).is_file()]
        if missing:
            raise SetupError(f"{flag} {prefix}: missing {', '.join(prefix + s for s in missing)}")
        try:
            headers[flag] = (prefix, json.loads(Path(prefix + ".json").read_text()))
            int(headers[flag][1]["pack_length"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SetupError(f"{flag} {prefix}.json: unreadable metadata ({e!r})") from None
    return headers


def _check_flags(config: TrainConfig) -> None:
    """The flags on their own and in pairs (nothing read from disk)."""
    batch, opt, ckpt = config.batch, config.optimization, config.checkpoints
    if config.model.bf16 and config.model.device != "cuda":
        raise SetupError("--bf16 needs --device cuda (Megatron's mixed-precision optimizer is CUDA-only)")
    if batch.epochs is None and batch.train_iters is None:
        raise SetupError("give --epochs or --train-iters")
    if batch.train_iters is not None and batch.train_iters < 1:
        raise SetupError(f"--train-iters {batch.train_iters} must be at least 1")
    if batch.epochs is not None and not batch.epochs > 0:
        raise SetupError(f"--epochs {batch.epochs} must be positive")
    if not 0.0 <= opt.lr_warmup_fraction < 1.0:
        raise SetupError(f"--lr-warmup-fraction {opt.lr_warmup_fraction} must be in [0, 1)")
    if not 0.0 <= opt.min_lr <= opt.lr:
        raise SetupError(f"--min-lr {opt.min_lr} must be between 0 and --lr {opt.lr}")
    if ckpt.save_interval is not None and ckpt.save is None:
        raise SetupError("--save-interval needs --save")
    if ckpt.exit_interval is not None and ckpt.save is None:
        raise SetupError("--exit-interval needs --save (it saves a checkpoint and exits)")
    if config.data.eval_interval is not None and config.data.valid_data_path is None:
        raise SetupError("--eval-interval needs --valid-data-path")
    for flag, value in (("--eval-interval", config.data.eval_interval), ("--save-interval", ckpt.save_interval)):
        if value is not None and value < 1:
            raise SetupError(f"{flag} {value} must be at least 1")
    if config.checks.max_nonfinite_steps < 0:
        raise SetupError(f"--max-nonfinite-steps {config.checks.max_nonfinite_steps} must be >= 0 (0: never stop)")


def _check_seq_length(seq_length: int | None, headers: dict[str, tuple[str, dict]]) -> None:
    """``--seq-length`` against each data set's pack length: shorter is an error, longer a warning."""
    for flag, (_, meta) in headers.items():
        pack_length = int(meta["pack_length"])
        if seq_length is not None and seq_length < pack_length:
            raise SetupError(
                f"--seq-length {seq_length} is smaller than the pack length {pack_length} of {flag} "
                "(packs cannot be cut; omit --seq-length or re-pack the data)"
            )
        if seq_length is not None and seq_length > pack_length and _rank0():
            print(
                f"warning: --seq-length {seq_length} is larger than the pack length {pack_length} of {flag}: "
                "every pack gets padded",
                file=sys.stderr,
            )


def _read_model(config: TrainConfig, resumed: Path | None) -> tuple[Path, CheckpointMeta]:
    """The checkpoint whose weights the run loads (the resumed one, else the pretrained one) and its metadata,
    checked against the layout and the FocuSFT settings.  Its files are checked first, before any is read
    (:func:`~megatron_focusft.convert.trust.check_checkpoint`: checksums, pickles): all of a resumed checkpoint,
    the model part of a pretrained one."""
    source = resumed or config.model.pretrained_checkpoint
    if source is None:
        if config.checkpoints.load is not None:
            raise SetupError(
                f"--load {config.checkpoints.load} holds no checkpoint yet; give --pretrained-checkpoint to start"
            )
        raise SetupError("--pretrained-checkpoint is required unless --load resumes a run")
    tp = config.parallel.tensor_model_parallel_size
    flag = "--load" if resumed is not None else "--pretrained-checkpoint"
    try:
        folder = latest_checkpoint(Path(source)) or Path(source)
        try:
            parts = None if resumed is not None else MODEL_PARTS
            trust.check_checkpoint(folder, parts, checksums=config.checkpoints.verify_checksums)
        except trust.CheckpointError as e:
            raise SetupError(f"{flag} {config.checkpoints.load if resumed else source}: {e}") from None
        meta = CheckpointMeta.read(folder)
        meta.arch.check_tensor_parallel(tp)
        config.parallel.pipeline_split(meta.arch.num_layers).validate()
        if config.parallel.sequence_parallel and tp == 1:
            raise SetupError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        config.focusft.validate(hidden_size=meta.arch.hidden_size, ffn_hidden_size=meta.arch.ffn_hidden_size)
    except (ConfigError, FocuSFTConfigError, PipelineSplitError) as e:
        raise SetupError(str(e)) from None
    return folder, meta


def _check_vocab(headers: dict[str, tuple[str, dict]], meta: CheckpointMeta, source: Path) -> None:
    for flag, (prefix, data) in headers.items():
        vocab = data.get("vocab_size")
        if vocab is not None and int(vocab) > meta.arch.vocab_size:
            raise SetupError(
                f"{flag} {prefix}: the data's vocab_size {vocab} is larger than the model's "
                f"{meta.arch.vocab_size} ({source}); was it tokenized for another model?"
            )
