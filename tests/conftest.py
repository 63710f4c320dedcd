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


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    """(a tiny pretrained checkpoint, a packed dataset of 40 documents), once per test module."""
    from tests.training_fixtures import tiny_dataset, tiny_pretrained

    root = tmp_path_factory.mktemp("train")
    return tiny_pretrained(root), tiny_dataset(root / "data" / "train", num_docs=40)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
