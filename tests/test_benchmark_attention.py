"""Smoke test of tools/benchmark_attention.py on CPU with a tiny length."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "benchmark_attention.py"


def test_benchmark_tool_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_attention", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(
        "--device cpu --dtype fp32 --lengths 256 --backend flex,sdpa,dense --heads 4 --kv-heads 2 "
        "--head-dim 16 --warmup 1 --iters 1".split()
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| 256 | flex | glm |" in out and "| 256 | sdpa | causal |" in out
    assert "glm / causal time" in out and "flex causal / sdpa causal time" in out
