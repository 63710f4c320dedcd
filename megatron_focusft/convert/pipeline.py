"""The two conversions and the logit check, as functions the command-line tools and tests call.

``hf_to_megatron`` is collective: every rank of a tensor-parallel group fills and writes its own shards.
``megatron_to_hf`` and ``verify`` run in one process (TP=1) because the HF side is one file set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_focusft.attention.dense import DenseAttention
from megatron_focusft.convert.hf_io import HFCheckpointReader, copy_tokenizer_files
from megatron_focusft.convert.megatron_io import (
    CheckpointMeta,
    atomic_output_dir,
    export_hf,
    fill_from_hf,
    load_checkpoint_model,
    save_model,
    seal_checkpoint,
)
from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch, build_model, hf_token_ids, read_hf_config


def check_hf_to_megatron(hf_dir: Path, out_dir: Path, tp: int) -> Qwen2Arch:
    """Everything that can be checked before any work starts (config, TP split, output folder)."""
    arch = Qwen2Arch.from_hf_dir(hf_dir)
    arch.check_tensor_parallel(tp)
    HFCheckpointReader(hf_dir, arch)  # opens every shard, checks the tensor names
    if Path(out_dir).exists():
        raise ConfigError(f"{out_dir} already exists; choose a new output folder (nothing was written)")
    return arch


def hf_to_megatron(hf_dir: Path, out_dir: Path, dtype: torch.dtype, progress: bool = True) -> None:
    """Convert a HF Qwen2 folder into a megatron_focusft checkpoint (collective over the TP group)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = read_hf_config(hf_dir)
    arch = Qwen2Arch.from_hf_config(config, source=str(hf_dir / "config.json"))
    arch.check_tensor_parallel(parallel_state.get_tensor_model_parallel_world_size())
    reader = HFCheckpointReader(hf_dir, arch)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    model = build_model(arch, DenseAttention, params_dtype=dtype, perform_initialization=False)
    fill_from_hf(model, reader, dtype, progress=progress and rank0)
    with atomic_output_dir(out_dir) as tmp:
        origin = {"hf_dir": str(hf_dir.resolve())}  # the base model of everything trained from it
        save_model(model, tmp, CheckpointMeta(arch, dtype, token_ids=hf_token_ids(config), origin=origin))
        if rank0:
            copy_tokenizer_files(hf_dir, tmp / "tokenizer")
        seal_checkpoint(tmp)


def megatron_to_hf(
    ckpt: Path,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
    checksums: bool = True,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Convert a megatron_focusft checkpoint (or a training run's latest) into a HF folder (TP=1);
    ``checksums``: hash its files against its ``checksums.json`` first; ``extra_files``: ``{name: text}``
    written into the folder too (the model card)."""
    model, meta, ckpt_dir = load_checkpoint_model(ckpt, DenseAttention, checksums)
    export_hf(
        model,
        meta.arch,
        dtype or meta.dtype,
        Path(out_dir),
        ckpt_dir / "tokenizer",
        max_shard_bytes,
        progress,
        meta.token_ids,
        extra_files,
    )


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    argmax_agree: bool

    @property
    def ok(self) -> bool:
        """fp32 rounding, not an upstream-style cosine of 0.99: 1e-4 of the logits' scale, same argmax."""
        return self.max_abs_diff <= 1e-4 * self.max_abs_logit and self.argmax_agree

    def __str__(self) -> str:
        return (
            f"max |logit diff| = {self.max_abs_diff:.3e} (max |logit| = {self.max_abs_logit:.3e}, "
            f"relative {self.max_abs_diff / max(self.max_abs_logit, 1e-30):.3e}); "
            f"argmax identical: {self.argmax_agree} -> {'OK' if self.ok else 'FAILED'}"
        )


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] of a TP>=1 Megatron model (gathered, padding rows dropped)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, positions, None)
    return gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]


def verify(hf_dir: Path, ckpt: Path, seq_len: int = 64, batch: int = 2, seed: int = 0) -> VerifyResult:
    """Run the HF model and the converted Megatron model (fp32, TP=1) on the same random tokens."""
    from transformers import AutoModelForCausalLM

    model, meta, _ = load_checkpoint_model(ckpt, DenseAttention)
    arch = meta.arch
    model = model.float().eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.randint(0, arch.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = megatron_logits(model, tokens, arch.vocab_size)
        ref = hf(tokens).logits
    return VerifyResult(
        max_abs_diff=(ours - ref).abs().max().item(),
        max_abs_logit=ref.abs().max().item(),
        argmax_agree=bool(torch.equal(ours.argmax(-1), ref.argmax(-1))),
    )
