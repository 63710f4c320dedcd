"""The training loop, top to bottom: set up, then for each global batch: micro-batches through the bilevel
step, gradient sync, optimizer and scheduler step, logs, checkpoints.

``tools/train.py`` is arguments (parse the flags into a ``TrainConfig``) -> plan (every check and every read
from disk, once: ``plan.py``) -> loop (build from the plan, train).  Parallelism is set up in one place
(:func:`setup`): Megatron's parallel state (TP x CP x DP), the model with its TP shards and fast-weight
linears and its weights (loaded once: from the resumed checkpoint, else the pretrained one), Megatron's
``DistributedDataParallel``, and a data loader that gives every data-parallel rank its own packs.

The loss of a global batch is normalised by the number of documents ('sample' reduction) or response
tokens ('token') in the *whole* global batch, counted before the first backward and summed over DP
ranks, and DDP sums (not averages) gradients: 4 micro-batches on one rank, 2 x 2 and 4 ranks x 1 give the
same gradient.
"""

from __future__ import annotations

import os
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
from megatron_focusft.convert import trust
from megatron_focusft.convert.hf_io import copy_tokenizer_files
from megatron_focusft.convert.megatron_io import CheckpointMeta, export_hf, load_model
from megatron_focusft.convert.writer_process import prepare_checkpoint_writer
from megatron_focusft.data.dataset import BlendedPacks, PackLoader, PackRange, Packs
from megatron_focusft.data.packing import pad_multiple, round_up
from megatron_focusft.flops import peak_tflops, sft_flops
from megatron_focusft.memory_plan import Layout, Workload
from megatron_focusft.models.focusft import FocuSFTModel, build_focusft_model
from megatron_focusft.models.qwen2 import Qwen2Arch
from megatron_focusft.pipeline.cost import pipeline_cost
from megatron_focusft.run_record import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    RUN_CONFIG_FORMAT,
    RUN_CONFIG_VERSION,
    iso_utc,
    read_metrics,
    write_run_config,
)
from megatron_focusft.schedule import PipelineStep
from megatron_focusft.training import model_card
from megatron_focusft.training.arguments import parse_args
from megatron_focusft.training.checkpoint import RunIdentity, TrainState, load_checkpoint, save_checkpoint
from megatron_focusft.training.config import TrainConfig
from megatron_focusft.training.divergence import DivergenceMonitor
from megatron_focusft.training.errors import SetupError
from megatron_focusft.training.logger import (
    MetricsLogger,
    check_logging_packages,
    describe_run,
    interactive,
    stamp,
)
from megatron_focusft.training.optimizer import build_optimizer
from megatron_focusft.training.plan import Schedule, TrainPlan, plan
from megatron_focusft.training.save_lock import SaveFolderBusy, SaveFolderLock


@dataclass
class Trainer:
    """Everything the loop touches, built by :func:`setup`."""

    train_config: TrainConfig
    arch: Qwen2Arch
    meta: CheckpointMeta
    config: FocuSFTConfig
    model: FocuSFTModel  # DDP's hooks live on its parameters
    ddp: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    step: BilevelStep
    pipeline: PipelineStep  # the step's micro-batches through Megatron's schedule (any PP size)
    loader: PackLoader
    state: TrainState
    train_iters: int
    micro_batches: int
    device: torch.device
    tokenizer_dir: Path | None
    run: RunIdentity  # seed, global batch size, pack count: stored in checkpoints, checked on resume
    valid: Packs | None = None
    last_saved: int | None = None  # the iteration of the checkpoint written (or resumed from) last
    save_lock: SaveFolderLock | None = None  # rank 0's, on --save, for the life of the run


