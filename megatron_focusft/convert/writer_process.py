"""Megatron's checkpoint writer, made safe for pre-emption: its helper process survives a signal sent to the
whole process group, and dies with the process that started it.

``megatron.core.dist_checkpointing`` (torch_dist) collects the results of its writer workers through a queue
served by a ``multiprocessing`` manager: a *spawned* process, started at the first save, in the job's process
group, with default signal handling.  Schedulers pre-empt by signalling the whole group (SIGTERM from
``scancel``, the time limit or torchrun's shutdown), so that helper died with the signal while the trainer
was finishing its iteration to save it: ``BrokenPipeError``, no checkpoint at the stop point.  And when a
trainer was killed (``kill -9``, OOM), nothing stopped the helper: an orphan per rank.

:func:`prepare_checkpoint_writer` starts that helper itself, once per process, before the first save: it
ignores the stop signals (the trainer decides when to stop, and the helper exits with it) and asks the
kernel to kill it when its parent dies (Linux ``PR_SET_PDEATHSIG``).  It fills the module-level cache
Megatron reads (``filesystem_async._results_queue``, the same name from megatron-core 0.16 to 0.19), so
Megatron's own code path is unchanged.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.managers import SyncManager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1

_manager: SyncManager | None = None  # kept alive for the life of the process (its queue is Megatron's)


def _detach_from_stop_signals(parent_pid: int) -> None:
    """Runs first in the helper: ignore the stop signals, die with the parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Signals that arrived while the parent started us are pending (blocked): now ignored, they are dropped.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if os.getppid() != parent_pid:  # the parent died before PR_SET_PDEATHSIG took effect
        os._exit(0)


def prepare_checkpoint_writer() -> None:
    """Start Megatron's writer-results helper process the safe way (idempotent; call before the first save).

    The stop signals are blocked in this process while the helper starts, so the helper inherits them
    blocked (no window in which a group signal could kill it) and this process still receives them, after.
    """
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_detach_from_stop_signals, initargs=(os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _manager = manager
    filesystem_async._results_queue = manager.Queue()
