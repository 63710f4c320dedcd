"""Run a test body in N gloo processes (Megatron's parallel state on CPU) and collect rank 0's result.

Usage (``fn`` must be a module-level function so that it pickles)::

    result = run_distributed(fn, world_size=2, tp=2, args=(...))

``fn(*args)`` runs on every rank after :func:`megatron_focusft.runtime.initialize`; rank 0's return value
comes back (a tensor, dict, ...); an exception on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tp: int, cp: int, fn: Callable, args: tuple, out: str):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from megatron_focusft import runtime

    try:
        runtime.initialize("cpu", runtime.ParallelLayout(tp, cp))
        result = fn(*args)
        if rank == 0:
            torch.save({"ok": True, "result": result}, out)
    except BaseException:
        torch.save({"ok": False, "error": f"rank {rank}:\n{traceback.format_exc()}"}, out + f".err{rank}")
        raise
    finally:
        runtime.destroy()


def run_distributed(fn: Callable, world_size: int = 2, tp: int = 1, cp: int = 1, args: tuple = ()) -> Any:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        try:
            mp.start_processes(
                _worker,
                args=(world_size, _free_port(), tp, cp, fn, args, out),
                nprocs=world_size,
                start_method="spawn",
            )
        except mp.ProcessRaisedException:
            errs = [f for f in os.listdir(d) if ".err" in f]
            msgs = [torch.load(os.path.join(d, f), weights_only=False)["error"] for f in sorted(errs)]
            raise AssertionError("\n".join(msgs) or "a worker failed") from None
        return torch.load(out, weights_only=False)["result"]