def setup(plan: TrainPlan) -> Trainer:
    """Build the run :func:`~megatron_focusft.training.plan.plan` checked (collective): parallel state, model
    (weights loaded once), DDP, optimizer, scheduler, the resumed training state, the data loader."""
    cfg = plan.config
    runtime.initialize(
        cfg.model.device, cfg.parallel, seed=cfg.batch.seed, timeout_minutes=cfg.model.distributed_timeout_minutes
    )
    save_lock = _lock_save_folder(cfg.checkpoints.save)
    if cfg.checkpoints.save is not None:
        prepare_checkpoint_writer()  # now, not at the first save: a pre-emption signal can come at any time
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.model.device == "cuda" else torch.device("cpu")
    resumable = cfg.checkpoints.load is not None and not cfg.checkpoints.finetune
    if resumable and plan.resume is None and dist.get_rank() == 0:
        print(
            stamp(
                f"--load {cfg.checkpoints.load} holds no checkpoint yet: starting fresh from "
                f"{cfg.model.pretrained_checkpoint}"
            )
        )
    arch = plan.meta.arch
    model = _build_model(plan, device)
    ddp = _wrap_ddp(model, cfg.model.device)
    optimizer = build_optimizer(model, ddp, cfg.optimization, device=cfg.model.device, bf16=cfg.model.bf16)
    scheduler = _build_scheduler(optimizer, plan.schedule, override=cfg.checkpoints.override_opt_param_scheduler)
    state = TrainState()
    if plan.resume is not None:
        ckpt = cfg.checkpoints
        state = load_checkpoint(
            plan.resume, model, optimizer, scheduler, load_optim=ckpt.load_optim, load_rng=ckpt.load_rng
        )
        if dist.get_rank() == 0:
            print(
                stamp(
                    f"resumed from {plan.resume.checkpoint.name} of {cfg.checkpoints.load} (iteration "
                    f"{state.iteration} of {plan.schedule.train_iters}, {state.consumed_samples} packs consumed)"
                )
            )
    loader = _build_loader(plan, state)
    tokenizer_dir = _stable_tokenizer_dir(plan.source / "tokenizer", cfg.checkpoints.save)
    step = BilevelStep(model, cfg.focusft)
    return Trainer(
        train_config=cfg,
        arch=arch,
        # the token ids and the record of where the weights came from carry on from the pretrained model
        meta=CheckpointMeta(arch, cfg.model.dtype, token_ids=plan.meta.token_ids, origin=plan.meta.origin),
        config=cfg.focusft,
        model=model,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        step=step,
        pipeline=PipelineStep(step, ddp),
        loader=loader,
        state=state,
        train_iters=plan.schedule.train_iters,
        micro_batches=plan.micro_batches,
        device=device,
        tokenizer_dir=tokenizer_dir,
        run=plan.run,
        valid=plan.valid_data,
        last_saved=state.iteration if plan.resume else None,
        save_lock=save_lock,
    )


def _lock_save_folder(save: Path | None) -> SaveFolderLock | None:
    """Rank 0 locks ``--save`` (collective: every rank learns whether it could, and a busy folder is the
    same one-line error on every rank)."""
    lock, message = None, [None]
    if save is not None and dist.get_rank() == 0:
        try:
            lock = SaveFolderLock(Path(save))
        except SaveFolderBusy as e:
            message = [str(e)]
    if save is not None:
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise SetupError(message[0])
    return lock


def _build_model(plan: TrainPlan, device: torch.device) -> FocuSFTModel:
    """The FocuSFT model holding the weights of ``plan.source`` (loaded here, once)."""
    cfg = plan.config
    model = build_focusft_model(
        plan.meta.arch,
        cfg.focusft,
        params_dtype=cfg.model.dtype,
        sequence_parallel=cfg.parallel.sequence_parallel,
        perform_initialization=False,
        calculate_per_token_loss=True,  # DDP sums gradients; the loop normalises by the global batch
        num_layers_in_first_pipeline_stage=cfg.parallel.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=cfg.parallel.decoder_last_pipeline_num_layers,
    ).to(device)
    try:  # the plan checked the files (and hashed them); the pickles and tensor shapes are checked again here
        load_model(model, plan.source, checksums=False)
    except trust.CheckpointError as e:
        raise SetupError(str(e)) from None
    return model


