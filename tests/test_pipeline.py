"""Pipeline parallelism through Megatron's schedules: every layout's step equals the single-stage step.

One SGD step (lr 1, fp32) of FocuSFT (glm, K=2) on two micro-batches moves every weight by minus the
gradient; the exported weights of each PP layout are compared with PP=1's.  The tiny model has 4 layers
(fast layers 2 and 3) with tied embeddings, so the last stage's copy of the embedding is exercised; the
uneven split 3 + 1 puts fast layer 2 on the first stage (the inner loop spans both stages).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_focusft import runtime
from megatron_focusft.training import loop
from tests.training_fixtures import tiny_dataset, tiny_pretrained

SGD_ONE_STEP = [
    "--optimizer", "sgd", "--lr", "1.0", "--weight-decay", "0", "--clip-grad", "0",
    "--lr-warmup-fraction", "0", "--lr-decay-style", "constant", "--train-iters", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tied_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    return tiny_pretrained(root, num_layers=4, tie_word_embeddings=True), tiny_dataset(root / "data", num_docs=30)


def _argv(ckpt: Path, data: str, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu",
        "--focusft-lora-rank", "8", "--focusft-inner-lr", "0.5", "--log-interval", "1",
        "--global-batch-size", "2", "--export-hf", str(out / "hf"), *extra,
    ]  # fmt: skip


def _train(nprocs: int, argv: list[str]) -> dict[str, torch.Tensor]:
    assert runtime.launch_cpu_processes(loop.main, nprocs, args=(argv,)) == 0
    out = Path(argv[argv.index("--export-hf") + 1])
    return load_file(out / "model.safetensors")


def _assert_same_step(start: dict, ref: dict, got: dict, tol: float, label: str) -> None:
    assert set(ref) == set(got), label
    for k in sorted(ref):
        delta_ref, delta = start[k] - ref[k], start[k] - got[k]
        assert delta_ref.abs().max() > 0, (label, k)  # every weight moved
        err = ((delta - delta_ref).abs().max() / delta_ref.abs().max()).item()
        assert err <= tol, (label, k, err)


LAYOUTS = {
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2-spanning": (
        2,
        ["--pp", "2", "--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "1"],
    ),
    "pp2-tp2-sp": (4, ["--pp", "2", "--tp", "2", "--sequence-parallel"]),
}


@pytest.mark.parametrize("method", ["focusft", "sft"])
def test_one_step_at_every_pipeline_layout_equals_a_single_stage(tied_files, tmp_path, method):
    ckpt, data = tied_files
    extra = ["--no-bilevel"] if method == "sft" else []
    ref = _train(1, _argv(ckpt, data, tmp_path / "pp1", *SGD_ONE_STEP, *extra))
    start = load_file(ckpt.parent / "hf" / "model.safetensors")
    layouts = LAYOUTS if method == "focusft" else {"pp2": LAYOUTS["pp2"]}
    for name, (nprocs, flags) in layouts.items():
        got = _train(nprocs, _argv(ckpt, data, tmp_path / name, *SGD_ONE_STEP, *extra, *flags))
        _assert_same_step(start, ref, got, 1e-4, f"{method} {name}")
