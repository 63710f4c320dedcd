"""The plan of a training run: every check that needs no model and no GPU, and every read from disk the
set-up needs, once, before any distributed start-up.

:func:`plan` checks the flags and how they combine, finds the checkpoint ``--load`` resumes from and reads its
training state, reads the metadata of the checkpoint whose weights the run loads, opens the data sets (pack
count, pack length, vocabulary) and lays out their blend and split, computes the iterations and the
learning-rate schedule, and checks the export folder.  A bad run raises
:class:`~megatron_focusft.training.errors.SetupError` naming the flag; a good one gives a :class:`TrainPlan`, from
which :func:`megatron_focusft.training.loop.setup` only builds, and the notes rank 0 prints at the start (what a
Megatron-LM flag does here, what a resume keeps and drops).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_focusft.config import FocuSFTConfigError
from megatron_focusft.convert import trust
from megatron_focusft.convert.megatron_io import MODEL_PARTS, CheckpointMeta, latest_checkpoint
from megatron_focusft.data.dataset import BlendedPacks, PackedDataset, PackRange, Packs, split_ranges
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
from megatron_focusft.training.optimizer import DEFAULT_WARMUP_FRACTION

Blend = tuple[tuple[str, float | None], ...]  # --data-path's (prefix, weight) pairs; weight None: unweighted


@dataclass(frozen=True)
class Schedule:
    """The run's length and its learning-rate schedule (Megatron's ``OptimizerParamScheduler``)."""

    train_iters: int
    warmup_iters: int
    decay_iters: int
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
            "lr_decay_steps": self.decay_iters,
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
    resume: SavedTrainState | None  # the resumed checkpoint's train_state.pt; None: a fresh start (or --finetune)
    train_data: Packs  # opened (memory-mapped) once: one dataset, its --split part, or a blend of them
    valid_data: Packs | None  # the packs of one evaluation, in order
    schedule: Schedule
    run: RunIdentity  # stored in every checkpoint, checked on resume
    notes: tuple[str, ...] = ()  # said once at the start, by rank 0


def plan(config: TrainConfig, world_size: int | None = None) -> TrainPlan:
    """Every check of a run that needs no model and no GPU, and every read the set-up needs, in this order:
    layout, data files, flags, sequence length, resume, model, vocabulary, split and blend, schedule, resume
    compatibility, export.  ``world_size``: default ``$WORLD_SIZE`` (1)."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dp = _check_layout(config, world_size)
    blend = data_blend(config.data.data_path)
    headers = _read_data_headers(config, blend)
    fractions = _check_flags(config)
    _check_seq_length(config.data.seq_length, headers)
    ckpt = config.checkpoints
    resumed = None if ckpt.finetune else find_resume(ckpt.load, ckpt.save)
    source, meta = _read_model(config, resumed)
    _check_vocab(headers, meta, source)
    datasets = [PackedDataset(prefix) for prefix, _ in blend]
    train_parts, valid_parts, test_packs = _split(config.data.split, fractions, blend, datasets)
    num_packs = sum(len(p) for p in train_parts)
    schedule = make_schedule(config, num_packs)
    weights = _weights(blend, train_parts)
    train_data = _training_data(train_parts, weights, schedule.train_iters * config.batch.global_batch_size, config)
    valid_data, notes = _validation(config, valid_parts, weights)
    described = "" if len(train_parts) == 1 else "+".join(f"{w:.6g}x{len(p)}" for w, p in zip(weights, train_parts))
    run = RunIdentity(config.batch.seed, config.batch.global_batch_size, num_packs, described)
    resume, schedule_changes = None, None
    if resumed is not None:
        resume = read_train_state(resumed)
        schedule_changes = check_resume_compatible(
            ckpt.load, resume, run, schedule.scheduler_state(), override_schedule=ckpt.override_opt_param_scheduler
        )
    export = ckpt.export_hf
    if export is not None and Path(export).exists():
        finished = resume is not None and meta.iteration >= schedule.train_iters
        if not finished:
            raise SetupError(f"--export-hf {export} already exists; choose a new folder (nothing was run)")
    if test_packs:
        notes.append(f"--split {config.data.split}: {test_packs} test packs held out (this trainer runs no test set)")
    return TrainPlan(
        config=config,
        world_size=world_size,
        data_parallel_size=dp,
        micro_batches=config.batch.global_batch_size // (config.batch.micro_batch_size * dp),
        source=source,
        meta=meta,
        resume=resume,
        train_data=train_data,
        valid_data=valid_data,
        schedule=schedule,
        run=run,
        notes=(*_flag_notes(config, schedule), *notes, *_resume_notes(config, source, resume, schedule_changes)),
    )