def _wrap_ddp(model: torch.nn.Module, device: str) -> DistributedDataParallel:
    return DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=device == "cuda",
            use_distributed_optimizer=device == "cuda",
            # On GPU Megatron raises on a NaN/Inf gradient before reducing it; on CPU the optimizer skips.
            check_for_nan_in_grad=device == "cuda",
        ),
        model,
    )


def _build_scheduler(optimizer: object, schedule: Schedule, *, override: bool = False) -> OptimizerParamScheduler:
    """Megatron's scheduler for ``schedule``; ``override`` (``--override-opt-param-scheduler``): a resume keeps the
    checkpoint's step count but these values."""
    sched = schedule.scheduler_state()
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if schedule.warmup_iters else schedule.lr,
        max_lr=sched["max_lr"],
        min_lr=sched["min_lr"],
        lr_warmup_steps=sched["lr_warmup_steps"],
        lr_decay_steps=sched["lr_decay_steps"],
        lr_decay_style=sched["lr_decay_style"],
        start_wd=sched["start_wd"],
        end_wd=schedule.weight_decay,
        wd_incr_steps=schedule.train_iters,
        wd_incr_style="constant",
        # The flags decide; a resume whose flags differ from the checkpoint's is refused (the plan, and
        # Megatron's own check when loading) unless overridden, never silently run with the checkpoint's old schedule.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=override,
    )


def _build_loader(plan: TrainPlan, state: TrainState) -> PackLoader:
    cfg = plan.config
    layout = cfg.parallel
    return PackLoader(
        plan.train_data,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=cfg.batch.seed,
        micro_batch_size=cfg.batch.micro_batch_size,
        consumed_samples=state.consumed_samples,
        sequence_length=cfg.data.seq_length,
        pad_multiple=pad_multiple(
            layout.tensor_model_parallel_size, layout.context_parallel_size, layout.sequence_parallel
        ),
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
    # Megatron's schedule; DDP reduces gradients once, after the last micro-batch (with overlap on GPU:
    # during its backward), in finalize_model_grads (which also sums a tied embedding's two copies).
    step_stats = t.pipeline(inputs, loss_scale=1.0 / float(units), iteration=t.state.iteration)
    for inp, stats in zip(inputs, step_stats):
        counts[1] += float(stats.outer_loss_sum)
        if stats.inner_losses:
            counts[2] += float(stats.inner_losses[0].sum())  # before adaptation, summed over documents
            counts[3] += float(stats.document_losses.sum())  # after (the outer pass), summed over documents
            counts[4] += inp.num_documents
        counts[5] += inp.num_tokens
        counts[6] += sft_flops(t.arch, inp)  # one replica's (every TP/CP/PP rank of it counts the same packs)
    _losses_from_last_stage(counts[1:5])
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
        "grad_norm_measured": grad_norm is not None,
        "tokens": float(counts[5]),
        "flops": float(counts[6]),
        "skipped": not updated,
    }
    if counts[4] > 0:
        out["inner_loss_before"] = float(counts[2] / counts[4])
        out["inner_loss_after"] = float(counts[3] / counts[4])
    out["lr"] = t.optimizer.param_groups[0]["lr"]
    return out


