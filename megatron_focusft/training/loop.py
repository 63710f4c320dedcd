"""The training loop, top to bottom: set up, then for each global batch: micro-batches through the bilevel
step, gradient sync, optimizer and scheduler step, logs, checkpoints.

Parallelism is set up in one place (:func:`setup`): Megatron's parallel state (TP x CP x DP), the model
with its TP shards and fast-weight linears, Megatron's ``DistributedDataParallel``, and a data loader
that gives every data-parallel rank its own packs.

The loss of a global batch is normalised by the number of documents ('sample' reduction) or response
tokens ('token') in the *whole* global batch, counted before the first backward and summed over DP
ranks, and DDP sums (not averages) gradients: 4 micro-batches on one rank, 2 x 2 and 4 ranks x 1 give the
same gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_focusft import runtime
from megatron_focusft.bilevel import BilevelStep
from megatron_focusft.config import FocuSFTConfig
from megatron_focusft.convert.hf_io import copy_tokenizer_files
from megatron_focusft.convert.megatron_io import CheckpointMeta, export_hf, load_model, resolve_checkpoint
from megatron_focusft.data.dataset import PackedDataset, PackLoader
from megatron_focusft.data.packing import pad_multiple, round_up
from megatron_focusft.flops import peak_tflops, sft_flops
from megatron_focusft.models.focusft import FocuSFTModel, build_focusft_model
from megatron_focusft.models.qwen2 import Qwen2Arch
from megatron_focusft.training.arguments import (
    focusft_config,
    resume_checkpoint,
    run_identity,
    scheduler_values,
    train_schedule,
    validate,
)
from megatron_focusft.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from megatron_focusft.training.logger import MetricsLogger
from megatron_focusft.training.optimizer import build_optimizer


@dataclass
class Trainer:
    """Everything the loop touches, built by :func:`setup`."""

    args: argparse.Namespace
    arch: Qwen2Arch
    meta: CheckpointMeta
    config: FocuSFTConfig
    model: FocuSFTModel  # DDP's hooks live on its parameters
    ddp: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    step: BilevelStep
    loader: PackLoader
    state: TrainState
    train_iters: int
    micro_batches: int
    device: torch.device
    tokenizer_dir: Path | None
    run: dict  # seed, global batch size, pack count: stored in checkpoints, checked on resume
    valid: PackedDataset | None = None
    last_saved: int | None = None  # the iteration of the checkpoint written (or resumed from) last


def setup(args: argparse.Namespace) -> Trainer:
    validate(args)  # every flag check happens before any work
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    runtime.initialize(args.device, runtime.ParallelLayout(tp, cp), seed=args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    config = focusft_config(args)
    resume = resume_checkpoint(args)
    if args.load is not None and resume is None and dist.get_rank() == 0:
        print(f"--load {args.load} holds no checkpoint yet: starting fresh from {args.pretrained_checkpoint}")
    source = resume or resolve_checkpoint(args.pretrained_checkpoint)
    meta = CheckpointMeta.read(source)
    arch = meta.arch
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    model = build_focusft_model(
        arch,
        config,
        params_dtype=dtype,
        sequence_parallel=args.sequence_parallel,
        perform_initialization=False,
        calculate_per_token_loss=True,  # DDP sums gradients; the loop normalises by the global batch
    ).to(device)
    load_model(model, source)
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=args.device == "cuda",
            use_distributed_optimizer=args.device == "cuda",
            # On GPU Megatron raises on a NaN/Inf gradient before reducing it; on CPU the optimizer skips.
            check_for_nan_in_grad=args.device == "cuda",
        ),
        model,
    )
    optimizer = build_optimizer(model, ddp, args)

    dataset = PackedDataset(args.data_path)
    dp = parallel_state.get_data_parallel_world_size()
    micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    train_iters, warmup = train_schedule(args, len(dataset))
    sched = scheduler_values(args, train_iters, warmup)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else args.lr,
        max_lr=sched["max_lr"],
        min_lr=sched["min_lr"],
        lr_warmup_steps=sched["lr_warmup_steps"],
        lr_decay_steps=sched["lr_decay_steps"],
        lr_decay_style=sched["lr_decay_style"],
        start_wd=sched["start_wd"],
        end_wd=args.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        # The flags decide; a resume whose flags differ from the checkpoint's is refused (validate, and
        # Megatron's own check when loading), never silently run with the checkpoint's old schedule.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )
    state = load_checkpoint(resume, model, optimizer, scheduler) if resume else TrainState()
    loader = PackLoader(
        dataset,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        seed=args.seed,
        micro_batch_size=args.micro_batch_size,
        consumed_samples=state.consumed_samples,
        sequence_length=args.seq_length,
        pad_multiple=pad_multiple(tp, cp, args.sequence_parallel),
    )
    tokenizer_dir = _stable_tokenizer_dir(source / "tokenizer", args.save)
    return Trainer(
        args=args,
        arch=arch,
        meta=CheckpointMeta(arch, dtype, token_ids=meta.token_ids),  # the ids carry on from the pretrained model
        config=config,
        model=model,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        step=BilevelStep(model, config),
        loader=loader,
        state=state,
        train_iters=train_iters,
        micro_batches=micro_batches,
        device=device,
        tokenizer_dir=tokenizer_dir,
        run=run_identity(args, len(dataset)),
        valid=PackedDataset(args.valid_data_path) if args.valid_data_path is not None else None,
        last_saved=state.iteration if resume else None,
    )


def _stable_tokenizer_dir(source: Path, save: Path | None) -> Path | None:
    """Tokenizer files kept in ``SAVE/tokenizer`` for every checkpoint and the export: the checkpoint a
    run resumed from may be pruned while it trains."""
    if not source.is_dir():
        return None
    if save is None:
        return source
    stable = Path(save) / "tokenizer"
    if dist.get_rank() == 0 and source.resolve() != stable.resolve():
        copy_tokenizer_files(source, stable)
    dist.barrier()
    return stable


def train_step(t: Trainer) -> dict[str, float]:
    """One global batch: every micro-batch through the bilevel step, then sync, clip and update."""
    inputs = [next(t.loader).to(t.device) for _ in range(t.micro_batches)]
    # The normaliser of the whole global batch, known before the first backward.
    per_sample = t.config.loss_reduction == "sample"
    local = sum(inp.num_documents if per_sample else inp.num_response_tokens for inp in inputs)
    # [normaliser, outer loss sum, inner loss before, inner loss after, documents, tokens, flops]
    counts = torch.zeros(7, dtype=torch.float64, device=t.device)
    counts[0] = float(local)

    t.ddp.zero_grad_buffer()
    t.optimizer.zero_grad()
    dp_group = parallel_state.get_data_parallel_group()
    units = counts[:1].clone()
    dist.all_reduce(units, group=dp_group)
    for i, inp in enumerate(inputs):
        # DDP reduces gradients once, after the last micro-batch (with overlap on GPU: during its backward).
        sync = contextlib.nullcontext() if i == len(inputs) - 1 else t.ddp.no_sync()
        with sync:
            stats = t.step(inp, loss_scale=1.0 / float(units), iteration=t.state.iteration)
        counts[1] += float(stats.outer_loss_sum)
        if stats.inner_losses:
            counts[2] += float(stats.inner_losses[0].sum())  # before adaptation, summed over documents
            counts[3] += float(stats.document_losses.sum())  # after (the outer pass), summed over documents
            counts[4] += inp.num_documents
        counts[5] += inp.num_tokens
        counts[6] += sft_flops(t.arch, inp)  # one replica's (every TP/CP rank of it counts the same packs)
    finalize_model_grads([t.ddp])
    updated, grad_norm, _ = t.optimizer.step()
    if updated:
        t.scheduler.step(increment=1)
    else:  # a non-finite gradient norm: no update (as Megatron, the schedule does not advance either)
        t.state.skipped_iterations += 1
    dist.all_reduce(counts, group=dp_group)  # over the DP replicas: the global batch's sums
    t.state.iteration += 1
    t.state.consumed_samples = t.loader.consumed_samples
    out = {
        "loss": float(counts[1] / counts[0]),
        "grad_norm": float(grad_norm if grad_norm is not None else 0.0),
        "tokens": float(counts[5]),
        "flops": float(counts[6]),
        "skipped": not updated,
    }
    if counts[4] > 0:
        out["inner_loss_before"] = float(counts[2] / counts[4])
        out["inner_loss_after"] = float(counts[3] / counts[4])
    out["lr"] = t.optimizer.param_groups[0]["lr"]
    return out


def evaluate(t: Trainer) -> float:
    """Mean response-token loss of the validation packs with the current base weights: the standard forward
    with the run's attention mask, no fast weights (no inner loop), no gradient.  Every pack once, spread
    over the DP ranks; reduced as training reduces ('sample': per-document means averaged over documents,
    'token': over response tokens), summed over DP."""
    assert t.valid is not None
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    tp, cp = t.args.tensor_model_parallel_size, t.args.context_parallel_size
    length = round_up(t.args.seq_length or t.valid.pack_length, pad_multiple(tp, cp, t.args.sequence_parallel))
    per_sample = t.config.loss_reduction == "sample"
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # loss sum, documents or tokens
    for i in range(dp_rank, len(t.valid), dp):
        inp = t.valid.micro_batch([i], pad_to=length).to(t.device)
        stats = t.step.evaluate(inp)
        sums[0] += float(stats.outer_loss_sum)
        sums[1] += inp.num_documents if per_sample else inp.num_response_tokens
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return float(sums[0] / sums[1])


class _StopSignal:
    """SIGTERM / SIGUSR1 (SLURM pre-emption): finish the running iteration, save, exit cleanly."""

    def __init__(self) -> None:
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = True

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _weights_finite(t: Trainer) -> bool:
    """Whether every weight of the model is finite on every rank (collective)."""
    bad = torch.zeros(1, device=t.device)
    for p in t.model.parameters():
        if not bool(torch.isfinite(p).all()):
            bad += 1
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _save(t: Trainer) -> bool:
    """Write a checkpoint of this iteration (once); False, and nothing written, if a weight is not finite."""
    if t.args.save is None or t.last_saved == t.state.iteration:
        return True
    if not _weights_finite(t):
        return False
    save_checkpoint(
        t.args.save,
        t.state,
        t.model,
        t.optimizer,
        t.scheduler,
        replace(t.meta, iteration=t.state.iteration),
        t.tokenizer_dir,
        t.args.keep_checkpoints,
        t.run,
    )
    t.last_saved = t.state.iteration
    return True


def train(args: argparse.Namespace) -> int:
    """Run training to ``train_iters``; returns the process exit status."""
    stop = _StopSignal()  # before the (long) set-up: a signal then costs one step, not the process
    t = setup(args)
    peak = peak_tflops(torch.cuda.get_device_name(), t.meta.dtype) if args.device == "cuda" else None
    logger = MetricsLogger(args, t.train_iters, start_iteration=t.state.iteration, peak_tflops=peak)

    def finish(status: int) -> int:
        logger.close()
        runtime.destroy()
        return status

    def save() -> bool:
        if _save(t):
            return True
        logger.message(
            f"error: a weight is not finite at iteration {t.state.iteration}; no checkpoint written, training "
            "stopped (resume from the last checkpoint with a lower --lr or a --clip-grad)"
        )
        return False

    finished_before = t.state.iteration >= t.train_iters
    while t.state.iteration < t.train_iters:
        start = time.perf_counter()
        metrics = train_step(t)
        logger.log(t.state, metrics, time.perf_counter() - start)
        if t.valid is not None and args.eval_interval and t.state.iteration % args.eval_interval == 0:
            logger.log_validation(t.state.iteration, evaluate(t))
        if args.save_interval and t.state.iteration % args.save_interval == 0 and not save():
            return finish(1)
        unfinished = t.state.iteration < t.train_iters
        at_exit_interval = bool(args.exit_interval) and unfinished and t.state.iteration % args.exit_interval == 0
        if stop.any_rank(t.device) or at_exit_interval:
            if not save():
                return finish(1)
            why = "--exit-interval" if at_exit_interval else "a signal"
            saved = "; checkpoint saved" if args.save is not None else " (no --save: nothing saved)"
            logger.message(f"stopped by {why} at iteration {t.state.iteration}{saved}")
            return finish(0)
    if t.valid is not None and not (args.eval_interval and t.state.iteration % args.eval_interval == 0):
        logger.log_validation(t.state.iteration, evaluate(t))  # at the end (unless that step just did)
    if not save():
        return finish(1)
    if args.export_hf is not None:
        if finished_before and Path(args.export_hf).exists():
            logger.message(f"the run was already finished and {args.export_hf} exists: export skipped")
        else:
            export_hf(t.model, t.arch, t.meta.dtype, args.export_hf, t.tokenizer_dir, token_ids=t.meta.token_ids)
            logger.message(f"exported the model to {args.export_hf}")
    return finish(0)


def main(argv: list[str] | None = None) -> int:
    from megatron_focusft.training.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
        return train(args)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
