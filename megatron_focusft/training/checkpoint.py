"""Training checkpoints: ``SAVE/iter_0000100/`` (model, optimizer, scheduler, RNG, data position) + ``latest``.

Each checkpoint is written under a temporary name (``.iter_N.partial``) and renamed when complete;
``latest`` is replaced atomically afterwards, so a job killed at any moment leaves the previous checkpoint
loadable.  The model part is the same format as the converter's output, so
``tools/convert_megatron_to_hf.py --ckpt SAVE`` exports any checkpoint training wrote.

Resuming: :func:`find_resume` finds the checkpoint of ``--load``, :func:`read_train_state` reads its
``train_state.pt`` (once, in the plan), :func:`check_resume_compatible` refuses a resume whose run or schedule
differ (the schedule may change with ``--override-opt-param-scheduler``), and :func:`load_checkpoint` restores the
optimizer (unless ``--no-load-optim``), scheduler and RNG (unless ``--no-load-rng``) states from it.  Every torch file
is read with ``weights_only=True`` (:func:`~megatron_focusft.convert.trust.torch_load`); the plan checks the
whole checkpoint (checksums, pickles) before any of it is read.

A new checkpoint is sealed (``checksums.json``) and checked as a reader would check it before it is published;
only then does ``latest`` move to it and are older ones pruned, so ``--keep-checkpoints`` never removes the
last checkpoint that loaded cleanly (the one the run resumed from) before a newer one is written and verified.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_focusft.convert import trust
from megatron_focusft.convert.hf_io import copy_tokenizer_files
from megatron_focusft.convert.megatron_io import (
    LATEST_FILE,
    CheckpointMeta,
    latest_checkpoint,
    other_stages_keys,
    save_model,
)
from megatron_focusft.models.qwen2 import ConfigError
from megatron_focusft.training.errors import SetupError

ITER_DIR = re.compile(r"^iter_(\d{7})$")
TRAIN_STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0  # optimizer steps skipped for a non-finite gradient norm


@dataclass(frozen=True)
class RunIdentity:
    """What a resumed run must share with the run that saved: otherwise the data position is wrong."""

    seed: int
    global_batch_size: int
    num_packs: int  # the training packs (of every part of a blend)
    blend: str = ""  # a blend's parts, "WEIGHTxPACKS+...", normalised weights; "": one dataset


# The flags behind each value of the run and of the scheduler, for the messages of a refused resume.
_RUN_FLAGS = {
    "seed": "--seed",
    "global_batch_size": "--global-batch-size",
    "num_packs": "--data-path/--split (training packs)",
    "blend": "--data-path (blend weights x training packs)",
}
_SCHEDULER_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-fraction (warm-up iterations)",
    "lr_decay_steps": "--lr-decay-iters, else --train-iters/--train-samples/--epochs (decay iterations)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
}


@dataclass(frozen=True)
class SavedTrainState:
    """A checkpoint's ``train_state.pt``: the loop's state, the scheduler's ``state_dict()`` and the run."""

    checkpoint: Path
    state: TrainState
    scheduler: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # RunIdentity's fields (absent in older checkpoints)