def _losses_from_last_stage(sums: torch.Tensor) -> None:
    """The last pipeline stage's loss sums on every stage (the others hold zeros), in place."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())


def evaluate(t: Trainer) -> float:
    """Mean response-token loss of the validation packs with the current base weights: the standard forward
    with the run's attention mask, no fast weights (no inner loop), no gradient.  Every pack once, spread
    over the DP ranks; reduced as training reduces ('sample': per-document means averaged over documents,
    'token': over response tokens), summed over DP."""
    assert t.valid is not None
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    layout = t.train_config.parallel
    tp, cp, sp = layout.tensor_model_parallel_size, layout.context_parallel_size, layout.sequence_parallel
    length = round_up(t.train_config.data.seq_length or t.valid.pack_length, pad_multiple(tp, cp, sp))
    per_sample = t.config.loss_reduction == "sample"
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # loss sum, documents or tokens
    inputs = [t.valid.micro_batch([i], pad_to=length).to(t.device) for i in range(dp_rank, len(t.valid), dp)]
    for inp, stats in zip(inputs, t.pipeline.evaluate(inputs) if inputs else []):
        sums[0] += float(stats.outer_loss_sum)
        sums[1] += inp.num_documents if per_sample else inp.num_response_tokens
    _losses_from_last_stage(sums[:1])
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


def _save(t: Trainer, logger: MetricsLogger) -> str | None:
    """Write a checkpoint of this iteration (once) and log how long it took and its size; why not, with nothing
    published, if a weight is not finite or the written checkpoint fails its check; None when saved (or nothing
    to save)."""
    ckpt = t.train_config.checkpoints
    if ckpt.save is None or t.last_saved == t.state.iteration:
        return None
    if not _weights_finite(t):
        return (
            f"a weight is not finite at iteration {t.state.iteration}; no checkpoint written, training stopped "
            "(resume from the last checkpoint with a lower --lr or a --clip-grad)"
        )
    start = time.perf_counter()
    try:
        folder = save_checkpoint(
            ckpt.save,
            t.state,
            t.model,
            t.optimizer,
            t.scheduler,
            replace(t.meta, iteration=t.state.iteration),
            t.tokenizer_dir,
            ckpt.keep_checkpoints,
            t.run,
        )
    except trust.CheckpointError as e:
        return f"{e}; training stopped"
    t.last_saved = t.state.iteration
    if logger.rank0:
        seconds = time.perf_counter() - start  # written, sealed, checked and published
        logger.message(f"saved {folder.name} in {seconds:.1f} s ({_bytes(_folder_bytes(folder))}) under {ckpt.save}")
    return None


def _folder_bytes(folder: Path) -> int:
    """The size of a checkpoint: the bytes of every file in it (what ``checksums.json`` lists)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def run_record(p: TrainPlan, started: float) -> dict:
    """What this launch runs with (``SAVE/run_config.json``, :mod:`megatron_focusft.run_record`): every
    setting, the world and its layout, the schedule, where the weights come from, the data's metadata."""
    cfg, layout = p.config, p.config.parallel
    resume = p.resume
    return {
        "format": RUN_CONFIG_FORMAT,
        "version": RUN_CONFIG_VERSION,
        "started": iso_utc(started),
        "world_size": p.world_size,
        "layout": {
            "tensor_model_parallel_size": layout.tensor_model_parallel_size,
            "pipeline_model_parallel_size": layout.pipeline_model_parallel_size,
            "context_parallel_size": layout.context_parallel_size,
            "data_parallel_size": p.data_parallel_size,
            "sequence_parallel": layout.sequence_parallel,
        },
        "train_iters": p.schedule.train_iters,
        "warmup_iters": p.schedule.warmup_iters,
        "micro_batches_per_step": p.micro_batches,
        "resumed_from": None
        if resume is None
        else {
            "checkpoint": str(resume.checkpoint),
            "iteration": resume.state.iteration,
            "consumed_samples": resume.state.consumed_samples,
        },
        "weights_from": str(p.source),
        "base_model": p.meta.origin,
        "data": _data_record(p.train_data),
        "valid_data": None if p.valid_data is None else _data_record(p.valid_data),
        "config": cfg.to_dict(),
    }


def _data_record(packs: Packs) -> dict:
    """The ``PREFIX.json`` of the data a run reads: a dataset's; a ``--split`` part's, with its pack range; a
    blend's parts with their weights (the statistics then are per part)."""
    if isinstance(packs, BlendedPacks):
        return {"blend": [_data_record(part) for part in packs.parts], "weights": packs.weights}
    if isinstance(packs, PackRange):
        return {**packs.dataset.meta, "split_packs": [packs.start, packs.stop]}
    return packs.meta