def make_schedule(config: TrainConfig, num_packs: int) -> Schedule:
    """The run's iterations (``--train-iters``; ``--train-samples`` // global batch, as Megatron-LM counts them; or
    ``--epochs`` over ``num_packs`` packs), its decay (``--lr-decay-iters``, else every iteration) and warm-up
    (``--lr-warmup-iters``, else ``--lr-warmup-fraction`` of the decay, as Megatron-LM takes it)."""
    batch, opt = config.batch, config.optimization
    gbs = batch.global_batch_size
    if batch.train_iters is not None:
        train_iters = batch.train_iters
    elif batch.train_samples is not None:
        train_iters = batch.train_samples // gbs
        if train_iters < 1:
            raise SetupError(
                f"--train-samples {batch.train_samples} is less than one --global-batch-size ({gbs} packs)"
            )
    else:
        train_iters = max(1, math.floor(num_packs * batch.epochs / gbs))
    decay = opt.lr_decay_iters or train_iters
    if opt.lr_warmup_iters is not None:
        warmup = opt.lr_warmup_iters
        if warmup >= decay:
            raise SetupError(
                f"--lr-warmup-iters {warmup} must be less than the {decay} decay iterations "
                "(--lr-decay-iters, else the run's)"
            )
    else:
        fraction = DEFAULT_WARMUP_FRACTION if opt.lr_warmup_fraction is None else opt.lr_warmup_fraction
        warmup = int(fraction * decay)
    return Schedule(train_iters, warmup, decay, opt.lr, opt.min_lr, opt.lr_decay_style, opt.weight_decay)


def data_blend(words: Sequence[str]) -> Blend:
    """``--data-path``'s datasets and weights, read as Megatron-LM reads the list: ``PREFIX ...`` (unweighted)
    or ``WEIGHT PREFIX WEIGHT PREFIX ...``."""
    if not words:
        raise SetupError("--data-path is required (a PREFIX written by tools/preprocess_data.py)")
    numbers = [_number(w) for w in words]
    if all(n is None for n in numbers):
        return tuple((w, None) for w in words)
    weights = numbers[0::2]
    if len(words) % 2 or None in weights or any(n is not None for n in numbers[1::2]):
        raise SetupError(f"--data-path {' '.join(words)}: give PREFIX ..., or WEIGHT PREFIX pairs (a blend)")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise SetupError(f"--data-path {' '.join(words)}: the weight {bad[0]:g} is not positive")
    return tuple(zip(words[1::2], weights))


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


_SPLIT = re.compile(r"^\d+(\.\d*)?([,/]\d+(\.\d*)?){0,2}$")