def find_resume(load: Path | None, save: Path | None) -> Path | None:
    """The checkpoint ``--load`` resumes from, None for a fresh start, or an error for a bad ``--load``.

    A ``--load`` folder that holds no checkpoint yet (no ``latest``, no ``iter_*`` folder: e.g. only the
    ``tokenizer/`` and logs a first job wrote into ``SAVE`` before it crashed) starts fresh, so a requeued
    job with ``--load SAVE --save SAVE`` works.  A model checkpoint without training state (a converted
    model) is an error pointing at ``--pretrained-checkpoint``.
    """
    if load is None:
        return None
    load = Path(load)
    if not load.exists():
        if save is not None and load.resolve() == Path(save).resolve():
            return None  # a first run with --load == --save (auto-resume on SLURM)
        raise SetupError(f"--load {load}: no such checkpoint folder")
    if not load.is_dir():
        raise SetupError(f"--load {load} is not a folder (give a --save folder of an earlier run)")
    try:
        found = latest_checkpoint(load)
    except ConfigError as e:
        raise SetupError(f"--load {load}: {e}") from None
    if found is None:
        iters = sorted(p.name for p in load.iterdir() if p.is_dir() and p.name.startswith("iter_"))
        if iters:
            raise SetupError(
                f"--load {load} holds {', '.join(iters)} but no '{LATEST_FILE}' file; write the name of the "
                f"checkpoint to resume from into {load / LATEST_FILE}, or --load that iter_* folder itself"
            )
        return None  # no checkpoint yet: a fresh start (setup says so)
    if not (found / TRAIN_STATE_FILE).is_file():
        raise SetupError(
            f"--load {load}: {found} is a model checkpoint without training state (no {TRAIN_STATE_FILE}), "
            f"e.g. a converted model; to start training from it use --pretrained-checkpoint {found}"
        )
    return found


def read_train_state(ckpt: Path) -> SavedTrainState:
    """``ckpt/train_state.pt`` (written by :func:`save_checkpoint` on rank 0; tensors and plain values only)."""
    try:
        saved = trust.torch_load(ckpt / TRAIN_STATE_FILE)
    except ConfigError as e:
        raise SetupError(str(e)) from None
    try:
        return SavedTrainState(ckpt, TrainState(**saved["state"]), saved["scheduler"], saved.get("run", {}))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise SetupError(f"{ckpt / TRAIN_STATE_FILE}: unreadable ({e})") from None


def check_resume_compatible(
    load: Path, saved: SavedTrainState, run: RunIdentity, scheduler: dict, *, override_schedule: bool = False
) -> list[str]:
    """Refuse a resume (from ``--load load``) whose seed, global batch size or data differ from the checkpoint's,
    or whose learning-rate schedule (``scheduler``: keyed like ``OptimizerParamScheduler.state_dict()``) does,
    unless ``override_schedule``; the schedule's differences (for the log: the flags' values win)."""
    for key, value in asdict(run).items():
        if key in saved.run and saved.run[key] != value:
            raise SetupError(
                f"{_RUN_FLAGS[key]} is {value} but the checkpoint in --load {load} was trained with "
                f"{saved.run[key]}; resuming would read the data at the wrong position (use the same value or a "
                "new --save)"
            )
    diffs = [
        f"{_SCHEDULER_FLAGS[k]} {v} (checkpoint: {saved.scheduler[k]})"
        for k, v in scheduler.items()
        if k in saved.scheduler and saved.scheduler[k] != v
    ]
    if diffs and not override_schedule:
        raise SetupError(
            f"--load {load}: the learning-rate schedule differs from the checkpoint's: {'; '.join(diffs)}; "
            "resume with the same values, give --override-opt-param-scheduler for the flags' schedule, or start a "
            "new run with --pretrained-checkpoint"
        )
    return diffs


def _rank0() -> bool:
    return dist.get_rank() == 0


