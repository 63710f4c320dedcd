"""megatron_focusft checkpoints: a Megatron-Core distributed checkpoint plus what is needed to rebuild it.

A checkpoint folder::

    CKPT/
      focusft_checkpoint.json   format version, the HF config of the model, dtype, iteration, origin
      model/                    megatron.core.dist_checkpointing (global tensors: loads at any TP size)
      tokenizer/                the tokenizer files of the source checkpoint
      ...                       training adds optimizer/ scheduler/ RNG/ data position (training issue)
      checksums.json            size and SHA-256 of every file (written last; see ``trust.py``)

A training run's ``--save`` folder holds ``iter_0000100/`` style checkpoints and ``latest``; every reader
goes through :func:`resolve_checkpoint`, so both kinds are accepted wherever a checkpoint is.  Every model
read goes through :func:`load_model`, which checks the folder (:mod:`~megatron_focusft.convert.trust`: checksums,
no pickle that runs code, every tensor's shape) before Megatron or torch open a file of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from tqdm import tqdm

from megatron_focusft.convert import trust
from megatron_focusft.convert.hf_io import HFCheckpointReader, HFCheckpointWriter, copy_tokenizer_files
from megatron_focusft.convert.layout import (
    LAYER_PREFIX,
    hf_shape,
    megatron_sources,
    to_hf,
    to_megatron,
    tp_shard,
    tp_unshard,
)
from megatron_focusft.convert.writer_process import prepare_checkpoint_writer
from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch, build_model, hf_token_ids, tp_partition_dim

META_FILE = "focusft_checkpoint.json"
LATEST_FILE = "latest"
ITER_NAME = re.compile(r"iter_\d+")  # what ``latest`` may name: a folder of the save folder itself
# What a model reader opens (and so what its checksums cover): the metadata, the weights, the tokenizer.
MODEL_PARTS = (META_FILE, "model/", "tokenizer/")
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CheckpointMeta:
    """What ``focusft_checkpoint.json`` says.  ``token_ids`` are the source config's bos/eos/pad ids
    (:func:`~megatron_focusft.models.qwen2.hf_token_ids`), stored in its ``hf_config`` and written back on
    export; None (a model of no source checkpoint) means the defaults of ``Qwen2Arch.to_hf_config``.
    Metadata written before the ids were kept reads back the ids its ``hf_config`` held (those defaults).
    ``origin``: where the weights first came from, as the converter recorded it (``{"hf_dir": "/abs/path"}``)
    and every later checkpoint of them carries on (a model card's base model); None: not recorded."""

    arch: Qwen2Arch
    dtype: torch.dtype
    iteration: int = 0
    token_ids: dict[str, Any] | None = field(default=None, hash=False)
    origin: dict[str, str] | None = field(default=None, hash=False)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "megatron_focusft",
                "version": FORMAT_VERSION,
                "hf_config": self.arch.to_hf_config(str(self.dtype).removeprefix("torch."), self.token_ids),
                "padded_vocab_size": self.arch.padded_vocab_size,
                "dtype": str(self.dtype).removeprefix("torch."),
                "iteration": self.iteration,
                **({"origin": self.origin} if self.origin is not None else {}),
            },
            indent=2,
        )

    @classmethod
    def read(cls, ckpt_dir: Path) -> CheckpointMeta:
        path = ckpt_dir / META_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(
                arch=Qwen2Arch.from_hf_config(raw["hf_config"], source=str(path)),
                dtype=getattr(torch, raw["dtype"]),
                iteration=int(raw.get("iteration", 0)),
                token_ids=hf_token_ids(raw["hf_config"]),
                origin=raw.get("origin"),
            )
        except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ConfigError(f"{path}: unreadable checkpoint metadata ({e!r})") from None


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint folder ``path`` names (itself, or ``path/<latest>``), or None if it names none."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        if not ITER_NAME.fullmatch(name):
            raise ConfigError(
                f"{path / LATEST_FILE}: refused: it names {name[:80]!r}, not an iter_* folder of {path} (no path, "
                "no '..')"
            )
        target = path / name
        if (target / META_FILE).is_file():
            return target
        raise ConfigError(f"{path / LATEST_FILE} points at {target}, which is not a checkpoint")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder ``path`` names: itself, or the latest iteration of a training ``--save`` dir."""
    path = Path(path)
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if not path.exists():
        raise ConfigError(f"{path}: no such checkpoint folder")
    raise ConfigError(f"{path} is not a megatron_focusft checkpoint (no {META_FILE} and no {LATEST_FILE})")


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out_dir`` only if the body finishes (all ranks).

    ``out_dir`` must not exist: nothing already written is ever replaced.  On failure the temporary folder
    is removed, so no half-written output is left.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; choose a new output folder (nothing was written)")
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
        _barrier()
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank0:
        os.replace(tmp, out_dir)
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model(model: GPTModel, ckpt_dir: Path, meta: CheckpointMeta) -> None:
    """Write ``model`` (every rank's shards) and the metadata into ``ckpt_dir`` (collective).  The writer
    of the whole checkpoint ends with :func:`seal_checkpoint` once every other file is in place."""
    (ckpt_dir / "model").mkdir(parents=True, exist_ok=True)
    prepare_checkpoint_writer()
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir / "model"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (ckpt_dir / META_FILE).write_text(meta.to_json())


def seal_checkpoint(ckpt_dir: Path) -> None:
    """Rank 0, once every rank has written its files: ``ckpt_dir/checksums.json`` (collective)."""
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        trust.write_checksums(ckpt_dir)


def load_model(model: GPTModel, ckpt_dir: Path, checksums: bool = True) -> None:
    """Load the model weights of checkpoint ``ckpt_dir`` into ``model`` (any TP size; collective).

    First, before Megatron or torch open any file of it: the model files' sizes and (``checksums``) SHA-256
    against ``checksums.json``, ``model/`` screened for pickles that would run code, and every tensor's global
    shape compared with the model's (:mod:`~megatron_focusft.convert.trust`); a failure is a one-line
    ``ConfigError`` naming the file or the tensor."""
    model_dir = ckpt_dir / "model"
    if not model_dir.is_dir():
        raise ConfigError(f"{ckpt_dir}: no model/ folder in this checkpoint")
    trust.verify_checksums(ckpt_dir, MODEL_PARTS, checksums)
    metadata = trust.screen_dist_checkpoint(model_dir)
    sharded = model.sharded_state_dict()
    trust.check_shapes(sharded, metadata, model_dir, other_stages_keys(sharded))
    state = dist_checkpointing.load(sharded, str(model_dir))
    model.load_state_dict(state, strict=True)


def other_stages_keys(sharded: dict) -> set[str]:
    """The checkpoint keys the other pipeline stages load (collective over the pipeline group)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return set()
    keys: list[list[str] | None] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    # Lists of strings between this job's own ranks (no file is read).
    dist.all_gather_object(
        keys, sorted(trust.sharded_shapes(sharded)), group=parallel_state.get_pipeline_model_parallel_group()
    )
    return {k for stage in keys for k in stage or ()}


def load_checkpoint_model(
    ckpt: str | Path, core_attention: type, checksums: bool = True
) -> tuple[GPTModel, CheckpointMeta, Path]:
    """(model, metadata, folder) of checkpoint ``ckpt`` (or a training ``--save`` folder's latest), built at
    this process's TP size with ``core_attention`` in the checkpoint's dtype and loaded (collective); the
    files are checked (``checksums``: hashed too) before the metadata is read."""
    ckpt_dir = resolve_checkpoint(ckpt)
    trust.verify_checksums(ckpt_dir, MODEL_PARTS, checksums)
    meta = CheckpointMeta.read(ckpt_dir)
    model = build_model(meta.arch, core_attention, params_dtype=meta.dtype, perform_initialization=False)
    load_model(model, ckpt_dir, checksums=False)  # hashed just above
    return model, meta, ckpt_dir


def fill_from_hf(model: GPTModel, reader: HFCheckpointReader, dtype: torch.dtype, progress: bool) -> None:
    """Copy HF tensors into this rank's Megatron shards, one parameter at a time."""
    arch = reader.arch
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    todo = list(megatron_sources(arch))
    filled = set()
    for name, sources in tqdm(todo, desc="hf -> megatron", disable=not progress, unit="tensor"):
        param = params[name]
        full = to_megatron(name, [reader.get(s) for s in sources], arch)
        local = tp_shard(name, full, tp_partition_dim(name), tp_rank, tp_size)
        if local.shape != param.shape:
            raise ConfigError(f"{sources[0]}: gives {name} of shape {tuple(local.shape)}, expected {param.shape}")
        with torch.no_grad():
            param.copy_(local.to(dtype))
        filled.add(name)
    unfilled = set(params) - filled
    if unfilled:
        raise RuntimeError(f"no HF source for Megatron parameters {sorted(unfilled)}")


def gathered_hf_tensors(model: GPTModel, arch: Qwen2Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a model split over TP and PP (collective): each parameter is all-gathered
    over its stage's TP group, unsharded, and sent to global rank 0 if another stage holds it, one at a
    time.  Rank 0 gets every tensor; the other ranks get the ones their stage holds.  Fast weights and buffers
    are never exported."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    for name, sources in megatron_sources(arch):
        local_name = _stage_parameter_name(model, name)
        full = None
        if local_name is not None:
            full = params[local_name].detach()
            dim = tp_partition_dim(name)
            if dim is not None and tp > 1:
                shards = [torch.empty_like(full) for _ in range(tp)]
                dist.all_gather(shards, full.contiguous(), group=group)
                full = tp_unshard(name, [s.cpu() for s in shards], dim)
        full = _to_rank0(full, model, held_here=local_name is not None)
        if full is not None:
            yield from zip(sources, to_hf(name, full.cpu(), arch))


def _stage_parameter_name(model: GPTModel, name: str) -> str | None:
    """This pipeline stage's name for global Megatron parameter ``name`` (layers are numbered per stage), or
    None where another stage holds it."""
    if name.startswith("embedding."):
        return name if model.pre_process else None
    if not name.startswith(LAYER_PREFIX):  # the final norm, the output layer
        return name if model.post_process else None
    index, rest = name[len(LAYER_PREFIX) :].split(".", 1)
    first = model.decoder.layers[0].layer_number - 1
    local = int(index) - first
    return f"{LAYER_PREFIX}{local}.{rest}" if 0 <= local < len(model.decoder.layers) else None


def _to_rank0(tensor: torch.Tensor | None, model: GPTModel, held_here: bool) -> torch.Tensor | None:
    """``tensor`` from the pipeline stage that holds it to global rank 0 (point to point, shape first), along
    rank 0's pipeline group; every other rank keeps what it has."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(pp_group)
    if ranks[0] != 0:  # not rank 0's pipeline: nothing to send
        return tensor
    rank, weight = dist.get_rank(), next(model.parameters())
    holder = torch.tensor([rank if held_here else dist.get_world_size()], dtype=torch.long, device=weight.device)
    dist.all_reduce(holder, op=dist.ReduceOp.MIN, group=pp_group)  # the (one) stage holding it
    source = int(holder)
    if source == 0 or rank not in (0, source):
        return tensor
    shape = torch.zeros(8, dtype=torch.long, device=weight.device)
    if rank == source:
        shape[0] = tensor.dim()
        shape[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape)
        dist.send(shape, 0)
        dist.send(tensor.to(weight.device).contiguous(), 0)
        return tensor
    dist.recv(shape, source)
    buf = torch.empty(tuple(shape[1 : 1 + int(shape[0])].tolist()), dtype=weight.dtype, device=weight.device)
    dist.recv(buf, source)
    return buf


def export_hf(
    model: GPTModel,
    arch: Qwen2Arch,
    dtype: torch.dtype,
    out_dir: Path,
    tokenizer_dir: Path | None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = False,
    token_ids: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write a (possibly TP-split) model as a Hugging Face folder: safetensors shards + index, config.json
    (with ``token_ids``, the checkpoint's ``CheckpointMeta.token_ids``), tokenizer files, and ``extra_files``
    (``{name: text}``, e.g. the model card: inside the folder before it appears, like the rest).  Collective;
    rank 0 writes, tensor by tensor."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with atomic_output_dir(Path(out_dir)) as tmp:
        plan = [(n, dtype, hf_shape(n, arch)) for _, sources in megatron_sources(arch) for n in sources]
        writer = HFCheckpointWriter(tmp, plan, max_shard_bytes) if rank0 else None
        tensors = tqdm(
            gathered_hf_tensors(model, arch),
            total=len(plan),
            desc="megatron -> hf",
            unit="tensor",
            disable=not (progress and rank0),
        )
        for name, tensor in tensors:
            if writer is not None:
                writer.add(name, tensor.to(dtype))
        if writer is not None:
            writer.close()
            (tmp / "config.json").write_text(
                json.dumps(arch.to_hf_config(str(dtype).removeprefix("torch."), token_ids), indent=2)
            )
            if tokenizer_dir is not None and tokenizer_dir.is_dir():
                copy_tokenizer_files(tokenizer_dir, tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