def train(config: TrainConfig) -> int:
    """Plan, set up and run training to ``train_iters``; returns the process exit status.  Before the model
    is built: the logging packages are checked and rank 0 prints the run's configuration (one block); once
    this run holds ``--save``, it is recorded there (``run_config.json``)."""
    stop = _StopSignal()  # before the (long) set-up: a signal then costs one step, not the process
    check_logging_packages(config.logging)
    started = time.time()
    checked = plan(config)
    record = run_record(checked, started)
    save = config.checkpoints.save
    if int(os.environ.get("RANK", "0")) == 0:  # before distributed start-up: torchrun's rank
        saved_as = f"saved as {Path(save) / RUN_CONFIG_FILE}" if save is not None else "not saved: no --save"
        print(stamp(describe_run(record, saved_as)))
    t = setup(checked)
    if save is not None and dist.get_rank() == 0:  # the folder is this run's now (its lock is held)
        kept = write_run_config(Path(save), record)
        if kept is not None:
            print(stamp(f"the previous launch's record {RUN_CONFIG_FILE} is kept as {kept.name}"))
    peak = peak_tflops(torch.cuda.get_device_name(), t.meta.dtype) if config.model.device == "cuda" else None
    logger = MetricsLogger(
        config.logging,
        t.train_iters,
        start_iteration=t.state.iteration,
        peak_tflops=peak,
        save_dir=save,
        launch=record["started"],
        run_config=record,
    )
    for note in checked.notes:
        logger.message(f"note: {note}")
    if config.parallel.pipeline_model_parallel_size > 1 and dist.get_rank() == 0:
        logger.message(_predicted_pipeline(t))
    try:
        return _run(t, logger, stop, record)
    finally:
        logger.close()
        if t.save_lock is not None:
            t.save_lock.release()
        runtime.destroy()


def _predicted_pipeline(t: Trainer) -> str:
    """Each stage's predicted time per micro-batch and the step's (``megatron_focusft.pipeline.cost``), for the
    run's layout and the first pack's documents and response share: the pipeline's imbalance before step 1."""
    cfg, focusft = t.train_config, t.config
    layout = cfg.parallel
    first = t.loader.dataset.micro_batch([0], pad_to=t.loader.sequence_length)
    plan_layout = Layout(
        tp=layout.tensor_model_parallel_size,
        cp=layout.context_parallel_size,
        dp=layout.data_parallel_size(dist.get_world_size()),
        sequence_parallel=layout.sequence_parallel,
        micro_batch_size=cfg.batch.micro_batch_size,
        pp=layout.pipeline_model_parallel_size,
        first_stage_layers=layout.decoder_first_pipeline_num_layers,
        last_stage_layers=layout.decoder_last_pipeline_num_layers,
    )
    work = Workload(
        seq_length=t.loader.sequence_length,
        recompute=focusft.recompute or "none",
        attention_backend=focusft.attention_backend if focusft.attention_backend != "te" else "flex",
        focusft=focusft.uses_fast_weights,
        inner_steps=focusft.inner_steps,
        layer_fraction=focusft.layer_fraction,
        lora_rank=focusft.lora_rank,
        documents_per_pack=first.num_documents,
        response_fraction=first.num_response_tokens / first.num_tokens,
        targets=tuple(focusft.targets),
        loss_chunk_tokens=focusft.loss_chunk_tokens,
    )
    cost = pipeline_cost(t.arch, plan_layout, work, t.micro_batches)
    return f"pipeline: {layout.pipeline_split(t.arch.num_layers).describe()}; predicted per stage:\n{cost.table()}"