def _rng_state() -> dict:
    """This process's RNG states in plain values and tensors (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        numpy_state = (
            numpy_state["name"],
            keys,
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    random.setstate(state["python"])
    np.random.set_state(numpy_state)  # older checkpoints: the tuple of np.random.get_state() itself
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    save_dir: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    meta: CheckpointMeta,
    tokenizer_dir: Path | None,
    keep: int,
    run: RunIdentity | None = None,
) -> Path:
    """Write ``save_dir/iter_{iteration}`` (collective), point ``latest`` at it, drop all but ``keep``.

    ``run`` (seed, global batch size, the data's pack count) is stored for the resume checks.  An
    ``iter_{iteration}`` folder already there is stale (another trajectory, e.g. after ``latest`` was rolled
    back): it is replaced, the new checkpoint written aside first (``.iter_N.partial``) and swapped in.
    Leftover ``.iter_*.partial`` / ``.iter_*.stale`` folders of a killed save are removed.  The caller never
    saves the same iteration twice (the loop remembers what it saved).
    """
    name = f"iter_{state.iteration:07d}"
    final = save_dir / name
    tmp = save_dir / f".{name}.partial"
    decision = [final.exists()] if _rank0() else [None]
    dist.broadcast_object_list(decision, src=0)  # rank 0's view of the folder decides for every rank
    replace = bool(decision[0])
    if _rank0():
        save_dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*save_dir.glob(".iter_*.partial"), *save_dir.glob(".iter_*.stale")]:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        save_model(model, tmp, meta)
        optimizer.save(tmp, model)
        (tmp / "rank_state").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rank_state" / f"rank_{dist.get_rank():05d}.pt")
        if _rank0():
            saved = {"state": state.__dict__, "scheduler": scheduler.state_dict(), "run": asdict(run) if run else {}}
            torch.save(saved, tmp / TRAIN_STATE_FILE)
            if tokenizer_dir is not None and tokenizer_dir.is_dir():
                copy_tokenizer_files(tokenizer_dir, tmp / "tokenizer")
        other_stages = other_stages_keys(model.sharded_state_dict())  # collective
        dist.barrier()
        outcome = [_seal_and_check(tmp, model, other_stages) if _rank0() else None]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise trust.CheckpointError(
                f"the checkpoint of iteration {state.iteration} failed its check after writing ({outcome[0]}); "
                f"it was not published: {save_dir / LATEST_FILE} is unchanged and nothing was pruned"
            )
    except BaseException:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _rank0():
        _publish(save_dir, tmp, name, replace, keep)
    dist.barrier()
    return final


def _seal_and_check(tmp: Path, model: torch.nn.Module, other_stages: set[str]) -> str | None:
    """Rank 0, once every file is written: ``checksums.json``, then the checks a reader makes (pickles, sizes,
    every tensor's shape against ``model``; ``other_stages``: the other pipeline stages' tensors); the reason
    it fails, or None."""
    try:
        trust.write_checksums(tmp)
        screened = trust.check_checkpoint(tmp, checksums=False)  # just hashed
        trust.check_shapes(model.sharded_state_dict(), screened["model"], tmp / "model", other_stages)
    except (ConfigError, OSError) as e:
        return str(e)
    return None


def _publish(save_dir: Path, tmp: Path, name: str, replace: bool, keep: int) -> None:
    """Rank 0: move the complete ``tmp`` into ``save_dir/name`` (swapping out a stale one), point ``latest`` at
    it, and drop all but the ``keep`` most recent checkpoints."""
    final = save_dir / name
    if replace:
        old = save_dir / f".{name}.stale"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    pointer = save_dir / f".{LATEST_FILE}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, save_dir / LATEST_FILE)
    old = sorted(p for p in save_dir.iterdir() if ITER_DIR.match(p.name) and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(
    saved: SavedTrainState,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    *,
    load_optim: bool = True,
    load_rng: bool = True,
) -> TrainState:
    """Restore the training state :func:`save_checkpoint` wrote into ``saved.checkpoint`` (collective): the
    scheduler (from ``saved``, read by the plan), the optimizer (``load_optim``; else its state starts fresh) and
    this rank's RNG states (``load_rng``; else they stay as the seed set them).  The model already holds the
    checkpoint's weights (setup loads them once, from this checkpoint)."""
    ckpt_dir = saved.checkpoint
    try:  # the flags were compared before (check_resume_compatible, in the plan); this is the last guard
        scheduler.load_state_dict(saved.scheduler)
    except AssertionError as e:
        raise SetupError(f"--load {ckpt_dir}: the learning-rate schedule differs from the checkpoint's ({e})") from None
    rank_file = ckpt_dir / "rank_state" / f"rank_{dist.get_rank():05d}.pt"
    try:  # the plan screened these files; a refusal here is the same one-line error
        if load_optim:
            optimizer.load(ckpt_dir, model)
        if load_rng and rank_file.is_file():
            _set_rng_state(trust.torch_load(rank_file))
    except ConfigError as e:
        raise SetupError(str(e)) from None
    return TrainState(**asdict(saved.state))
