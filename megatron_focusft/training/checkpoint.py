"""Training checkpoints: ``SAVE/iter_0000100/`` (model, optimizer, scheduler, RNG, data position) + ``latest``.

Each checkpoint is written under a temporary name (``.iter_N.partial``) and renamed when complete;
``latest`` is replaced atomically afterwards, so a job killed at any moment leaves the previous checkpoint
loadable.  The model part is the same format as the converter's output, so
``tools/convert_megatron_to_hf.py --ckpt SAVE`` exports any checkpoint training wrote.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_focusft.convert.hf_io import copy_tokenizer_files
from megatron_focusft.convert.megatron_io import LATEST_FILE, CheckpointMeta, load_model, save_model
from megatron_focusft.training.arguments import TRAIN_STATE_FILE, ArgumentError

ITER_DIR = re.compile(r"^iter_(\d{7})$")


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0  # optimizer steps skipped for a non-finite gradient norm


def _rank0() -> bool:
    return dist.get_rank() == 0


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    run: dict | None = None,
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
            saved = {"state": state.__dict__, "scheduler": scheduler.state_dict(), "run": dict(run or {})}
            torch.save(saved, tmp / TRAIN_STATE_FILE)
            if tokenizer_dir is not None and tokenizer_dir.is_dir():
                copy_tokenizer_files(tokenizer_dir, tmp / "tokenizer")
        dist.barrier()
    except BaseException:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _rank0():
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
    dist.barrier()
    return final


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer, scheduler) -> TrainState:
    """Restore everything :func:`save_checkpoint` wrote (collective)."""
    saved = torch.load(ckpt_dir / TRAIN_STATE_FILE, weights_only=False)
    try:  # the flags were compared before (arguments.check_resume_compatible); this is the last guard
        scheduler.load_state_dict(saved["scheduler"])
    except AssertionError as e:
        raise ArgumentError(
            f"--load {ckpt_dir}: the learning-rate schedule differs from the checkpoint's ({e})"
        ) from None
    load_model(model, ckpt_dir)
    optimizer.load(ckpt_dir, model)
    rank_file = ckpt_dir / "rank_state" / f"rank_{dist.get_rank():05d}.pt"
    if rank_file.is_file():
        _set_rng_state(torch.load(rank_file, weights_only=False))
    return TrainState(**saved["state"])
