"""tools/gpu_checks.sh: syntax, and its errors before any work (its parts need a GPU; the train part's
plumbing was run with DEVICE=cpu by hand, see BENCHMARKS.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_checks.sh")


def _run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}  # the script's interpreter is this test's, not PATH's python3
    return subprocess.run(
        ["bash", SCRIPT, *args, str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, env=env
    )


def test_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_unknown_part_is_refused_before_any_work(tmp_path):
    r = _run("everything", tmp_path=tmp_path)
    assert r.returncode == 2 and "unknown part 'everything'" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_no_gpu_is_a_clear_error(tmp_path):
    r = _run("step", tmp_path=tmp_path)
    assert r.returncode != 0 and "no CUDA device" in r.stderr
