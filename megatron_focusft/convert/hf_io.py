"""Streaming access to Hugging Face checkpoint folders (config.json + sharded safetensors).

Tensors are read one at a time (``safe_open`` memory-maps each file) and written shard by shard, so a
conversion never holds a second copy of the whole model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_focusft.convert.layout import hf_names, hf_shape
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
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            path = self.dir / f
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ConfigError(f"{path}: unreadable safetensors file ({e})") from None
            self._handles[f] = handle
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == f:
                    self._where[key] = f
        if weight_map is not None:
            missing_files = {k: f for k, f in weight_map.items() if k not in self._where}
            if missing_files:
                k, f = next(iter(missing_files.items()))
                raise ConfigError(f"{self.dir / f}: tensor {k!r} listed in {SAFETENSORS_INDEX} is missing")
        expected = set(self.expected_names())
        unexpected = [k for k in self._where if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
        if unexpected:
            raise ConfigError(
                f"{self.dir}: unexpected tensor {unexpected[0]!r} for a Qwen2 model "
                f"({len(unexpected)} unexpected in all)"
            )
        # Every shape is checked here, from the headers alone, so a bad tensor stops a conversion before
        # any work starts.
        for name in self.expected_names():
            if name not in self._where:
                raise ConfigError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
            self._check_shape(name, tuple(self._handles[self._where[name]].get_slice(name).get_shape()))

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        expected = hf_shape(name, self.arch)
        if shape != expected:
            raise ConfigError(
                f"{self.file_of(name)}: tensor {name!r} has shape {shape}, config.json implies {expected}"
            )

    def expected_names(self) -> list[str]:
        return hf_names(self.arch)

    def file_of(self, name: str) -> Path:
        return self.dir / self._where[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConfigError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        tensor = self._handles[self._where[name]].get_tensor(name)
        self._check_shape(name, tuple(tensor.shape))
        return tensor


class HFCheckpointWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.dir / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Flush the last shard, give the shards their final names and write the index."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / f"shard-{i:05d}.tmp").rename(self.dir / final)
            weight_map.update({name: final for name in names})
        if n > 1:
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
