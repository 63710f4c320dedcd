"""Streaming access to Hugging Face checkpoint folders (config.json + sharded safetensors).

Tensors are read one at a time and written one at a time (see ``safetensors_stream``), so a conversion
never holds a second copy of the whole model.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from megatron_focusft.convert.layout import hf_names, hf_shape
from megatron_focusft.convert.safetensors_stream import (
    StreamingShardWriter,
    TensorEntry,
    plan_shards,
    read_header,
    read_tensor,
)
from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch

SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
# Buffers some exporters write that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EMBED, _LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (NaN == NaN, -0.0 != 0.0: a bit-for-bit comparison)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class HFCheckpointReader:
    """Reads tensors by name from a Hugging Face folder, checking every shape against the config."""

    def __init__(self, hf_dir: str | Path, arch: Qwen2Arch) -> None:
        self.dir = Path(hf_dir)
        self.arch = arch
        index = self.dir / SAFETENSORS_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConfigError(f"{index}: unreadable safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").exists():
            files, weight_map = ["model.safetensors"], None
        else:
            raise ConfigError(f"{self.dir}: no model.safetensors or {SAFETENSORS_INDEX}")
        self._entries: dict[str, tuple[Path, TensorEntry]] = {}
        for f in files:
            path = self.dir / f
            try:
                header = read_header(path)
            except (OSError, ValueError, KeyError, struct.error) as e:
                raise ConfigError(f"{path}: unreadable safetensors file ({e!r})") from None
            for key, entry in header.items():
                if weight_map is None or weight_map.get(key) == f:
                    self._entries[key] = (path, entry)
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self._entries:
                    raise ConfigError(f"{self.dir / f}: tensor {k!r} listed in {SAFETENSORS_INDEX} is missing")
        expected = set(hf_names(arch))
        if arch.tie_word_embeddings and _LM_HEAD in self._entries:
            self._check_redundant_lm_head()
        unexpected = [k for k in self._entries if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
        if unexpected:
            raise ConfigError(
                f"{self.dir}: unexpected tensor {unexpected[0]!r} for a Qwen2 model "
                f"({len(unexpected)} unexpected in all)"
            )
        # Every shape is checked here, from the headers alone, so a bad tensor stops a conversion before
        # any work starts.
        for name in hf_names(arch):
            if name not in self._entries:
                raise ConfigError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
            path, entry = self._entries[name]
            expected_shape = hf_shape(name, arch)
            if entry.shape != expected_shape:
                raise ConfigError(
                    f"{path}: tensor {name!r} has shape {entry.shape}, config.json implies {expected_shape}"
                )

    def _check_redundant_lm_head(self) -> None:
        """A tied checkpoint may still store ``lm_head.weight`` (some exporters write the shared tensor twice):
        accept it, and drop it, only if it is bit-identical to the embedding; a tied model cannot hold a
        different output head, so anything else is an error naming the file."""
        path, entry = self._entries[_LM_HEAD]
        if _EMBED not in self._entries:
            return  # reported below as a missing embedding
        embed_entry = self._entries[_EMBED][1]
        if (entry.dtype, entry.shape) != (embed_entry.dtype, embed_entry.shape):
            why = f"{entry.dtype} {entry.shape} vs {embed_entry.dtype} {embed_entry.shape}"
        elif not torch.equal(_bits(self.get(_LM_HEAD)), _bits(self.get(_EMBED))):
            why = "different values"
        else:
            del self._entries[_LM_HEAD]
            return
        raise ConfigError(
            f"{path}: tensor {_LM_HEAD!r} differs from {_EMBED!r} ({why}), but config.json says "
            "tie_word_embeddings=true: a tied model has no separate output head (set tie_word_embeddings=false "
            f"if this head is meant to be used, or remove {_LM_HEAD!r})"
        )

    def get(self, name: str) -> torch.Tensor:
        path, entry = self._entries[name]
        try:
            return read_tensor(path, entry)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read tensor {name!r} ({e})") from None


class HFCheckpointWriter:
    """Writes planned tensors into safetensors shards of at most ``max_shard_bytes``, tensor by tensor.

    ``plan`` lists (name, dtype, shape) in the order :meth:`add` will receive them; the file names
    (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index) follow ``save_pretrained``.
    """

    def __init__(
        self, out_dir: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
    ) -> None:
        self.dir = Path(out_dir)
        self._shards = plan_shards(plan, max_shard_bytes)
        n = len(self._shards)
        self._names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._total_bytes = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in plan)
        self._shard = -1
        self._writer: StreamingShardWriter | None = None
        self._left = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._writer = StreamingShardWriter(self.dir / self._names[self._shard], self._shards[self._shard])
            self._left = len(self._shards[self._shard])
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._left -= 1

    def close(self) -> None:
        """Close the last shard and write the index (for more than one shard)."""
        if self._writer is not None:
            self._writer.close()
        if self._shard != len(self._shards) - 1 or self._left:
            raise RuntimeError("HF checkpoint closed before every planned tensor was written")
        if len(self._shards) > 1:
            weight_map = {name: self._names[i] for i, shard in enumerate(self._shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self.dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in ``src`` to ``dst``; returns their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
