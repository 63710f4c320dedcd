"""The optimizer: Megatron-Core's on GPU (distributed optimizer, bf16 with fp32 master weights), and a
small equivalent on CPU, where Megatron's optimizer wrappers hard-code CUDA tensors.

Both read the gradients Megatron's ``DistributedDataParallel`` accumulated in ``param.main_grad``, clip by
the global norm (tensor-parallel duplicates counted once), keep biases and norms out of weight decay, and
expose ``param_groups`` so that Megatron's ``OptimizerParamScheduler`` drives the learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_focusft.convert import trust

Optimizer = Literal["adam", "sgd"]  # adam: AdamW (decoupled weight decay); sgd: plain SGD, no momentum
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
DecayStyle = Literal["cosine", "linear", "constant"]  # Megatron's OptimizerParamScheduler styles used here
DECAY_STYLES: tuple[str, ...] = get_args(DecayStyle)
# The warm-up share of the decay when neither --lr-warmup-fraction nor --lr-warmup-iters is given (the paper's
# 10%; Megatron-LM's default is no warm-up).
DEFAULT_WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class OptimizationConfig:
    """The optimizer and its learning-rate schedule (Megatron's ``OptimizerParamScheduler``).  The warm-up is
    ``lr_warmup_iters``, else ``lr_warmup_fraction`` (default :data:`DEFAULT_WARMUP_FRACTION`) of the decay
    iterations; the decay lasts ``lr_decay_iters``, else the whole run."""

    optimizer: Optimizer = "adam"
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int | None = None
    lr_decay_iters: int | None = None
    lr_decay_style: DecayStyle = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0  # global grad-norm clip (0: off)


def _param_groups(model: torch.nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


class CpuOptimizer:
    """AdamW or SGD over ``main_grad`` with Megatron's global-norm clip (for ``--device cpu``)."""

    def __init__(self, model: torch.nn.Module, config: OptimizationConfig) -> None:
        groups = _param_groups(model)
        if config.optimizer == "adam":
            self.optimizer = torch.optim.AdamW(
                groups, lr=config.lr, weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2)
            )
        else:
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.clip_grad = config.clip_grad
        self.params = [p for g in groups for p in g["params"]]

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient: TP-split tensors and pipeline stages summed over ranks,
        TP duplicates and the last stage's copy of a tied embedding counted once."""
        sq = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.main_grad is not None and param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p):
                sq += p.main_grad.double().pow(2).sum()
        for size, group in (
            (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_group),
            (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_group),
        ):
            if size > 1:
                dist.all_reduce(sq, group=group())
        return float(sq.sqrt())

    def step(self) -> tuple[bool, float, None]:
        """Clip and update; a non-finite gradient norm (NaN/Inf anywhere) skips the update: (False, norm)."""
        norm = self.grad_norm()  # the same on every rank (DDP summed the gradients, TP all-reduced the norm)
        if not math.isfinite(norm):
            return False, norm, None
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        if self.clip_grad > 0 and norm > self.clip_grad:
            for p in self.params:
                p.grad.mul_(self.clip_grad / (norm + 1e-6))
        self.optimizer.step()
        return True, norm, None

    def save(self, ckpt_dir: Path, model: torch.nn.Module) -> None:
        """Per-rank state (resuming needs the same parallel layout, as on CPU tests and the quickstart)."""
        (ckpt_dir / "optimizer").mkdir(exist_ok=True)
        torch.save(self.optimizer.state_dict(), ckpt_dir / "optimizer" / f"rank_{dist.get_rank():05d}.pt")

    def load(self, ckpt_dir: Path, model: torch.nn.Module) -> None:
        path = ckpt_dir / "optimizer" / f"rank_{dist.get_rank():05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no optimizer state for this rank (was the parallel layout changed?)")
        self.optimizer.load_state_dict(trust.torch_load(path))  # weights_only


def megatron_optimizer_config(config: OptimizationConfig, *, bf16: bool):
    """Megatron's ``OptimizerConfig`` for these settings, with the same semantics as :class:`CpuOptimizer`
    (plain SGD: no momentum, where Megatron's default is 0.9)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    return MegatronOptimizerConfig(
        optimizer=config.optimizer,
        lr=config.lr,
        min_lr=config.min_lr,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        sgd_momentum=0.0,
        clip_grad=config.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=True,
    )


class GpuOptimizer:
    """Megatron-Core's optimizer (``get_megatron_optimizer``) with its distributed checkpoint format."""

    def __init__(
        self, model: torch.nn.Module, ddp_model: torch.nn.Module, config: OptimizationConfig, *, bf16: bool
    ) -> None:
        from megatron.core.optimizer import get_megatron_optimizer

        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(config, bf16=bf16), [ddp_model])

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float, int | None]:
        return self.optimizer.step()

    def save(self, ckpt_dir: Path, model: torch.nn.Module) -> None:
        sharded = self.optimizer.sharded_state_dict(model.sharded_state_dict())
        (ckpt_dir / "optimizer").mkdir(exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(sharded, str(ckpt_dir / "optimizer"))

    def load(self, ckpt_dir: Path, model: torch.nn.Module) -> None:
        trust.screen_dist_checkpoint(ckpt_dir / "optimizer")  # before torch unpickles its .metadata
        sharded = self.optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True)
        self.optimizer.load_state_dict(dist_checkpointing.load(sharded, str(ckpt_dir / "optimizer")))


def build_optimizer(
    model: torch.nn.Module, ddp_model: torch.nn.Module, config: OptimizationConfig, *, device: str, bf16: bool
):
    """Megatron-Core's optimizer on ``cuda`` (over ``ddp_model``), :class:`CpuOptimizer` on ``cpu``."""
    return GpuOptimizer(model, ddp_model, config, bf16=bf16) if device == "cuda" else CpuOptimizer(model, config)
