"""Distributed start-up: torch.distributed + Megatron parallel state, on ``cuda`` (NCCL) or ``cpu`` (gloo).

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths (RoPE asks for
``torch.cuda.current_device()``, the model-parallel RNG tracker forks the CUDA generator, checkpoint writers
synchronise streams).  :func:`apply_cpu_shim` redirects exactly those calls to the CPU.  It is applied
explicitly by :func:`initialize` when ``device="cpu"`` and never at import time, so a GPU run is untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mp_random

from megatron_focusft.pipeline.split import PipelineSplit

Device = Literal["cuda", "cpu"]

_CPU_SHIM_APPLIED = False


class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """Megatron's model-parallel RNG tracker, keeping its named states on the CPU generator.

    Megatron forks a named RNG state around every random draw that must differ (or agree) across tensor
    parallel ranks.  On CPU the same bookkeeping is done with ``torch.get_rng_state``/``set_rng_state``.
    """

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        self.seeds_.add(seed)
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


class _CpuZerosTorch:
    """``torch`` for Megatron's pipeline schedules on a CPU-only process: ``zeros(device="cuda")`` on the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def apply_cpu_shim() -> None:
    """Make Megatron-Core's CUDA-only calls harmless on a CPU-only process (idempotent).

    - ``torch.cuda.current_device`` returns the CPU device (RoPE and a few buffers are placed with it);
    - ``torch.cuda.synchronize`` / ``current_stream`` / ``Stream.wait_stream`` become no-ops;
    - Megatron's model-parallel RNG tracker is replaced by :class:`CpuRNGStatesTracker`;
    - ``Tensor.cuda()`` keeps a CPU tensor where it is (CUDA is absent): Megatron moves the tied output
      layer's copy of the embedding on the last pipeline stage with it before its first-to-last all-reduce;
    - Megatron's pipeline schedules make their token counter with ``torch.zeros(..., device="cuda")``: the
      schedules module sees a ``torch`` whose ``zeros`` puts ``"cuda"`` tensors on the CPU.
    """
    global _CPU_SHIM_APPLIED
    if _CPU_SHIM_APPLIED:
        return

    class _NullStream:
        def wait_stream(self, _stream: object) -> None:
            return None

        def wait_event(self, _event: object) -> None:  # megatron-core >= 0.19's grad sync
            return None

        def synchronize(self) -> None:
            return None

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        schedules.torch = _CpuZerosTorch()  # type: ignore[assignment]
    _CPU_SHIM_APPLIED = True


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of one run. Data parallelism takes what is left of the world.

    ``sequence_parallel`` splits the activations outside attention along the tensor-parallel group (Megatron's
    sequence parallelism); Megatron's parallel state does not depend on it, the model and the packing do."""

    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    pipeline_model_parallel_size: int = 1
    decoder_first_pipeline_num_layers: int | None = None  # Megatron's uneven split (None: even)
    decoder_last_pipeline_num_layers: int | None = None

    @property
    def model_parallel_size(self) -> int:
        """GPUs of one model replica: TP x CP x PP."""
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def pipeline_split(self, num_layers: int) -> PipelineSplit:
        """The layers of each pipeline stage for a model of ``num_layers``."""
        return PipelineSplit(
            num_layers,
            self.pipeline_model_parallel_size,
            self.decoder_first_pipeline_num_layers,
            self.decoder_last_pipeline_num_layers,
        )

    def validate(self, world_size: int) -> None:
        sizes = (self.tensor_model_parallel_size, self.context_parallel_size, self.pipeline_model_parallel_size)
        if min(sizes) < 1:
            raise ValueError(f"parallel sizes must be >= 1, got {self}")
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x context-parallel-size {self.context_parallel_size} x "
                f"pipeline-model-parallel-size {self.pipeline_model_parallel_size}"
            )


def initialize(
    device: Device,
    layout: ParallelLayout = ParallelLayout(),
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Start torch.distributed (from torchrun's environment) and Megatron's parallel state.

    Without ``RANK``/``WORLD_SIZE`` in the environment a single-process group is started, so tools and
    tests use the same code path as multi-process jobs.
    """
    if device == "cpu":
        apply_cpu_shim()
    elif not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available; use --device cpu")

    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # torchrun's environment when launched by it; otherwise a private one-process group (the
        # environment of the calling process is left untouched, so child processes inherit nothing stale).
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        private = {} if launched else {"init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1}
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **private,
        )
    layout.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG states (identically on every rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tracker = mp_random.get_cuda_rng_tracker()
    if isinstance(tracker, CpuRNGStatesTracker):
        # Same named states Megatron's model_parallel_cuda_manual_seed creates, on the CPU generator.
        tracker.reset()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * tp_rank)
    else:
        mp_random.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a spawned worker (shown as the cause)."""

    def __str__(self) -> str:
        return str(self.args[0])


def launch_cpu_processes(
    fn: Callable[..., Any], nprocs: int, layout: ParallelLayout = ParallelLayout(), args: tuple = ()
) -> Any:
    """Run ``fn(*args)`` in ``nprocs`` fresh gloo processes with Megatron's parallel state; rank 0's result.

    For CPU tools (checkpoint conversion at a TP size) and tests.  ``fn`` must be importable by name
    (module level) because the processes are spawned.  An exception on any rank is re-raised here with
    that rank's traceback text.
    """
    import tempfile

    import torch.multiprocessing as mp

    layout.validate(nprocs)
    # The two torch.load(weights_only=False) below read only what the spawned workers of this call wrote into
    # a private temporary folder (the result and a pickled exception): never a user's file.  Checkpoint files
    # are read through megatron_focusft.convert.trust (weights_only=True, .metadata screened).
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        try:
            mp.start_processes(
                _cpu_worker,
                args=(nprocs, _free_port(), layout, fn, args, out),
                nprocs=nprocs,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as e:
            errors = sorted(f for f in os.listdir(d) if f.startswith("error"))
            if errors:
                error, remote_tb = torch.load(os.path.join(d, errors[0]), weights_only=False)
                raise error from RemoteTraceback(remote_tb)
            raise RuntimeError(str(e)) from None
        return torch.load(out, weights_only=False)


def _cpu_worker(
    rank: int, nprocs: int, port: int, layout: ParallelLayout, fn: Callable[..., Any], args: tuple, out: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        initialize("cpu", layout)
        result = fn(*args)
        if rank == 0:
            torch.save(result, out)
    except BaseException as e:
        import traceback

        try:
            remote_tb = f"rank {rank}:\n{traceback.format_exc()}"
            torch.save((e, remote_tb), os.path.join(os.path.dirname(out), f"error{rank}.pt"))
        except Exception:
            pass
        raise
    finally:
        destroy()


def peak_rss_gib() -> float:
    """Peak resident memory of this process or of its largest finished child (Linux reports KiB)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, child) / 1024**2


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
