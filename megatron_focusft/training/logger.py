"""Rank-0 training logs: a line every ``--log-interval`` steps, TensorBoard, W&B, a progress bar on a TTY."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_focusft.training.config import LoggingConfig


class MetricsLogger:
    """``save_dir`` keeps the W&B run id (a resumed job logs into the same run); ``run_config``: W&B's config."""

    def __init__(
        self,
        config: LoggingConfig,
        train_iters: int,
        start_iteration: int,
        peak_tflops: float | None,
        *,
        save_dir: Path | None = None,
        run_config: dict | None = None,
    ) -> None:
        self.rank0 = dist.get_rank() == 0
        self.interval = max(1, config.log_interval)
        self.train_iters, self.peak = train_iters, peak_tflops
        self.world = dist.get_world_size()
        self.started, self.start_iteration = time.perf_counter(), start_iteration
        self.window: list[tuple[float, float, float]] = []  # (seconds, tokens, flops) since the last line
        self.tensorboard = self.wandb = self.bar = None
        if not self.rank0:
            return
        if config.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                msg = "--tensorboard-dir needs tensorboard (pip install 'megatron-focusft[tensorboard]')"
                raise SystemExit(f"error: {msg}") from None
            self.tensorboard = SummaryWriter(str(config.tensorboard_dir))
        if config.wandb_project is not None:
            try:
                import wandb
            except ImportError:
                print("warning: --wandb-project given but wandb is not installed; not logging to W&B", file=sys.stderr)
            else:
                run_id = _wandb_run_id(save_dir)
                if config.wandb_save_dir is not None:  # W&B writes there; made first, as Megatron-LM does
                    config.wandb_save_dir.mkdir(parents=True, exist_ok=True)
                self.wandb = wandb.init(
                    project=config.wandb_project,
                    name=config.wandb_exp_name,
                    dir=config.wandb_save_dir,
                    config=run_config,
                    id=run_id,
                    resume="allow" if run_id else None,
                )
        if sys.stdout.isatty() and config.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start_iteration, unit="step", dynamic_ncols=True)

    def message(self, text: str) -> None:
        if self.rank0:
            (self.bar.write if self.bar else print)(text)

    def log(self, state: object, metrics: dict[str, float], seconds: float) -> None:
        if not self.rank0:
            return
        self.window.append((seconds, metrics["tokens"], metrics["flops"]))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if state.iteration % self.interval and state.iteration != self.train_iters:
            return
        speed = throughput(
            sum(w[0] for w in self.window), sum(w[1] for w in self.window), sum(w[2] for w in self.window), self.world
        )
        self.window.clear()
        done = state.iteration - self.start_iteration
        eta = (time.perf_counter() - self.started) / max(done, 1) * (self.train_iters - state.iteration)
        fields = {
            "loss": metrics["loss"],
            "inner_loss_before": metrics.get("inner_loss_before"),
            "inner_loss_after": metrics.get("inner_loss_after"),
            "grad_norm": metrics["grad_norm"],
            "lr": metrics["lr"],
            "skipped_iters": getattr(state, "skipped_iterations", 0) or None,
            "global_tokens_per_s": speed["global_tokens_per_s"],
            "tflops_per_gpu": speed["tflops_per_gpu"],
            "mfu": speed["tflops_per_gpu"] / self.peak if self.peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        parts = [f"step {state.iteration}/{self.train_iters}", f"consumed {state.consumed_samples}"]
        if metrics.get("skipped"):
            parts.append("skipped (non-finite grad norm: no update)")
        parts += [f"{k} {_fmt(v)}" for k, v in fields.items() if v is not None]
        parts.append(f"eta {_duration(eta)}")
        self.message(" | ".join(parts))
        for k, v in fields.items():
            if v is None:
                continue
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"train/{k}", v, state.iteration)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in fields.items() if v is not None}, step=state.iteration)

    def log_validation(self, iteration: int, loss: float) -> None:
        """The validation loss (base weights, no inner loop) at ``iteration``."""
        if not self.rank0:
            return
        self.message(f"step {iteration}/{self.train_iters} | valid loss {_fmt(loss)} (base weights, no inner loop)")
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("valid/loss", loss, iteration)
        if self.wandb is not None:
            self.wandb.log({"valid/loss": loss}, step=iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def throughput(seconds: float, global_tokens: float, global_flops: float, world_size: int) -> dict[str, float]:
    """Speed over ``seconds`` of training; ``global_tokens`` and ``global_flops`` are summed over the whole
    global batch (every data-parallel replica).  Every GPU of the job does its share: one replica runs on
    TP x CP GPUs and there are DP replicas, so a GPU's share of the FLOPs is the global count / world size."""
    return {
        "global_tokens_per_s": global_tokens / seconds,
        "tflops_per_gpu": global_flops / world_size / seconds / 1e12,  # SFT-equivalent FLOPs
    }


def _wandb_run_id(save: Path | None) -> str | None:
    """The W&B run id kept in the ``--save`` folder, so that a resumed (requeued) job goes on logging into
    the same W&B run instead of starting a new one; None without ``--save``."""
    if save is None:
        return None
    path = Path(save) / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n")
    return run_id


def _fmt(v: float) -> str:
    return f"{v:.3e}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
