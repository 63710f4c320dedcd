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
    distributed_timeout_minutes: int = 30  # how long a collective may wait for the other ranks

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass(frozen=True)
class DataConfig:
    """``data_path`` is Megatron-LM's list: one PREFIX written by tools/preprocess_data.py, or a blend (``WEIGHT
    PREFIX WEIGHT PREFIX ...``, or several PREFIXes weighted by their pack counts)."""

    data_path: tuple[str, ...] = ()
    valid_data_path: str | None = None
    seq_length: int | None = None  # pack length (None: the data's)
    eval_interval: int | None = None  # the validation loss every N iterations (and at the end)
    eval_iters: int | None = None  # global batches of validation packs per evaluation (None: every pack; 0: none)
    split: str | None = None  # "train,valid,test" shares of data_path's packs, by index ranges (Megatron's --split)


@dataclass(frozen=True)
class BatchConfig:
    """Batch sizes (in packs), the length of the run (epochs, iterations or samples, i.e. packs: exactly one is
    set) and its seed."""

    micro_batch_size: int = 1  # packs per micro-batch and DP rank
    global_batch_size: int = 32  # packs per optimizer step
    epochs: float | None = None
    train_iters: int | None = None
    train_samples: int | None = None  # packs in all: train_samples // global_batch_size iterations
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
    finetune: bool = False  # load only the weights of load's checkpoint; start at iteration 0
    load_optim: bool = True  # restore the optimizer state on resume
    load_rng: bool = True  # restore the RNG states on resume
    override_opt_param_scheduler: bool = False  # resume with the flags' learning-rate schedule


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Path | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None  # the W&B run's name
    wandb_save_dir: Path | None = None  # where W&B writes its local files
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
    always_on: tuple[str, ...] = ()  # Megatron-LM flags given that are always on here (said once at start)

    def to_dict(self) -> dict:
        """Every setting, nested by group (e.g. the W&B run config)."""
        return asdict(self)