def _split_fractions(split: str) -> list[float]:
    """``--split``'s train, valid and test shares, normalised by Megatron's own parser (after a format check, since
    that parser skips whatever is not a number)."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    if not _SPLIT.match(split.replace(" ", "")):
        raise SetupError(f"--split {split}: expected up to three non-negative shares, train,valid,test (e.g. 98,2,0)")
    shares = [float(x) for x in re.split(r"[,/]", split.replace(" ", ""))]
    if shares[0] == 0:
        raise SetupError(f"--split {split} leaves no training packs")
    return parse_and_normalize_split(split)


def _split(
    split: str | None, fractions: list[float] | None, blend: Blend, datasets: list[PackedDataset]
) -> tuple[list[PackedDataset | PackRange], list[PackRange], int]:
    """The training parts and validation parts of ``--data-path``'s datasets under ``--split`` (each dataset split
    by its own index ranges, as in Megatron-LM), and the number of test packs held out."""
    if fractions is None:
        return list(datasets), [], 0
    train, valid, test = [], [], 0
    for (prefix, _), dataset in zip(blend, datasets):
        (a, b), (c, d), (e, f) = split_ranges(fractions, len(dataset))
        what = f"--split {split} gives --data-path {prefix} ({len(dataset)} packs)"
        if a == b:
            raise SetupError(f"{what} no training pack")
        if fractions[1] > 0 and c == d:
            raise SetupError(f"{what} no validation pack (give a larger valid share, or --valid-data-path)")
        train.append(PackRange(dataset, a, b))
        if d > c:
            valid.append(PackRange(dataset, c, d))
        test += f - e
    return train, valid, test


def _weights(blend: Blend, parts: Sequence[PackedDataset | PackRange]) -> list[float]:
    """The parts' normalised weights: ``--data-path``'s, or their pack counts for an unweighted list."""
    raw = [len(p) if w is None else w for (_, w), p in zip(blend, parts)]
    return [w / sum(raw) for w in raw]


def _training_data(
    parts: Sequence[PackedDataset | PackRange], weights: list[float], size: int, config: TrainConfig
) -> Packs:
    """One part as it is (the loader shuffles it every epoch), several as a :class:`BlendedPacks` of ``size``
    samples (the run's)."""
    if len(parts) == 1:
        return parts[0]
    try:
        return BlendedPacks(parts, weights, size, config.batch.seed)
    except ValueError as e:
        raise SetupError(f"--data-path: {e}") from None


def _validation(config: TrainConfig, parts: list[PackRange], weights: list[float]) -> tuple[Packs | None, list[str]]:
    """The packs of one evaluation: ``--valid-data-path``'s, else the valid parts of ``--split``; every one of
    them, or the first ``--eval-iters`` global batches (of a blend: drawn in proportion, in each part's order)."""
    data, notes = config.data, []
    sources = [PackedDataset(data.valid_data_path)] if data.valid_data_path is not None else parts
    if not sources:
        return None, notes
    if data.eval_iters == 0:
        return None, ["--eval-iters 0: no validation"]
    total = sum(len(p) for p in sources)
    count = total
    if data.eval_iters is not None:
        count = min(total, data.eval_iters * config.batch.global_batch_size)
        if data.eval_iters * config.batch.global_batch_size > total:
            notes.append(
                f"--eval-iters {data.eval_iters}: the validation set has only {total} packs; each evaluation uses "
                "all of them"
            )
    if len(sources) == 1:
        base, start = (sources[0].dataset, sources[0].start) if isinstance(sources[0], PackRange) else (sources[0], 0)
        return PackRange(base, start, start + count), notes
    try:
        if count == total:  # every pack once
            return BlendedPacks(sources, None, None, config.batch.seed, shuffle=False), notes
        return BlendedPacks(sources, weights, count, config.batch.seed, shuffle=False), notes
    except ValueError as e:
        raise SetupError(f"--data-path: {e}") from None


# What each of arguments.ALWAYS_ON_FLAGS does here: (on cuda, on cpu).
_SIGNALS_SAVE = "always on here (SIGTERM or SIGUSR1 finishes the iteration, saves a checkpoint with --save and exits)"
_ALWAYS_ON_NOTES = {
    "--use-distributed-optimizer": (
        "always on here (Megatron's distributed optimizer shards the optimizer state over the data-parallel ranks)",
        "not used with --device cpu (Megatron's optimizers need CUDA): every data-parallel rank keeps the whole "
        "optimizer state",
    ),
    "--exit-signal-handler": (_SIGNALS_SAVE, _SIGNALS_SAVE),
}


def _flag_notes(config: TrainConfig, schedule: Schedule) -> list[str]:
    """What some flags mean here, said once at the start."""
    cpu = config.model.device == "cpu"
    notes = [f"{flag}: {_ALWAYS_ON_NOTES[flag][cpu]}" for flag in config.always_on]
    samples, gbs = config.batch.train_samples, config.batch.global_batch_size
    if samples is not None and samples % gbs:
        notes.append(
            f"--train-samples {samples}: {schedule.train_iters} iterations of {gbs} packs; the last {samples % gbs} "
            "do not fill a global batch and are not trained (as in Megatron-LM)"
        )
    log = config.logging
    if log.wandb_project is None:
        for flag, value in (("--wandb-exp-name", log.wandb_exp_name), ("--wandb-save-dir", log.wandb_save_dir)):
            if value is not None:
                notes.append(f"{flag} {value}: unused without --wandb-project (no W&B run)")
    return notes


def _resume_notes(
    config: TrainConfig, source: Path, resume: SavedTrainState | None, schedule_changes: list[str] | None
) -> list[str]:
    """What a resume (or ``--finetune``) keeps and what it leaves behind, said once at the start."""
    ckpt = config.checkpoints
    if ckpt.finetune:
        return [
            f"--finetune: the weights of {source} only; iteration 0 with a fresh optimizer, schedule and data position"
        ]
    if resume is None:
        return []
    notes = []
    if not ckpt.load_optim:
        notes.append("--no-load-optim: the optimizer state starts fresh (the learning-rate schedule goes on)")
    if not ckpt.load_rng:
        notes.append(f"--no-load-rng: the RNG states come from --seed {config.batch.seed}, not the checkpoint")
    if ckpt.override_opt_param_scheduler:
        changes = "; ".join(schedule_changes) if schedule_changes else "none: it equals the checkpoint's"
        notes.append(
            f"--override-opt-param-scheduler: the flags' learning-rate schedule from step "
            f"{resume.scheduler['num_steps']}: {changes}"
        )
    return notes


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


def _read_data_headers(config: TrainConfig, blend: Blend) -> list[tuple[str, str, dict]]:
    """``(flag, prefix, PREFIX.json)`` of every training dataset and of the validation data, if any."""
    prefixes = [("--data-path", prefix) for prefix, _ in blend]
    if config.data.valid_data_path is not None:
        prefixes.append(("--valid-data-path", config.data.valid_data_path))
    headers = []
    for flag, prefix in prefixes:
        missing = [s for s in (".bin", ".idx", ".json") if not Path(prefix + s).is_file()]
        if missing:
            raise SetupError(f"{flag} {prefix}: missing {', '.join(prefix + s for s in missing)}")
        try:
            headers.append((flag, prefix, json.loads(Path(prefix + ".json").read_text())))
            int(headers[-1][2]["pack_length"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SetupError(f"{flag} {prefix}.json: unreadable metadata ({e!r})") from None
    return headers


def _check_flags(config: TrainConfig) -> list[float] | None:
    """The flags on their own and in pairs (nothing read from disk); ``--split``'s normalised shares (None: no
    split)."""
    batch, opt, ckpt, data = config.batch, config.optimization, config.checkpoints, config.data
    if config.model.bf16 and config.model.device != "cuda":
        raise SetupError("--bf16 needs --device cuda (Megatron's mixed-precision optimizer is CUDA-only)")
    lengths = [f for f, v in (("--epochs", batch.epochs), ("--train-iters", batch.train_iters),
                              ("--train-samples", batch.train_samples)) if v is not None]  # fmt: skip
    if len(lengths) != 1:
        given = f" (got {' and '.join(lengths)})" if lengths else ""
        raise SetupError(f"give one of --epochs, --train-iters, --train-samples{given}")
    for flag, value, least in (
        ("--train-iters", batch.train_iters, 1),
        ("--train-samples", batch.train_samples, 1),
        ("--lr-warmup-iters", opt.lr_warmup_iters, 0),
        ("--lr-decay-iters", opt.lr_decay_iters, 1),
        ("--eval-iters", data.eval_iters, 0),
        ("--eval-interval", data.eval_interval, 1),
        ("--save-interval", ckpt.save_interval, 1),
        ("--distributed-timeout-minutes", config.model.distributed_timeout_minutes, 1),
    ):
        if value is not None and value < least:
            raise SetupError(f"{flag} {value} must be at least {least}")
    if batch.epochs is not None and not batch.epochs > 0:
        raise SetupError(f"--epochs {batch.epochs} must be positive")
    if opt.lr_warmup_fraction is not None and opt.lr_warmup_iters is not None:
        raise SetupError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if opt.lr_warmup_fraction is not None and not 0.0 <= opt.lr_warmup_fraction < 1.0:
        raise SetupError(f"--lr-warmup-fraction {opt.lr_warmup_fraction} must be in [0, 1)")
    if not 0.0 <= opt.min_lr <= opt.lr:
        raise SetupError(f"--min-lr {opt.min_lr} must be between 0 and --lr {opt.lr}")
    if ckpt.save_interval is not None and ckpt.save is None:
        raise SetupError("--save-interval needs --save")
    if ckpt.exit_interval is not None and ckpt.save is None:
        raise SetupError("--exit-interval needs --save (it saves a checkpoint and exits)")
    if ckpt.finetune:
        if ckpt.load is None:
            raise SetupError("--finetune needs --load (the checkpoint whose weights it starts from)")
        if config.model.pretrained_checkpoint is not None:
            raise SetupError("give --finetune --load or --pretrained-checkpoint, not both (each names the weights)")
        if ckpt.save is not None and Path(ckpt.load).resolve() == Path(ckpt.save).resolve():
            raise SetupError(
                f"--finetune with --load {ckpt.load} = --save: a requeued job would start over at iteration 0 from "
                "its own weights; --save to another folder"
            )
    fractions = None
    if data.split is not None:
        if data.valid_data_path is not None:
            raise SetupError("give --split or --valid-data-path, not both (--split makes the validation set)")
        fractions = _split_fractions(data.split)
    if data.eval_interval is not None and data.valid_data_path is None and not (fractions and fractions[1] > 0):
        raise SetupError("--eval-interval needs --valid-data-path (or a --split with a validation share)")
    if config.checks.max_nonfinite_steps < 0:
        raise SetupError(f"--max-nonfinite-steps {config.checks.max_nonfinite_steps} must be >= 0 (0: never stop)")
    return fractions


def _check_seq_length(seq_length: int | None, headers: list[tuple[str, str, dict]]) -> None:
    """``--seq-length`` against each data set's pack length: shorter is an error, longer a warning."""
    for flag, prefix, meta in headers:
        pack_length = int(meta["pack_length"])
        if seq_length is not None and seq_length < pack_length:
            raise SetupError(
                f"--seq-length {seq_length} is smaller than the pack length {pack_length} of {flag} {prefix} "
                "(packs cannot be cut; omit --seq-length or re-pack the data)"
            )
        if seq_length is not None and seq_length > pack_length and _rank0():
            print(
                f"warning: --seq-length {seq_length} is larger than the pack length {pack_length} of {flag} "
                f"{prefix}: every pack gets padded",
                file=sys.stderr,
            )


def _read_model(config: TrainConfig, resumed: Path | None) -> tuple[Path, CheckpointMeta]:
    """The checkpoint whose weights the run loads (the resumed one, else ``--finetune``'s ``--load``, else the
    pretrained one) and its metadata, checked against the layout and the FocuSFT settings.  Its files are checked
    first, before any is read (:func:`~megatron_focusft.convert.trust.check_checkpoint`: checksums, pickles): all
    of a resumed checkpoint, the model part of any other."""
    ckpt = config.checkpoints
    source = resumed or (ckpt.load if ckpt.finetune else config.model.pretrained_checkpoint)
    if source is None:
        if config.checkpoints.load is not None:
            raise SetupError(
                f"--load {config.checkpoints.load} holds no checkpoint yet; give --pretrained-checkpoint to start"
            )
        raise SetupError("--pretrained-checkpoint is required unless --load resumes a run")
    tp = config.parallel.tensor_model_parallel_size
    flag = "--load" if resumed is not None or ckpt.finetune else "--pretrained-checkpoint"
    try:
        folder = latest_checkpoint(Path(source)) or Path(source)
        try:
            parts = None if resumed is not None else MODEL_PARTS
            trust.check_checkpoint(folder, parts, checksums=config.checkpoints.verify_checksums)
        except trust.CheckpointError as e:
            raise SetupError(f"{flag} {ckpt.load if resumed else source}: {e}") from None
        meta = CheckpointMeta.read(folder)
        meta.arch.check_tensor_parallel(tp)
        config.parallel.pipeline_split(meta.arch.num_layers).validate()
        if config.parallel.sequence_parallel and tp == 1:
            raise SetupError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        config.focusft.validate(hidden_size=meta.arch.hidden_size, ffn_hidden_size=meta.arch.ffn_hidden_size)
    except (ConfigError, FocuSFTConfigError, PipelineSplitError) as e:
        raise SetupError(str(e)) from None
    return folder, meta


def _check_vocab(headers: list[tuple[str, str, dict]], meta: CheckpointMeta, source: Path) -> None:
    for flag, prefix, data in headers:
        vocab = data.get("vocab_size")
        if vocab is not None and int(vocab) > meta.arch.vocab_size:
            raise SetupError(
                f"{flag} {prefix}: the data's vocab_size {vocab} is larger than the model's "
                f"{meta.arch.vocab_size} ({source}); was it tokenized for another model?"
            )
