"""Run a test body in N gloo processes (Megatron's parallel state on CPU) and get rank 0's result.

``fn`` must be a module-level function (it is pickled into spawned processes)::

    result = run_distributed(fn, world_size=2, tp=2, args=(...))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_focusft.runtime import ParallelLayout, launch_cpu_processes


def run_distributed(fn: Callable, world_size: int = 2, tp: int = 1, cp: int = 1, args: tuple = ()) -> Any:
    return launch_cpu_processes(fn, world_size, ParallelLayout(tp, cp), args)
