"""Shared test set-up: single-process Megatron state on CPU, tiny random Qwen2 models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def megatron_cpu():
    """Megatron's parallel state in this process (TP=1, gloo), torn down afterwards."""
    from megatron_focusft import runtime

    runtime.initialize("cpu")
    yield
    runtime.destroy()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