def _run(t: Trainer, logger: MetricsLogger, stop: _StopSignal, record: dict) -> int:
    """The loop, top to bottom: step, log, validate, check for divergence, save, stop; then finish (``record``:
    this launch's ``run_config.json``, for the exported model's card)."""
    cfg = t.train_config
    ckpt, eval_interval = cfg.checkpoints, cfg.data.eval_interval
    monitor = DivergenceMonitor(cfg.checks)
    finished_before = t.state.iteration >= t.train_iters
    while t.state.iteration < t.train_iters:
        start = time.perf_counter()
        metrics = train_step(t)
        logger.log(t.state, metrics, time.perf_counter() - start)
        verdict = monitor.observe(
            t.state.iteration,
            metrics["loss"],
            metrics["grad_norm"] if metrics["grad_norm_measured"] else None,
            metrics["tokens"],
        )
        if verdict.report is not None:
            logger.message(verdict.report)
        if verdict.stop is not None:
            logger.message(f"error: {verdict.stop}")
            return 1  # nothing saved: the last checkpoint is the last good one
        if t.valid is not None and eval_interval and t.state.iteration % eval_interval == 0:
            logger.log_validation(t.state.iteration, evaluate(t))
        if ckpt.save_interval and t.state.iteration % ckpt.save_interval == 0 and not _save_or_say(t, logger):
            return 1
        unfinished = t.state.iteration < t.train_iters
        at_exit_interval = bool(ckpt.exit_interval) and unfinished and t.state.iteration % ckpt.exit_interval == 0
        if stop.any_rank(t.device) or at_exit_interval:
            if not _save_or_say(t, logger):
                return 1
            why = "--exit-interval" if at_exit_interval else "a signal"
            saved = "; checkpoint saved" if ckpt.save is not None else " (no --save: nothing saved)"
            logger.message(f"stopped by {why} at iteration {t.state.iteration}{saved}")
            return 0
    if t.valid is not None and not (eval_interval and t.state.iteration % eval_interval == 0):
        logger.log_validation(t.state.iteration, evaluate(t))  # at the end (unless that step just did)
    if not _save_or_say(t, logger):
        return 1
    if ckpt.export_hf is not None:
        if finished_before and Path(ckpt.export_hf).exists():
            logger.message(f"the run was already finished and {ckpt.export_hf} exists: export skipped")
        else:
            start = time.perf_counter()
            export_hf(
                t.model,
                t.arch,
                t.meta.dtype,
                ckpt.export_hf,
                t.tokenizer_dir,
                progress=interactive(cfg.logging),
                token_ids=t.meta.token_ids,
                extra_files=_card_files(t, logger, record) if logger.rank0 else None,
            )
            logger.message(f"exported the model to {ckpt.export_hf} in {time.perf_counter() - start:.1f} s")
    return 0


def _card_files(t: Trainer, logger: MetricsLogger, record: dict) -> dict[str, str]:
    """The exported folder's ``README.md`` and ``training_args.json`` (rank 0): this launch's record and the
    run's ``metrics.jsonl`` (every launch's steps; without ``--save``, this launch's last records)."""
    save = t.train_config.checkpoints.save
    metrics_file = Path(save) / METRICS_FILE if save is not None else None
    if metrics_file is not None and metrics_file.is_file():
        metrics = read_metrics(metrics_file)
    else:
        metrics = list(logger.latest.values())
    facts = model_card.facts_from_records(
        t.arch, t.meta.dtype, t.state.iteration, t.meta.origin, t.tokenizer_dir, record, metrics, save
    )
    return model_card.card_files(facts, Path(t.train_config.checkpoints.export_hf).name)


def _save_or_say(t: Trainer, logger: MetricsLogger) -> bool:
    """Save this iteration; False (and the reason logged) where it could not be saved."""
    error = _save(t, logger)
    if error is not None:
        logger.message(f"error: {error}")
    return error is None


def main(argv: list[str] | None = None) -> int:
    """``tools/train.py``: a run that cannot start (bad flags, checkpoint or data) prints ``error: ...`` on one
    line and exits 2."""
    try:
        return train(parse_args(argv))
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
