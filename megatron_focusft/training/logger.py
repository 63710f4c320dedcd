"""Rank-0 training logs: a timestamped line every ``--log-interval`` steps, ``SAVE/metrics.jsonl`` (every step,
machine-readable: :mod:`megatron_focusft.run_record`), TensorBoard, W&B, a progress bar on a TTY."""

from __future__ import annotations

import importlib
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_focusft.run_record import METRICS_FILE, MetricsFile
from megatron_focusft.training.errors import SetupError

if TYPE_CHECKING:
    from megatron_focusft.training.config import LoggingConfig

# The packages each logging flag needs: (flag, module imported, what to install).
_LOGGING_PACKAGES = (
    ("tensorboard_dir", "--tensorboard-dir", "torch.utils.tensorboard", "tensorboard"),
    ("wandb_project", "--wandb-project", "wandb", "wandb"),
)


def check_logging_packages(config: LoggingConfig) -> None:
    """Import what the logging flags need, before anything else is set up: a missing package is a one-line
    :class:`SetupError` naming it and the flag, not a failure after the model and optimizer are built."""
    for field, flag, module, package in _LOGGING_PACKAGES:
        if getattr(config, field) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise SetupError(
                f"{flag} needs the {package} package, which is not installed (pip install {package})"
            ) from None


def stamp(text: str) -> str:
    """``text`` after the local time, ``[2025-05-01 12:00:00] text``: every line the trainer logs has one."""
    return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"


def interactive(config: LoggingConfig) -> bool:
    """Whether progress bars are drawn: on a terminal, unless ``--no-progress`` (rank 0 decides alone)."""
    return config.progress and sys.stdout.isatty()


def describe_run(record: dict, saved_as: str) -> str:
    """The start-of-run block of a :func:`~megatron_focusft.training.loop.run_record`: the world and its
    layout, the schedule, the weights and the data, then every setting by group (``saved_as``: where the
    record is kept)."""
    lay, data = record["layout"], record["data"]
    resumed = record["resumed_from"]
    start = "a fresh start" if resumed is None else f"resuming iteration {resumed['iteration']}"
    base = record["base_model"]
    lines = [
        f"run configuration ({saved_as}):",
        f"  world size {record['world_size']} = TP {lay['tensor_model_parallel_size']} x PP "
        f"{lay['pipeline_model_parallel_size']} x CP {lay['context_parallel_size']} x DP {lay['data_parallel_size']}"
        f" (sequence parallel {'on' if lay['sequence_parallel'] else 'off'}); {record['train_iters']} iterations "
        f"({record['warmup_iters']} warm-up), {record['micro_batches_per_step']} micro-batches per step and DP rank",
        f"  weights from {record['weights_from']} ({start}); base model: "
        + (", ".join(f"{k} {v}" for k, v in base.items()) if base else "not recorded"),
        f"  data {record['config']['data']['data_path']}: "
        + ", ".join(f"{k} {data[k]}" for k in ("num_packs", "pack_length", "num_documents", "num_tokens") if k in data),
    ]
    for group, values in record["config"].items():
        if isinstance(values, dict):
            lines.append(f"  {group}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        else:  # a setting of its own, not a group
            lines.append(f"  {group}: {values}")
    return "\n".join(lines)


class MetricsLogger:
    """``save_dir``: where ``metrics.jsonl`` is appended to and the W&B run id kept (a resumed job logs into
    the same W&B run); ``launch``: this launch's ``started`` (the key of its ``run_config.json``), on every
    record; ``run_config``: W&B's config.  The packages the flags need were checked at start-up
    (:func:`check_logging_packages`)."""

    def __init__(
        self,
        config: LoggingConfig,
        train_iters: int,
        start_iteration: int,
        peak_tflops: float | None,
        *,
        save_dir: Path | None = None,
        launch: str | None = None,
        run_config: dict | None = None,
    ) -> None:
        self.rank0 = dist.get_rank() == 0
        self.interval = max(1, config.log_interval)
        self.train_iters, self.peak = train_iters, peak_tflops
        self.world = dist.get_world_size()
        self.started, self.start_iteration = time.perf_counter(), start_iteration
        self.launch = launch
        self.window: list[tuple[float, float, float]] = []  # (seconds, tokens, flops) since the last line
        self.latest: dict[str, dict] = {}  # kind ("train", "valid") -> this launch's last record of it
        self.tensorboard = self.wandb = self.bar = self.metrics = None
        if not self.rank0:
            return
        if save_dir is not None:
            self.metrics = MetricsFile(Path(save_dir) / METRICS_FILE)
        if config.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(config.tensorboard_dir))
        if config.wandb_project is not None:
            import wandb  # checked before planning (check_logging_packages)

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
        if interactive(config):
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start_iteration, unit="step", dynamic_ncols=True)

    def message(self, text: str) -> None:
        """One log line (or block) on rank 0, after the time."""
        if self.rank0:
            (self.bar.write if self.bar else print)(stamp(text))

    def log(self, state: object, metrics: dict[str, float], seconds: float) -> None:
        """Step ``state.iteration`` took ``seconds``: its record in ``metrics.jsonl``; every ``--log-interval``
        steps (and at the last) a console line with the speed over the steps since the previous line."""
        if not self.rank0:
            return
        self.window.append((seconds, metrics["tokens"], metrics["flops"]))
        step = self._fields(state, metrics, throughput(seconds, metrics["tokens"], metrics["flops"], self.world))
        self._record(
            "train",
            state.iteration,
            step_s=seconds,
            consumed_samples=state.consumed_samples,
            tokens=metrics["tokens"],
            skipped=bool(metrics.get("skipped")),
            **step,
        )
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
        fields = self._fields(state, metrics, speed)
        parts = [f"step {state.iteration}/{self.train_iters}", f"consumed {state.consumed_samples}"]
        if metrics.get("skipped"):
            parts.append("skipped (non-finite grad norm: no update)")
        parts += [f"{k} {_fmt(v)}" for k, v in fields.items()]
        parts.append(f"eta {_duration(eta)}")
        self.message(" | ".join(parts))
        if self.tensorboard is not None:
            for k, v in fields.items():
                self.tensorboard.add_scalar(f"train/{k}", v, state.iteration)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in fields.items()}, step=state.iteration)

    def _fields(self, state: object, metrics: dict[str, float], speed: dict[str, float]) -> dict[str, float]:
        """The logged metrics (those that apply), with ``speed`` over the steps they stand for."""
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
        return {k: v for k, v in fields.items() if v is not None}

    def _record(self, kind: str, iteration: int, **values: object) -> None:
        record = {"kind": kind, "iteration": iteration, "launch": self.launch, "wall_time": time.time(), **values}
        self.latest[kind] = record
        if self.metrics is not None:
            self.metrics.write(record)

    def log_validation(self, iteration: int, loss: float) -> None:
        """The validation loss (base weights, no inner loop) at ``iteration``."""
        if not self.rank0:
            return
        self._record("valid", iteration, loss=loss)
        self.message(f"step {iteration}/{self.train_iters} | valid loss {_fmt(loss)} (base weights, no inner loop)")
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("valid/loss", loss, iteration)
        if self.wandb is not None:
            self.wandb.log({"valid/loss": loss}, step=iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
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
