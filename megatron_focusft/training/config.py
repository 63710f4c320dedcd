"""The settings of one training run, typed and grouped by what uses them: what ``tools/train.py``'s flags say
(:mod:`arguments` parses them), before anything is read from disk (:mod:`plan` does that, once).

Every group is a frozen dataclass whose defaults are the flags' defaults; ``TrainConfig()`` is a run with
every flag at its default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_focusft.config import FocuSFTConfig
from megatron_focusft.runtime import Device, ParallelLayout
from megatron_focusft.training.divergence import DivergenceConfig
from megatron_focusft.training.optimizer import OptimizationConfig


@dataclass(frozen=True)
class ModelConfig:
    pretrained_checkpoint: Path | None = None  # starting weights; not needed to resume
    device: Device = "cuda"
    bf16: bool = False  # bf16 weights and activations, fp32 master weights

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass(frozen=True)
class DataConfig:
    data_path: str | None = None  # PREFIX written by tools/preprocess_data.py
    valid_data_path: str | None = None
    seq_length: int | None = None  # pack length (None: the data's)
    eval_interval: int | None = None  # the validation loss every N iterations (and at the end)


@dataclass(frozen=True)
class BatchConfig:
    """Batch sizes (in packs), the length of the run (epochs or iterations: exactly one is set) and its seed."""

    micro_batch_size: int = 1  # packs per micro-batch and DP rank
    global_batch_size: int = 32  # packs per optimizer step
    epochs: float | None = None
    train_iters: int | None = None
    seed: int = 1234


@dataclass(frozen=True)
class CheckpointConfig:
    load: Path | None = None  # resume from the latest checkpoint of this --save folder
    save: Path | None = None
    save_interval: int | None = None
    exit_interval: int | None = None  # save and exit after this many iterations
    keep_checkpoints: int = 2
    export_hf: Path | None = None  # a Hugging Face folder written at the end
    verify_checksums: bool = True  # hash the loaded checkpoint's files against its checksums.json


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Path | None = None
    wandb_project: str | None = None
    progress: bool = True  # a progress bar on a terminal (--no-progress: never)


@dataclass(frozen=True)
class TrainConfig:
    """One run's settings. ``focusft.attention_backend`` is resolved (flex on cuda, dense on cpu unless given),
    ``focusft.seed`` is ``batch.seed``, ``focusft.recompute`` is ``--recompute-granularity``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    focusft: FocuSFTConfig = field(default_factory=FocuSFTConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checks: DivergenceConfig = field(default_factory=DivergenceConfig)

    def to_dict(self) -> dict:
        """Every setting, nested by group (e.g. the W&B run config)."""
        return asdict(self)
