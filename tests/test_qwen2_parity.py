"""Megatron-Core Qwen2 vs ``transformers`` Qwen2 on the same random weights (fp32).

Required: max |logit diff| <= 1e-4 x max |logit| and identical argmax, at TP=1 and TP=2 (with and without
sequence parallelism), tied and untied, GQA ratios 1, 3, 7, a vocabulary that Megatron pads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_focusft.models.random_hf import make_random_hf_checkpoint
from tests.distributed import run_distributed
from tests.models import PARITY_CASES, gqa_arch


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(tokens).logits


def _megatron_logits(hf_dir: Path, tokens: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    from megatron_focusft.attention.dense import DenseAttention
    from megatron_focusft.convert.hf_io import HFCheckpointReader
    from megatron_focusft.convert.megatron_io import fill_from_hf
    from megatron_focusft.convert.pipeline import megatron_logits
    from megatron_focusft.models.qwen2 import Qwen2Arch, build_model

    arch = Qwen2Arch.from_hf_dir(hf_dir)
    model = build_model(arch, DenseAttention, sequence_parallel=sequence_parallel, perform_initialization=False)
    fill_from_hf(model, HFCheckpointReader(hf_dir, arch), torch.float32, progress=False)
    with torch.no_grad():
        return megatron_logits(model.eval(), tokens, arch.vocab_size)


def _megatron_logits_all(cases: list[tuple[Path, torch.Tensor]], sequence_parallel: bool) -> list[torch.Tensor]:
    return [_megatron_logits(d, t, sequence_parallel) for d, t in cases]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[tuple[Path, torch.Tensor, torch.Tensor]]:
    """(HF folder, tokens, HF logits) per parity case; sequence length 24 is a multiple of TP=2 for SP."""
    out = []
    for i, (ratio, tied) in enumerate(PARITY_CASES):
        arch = gqa_arch(ratio, tied)
        assert arch.padded_vocab_size > arch.vocab_size  # the padding path is exercised
        hf_dir = make_random_hf_checkpoint(arch, tmp_path_factory.mktemp(f"hf{i}"), seed=i)
        tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(i))
        out.append((hf_dir, tokens, _hf_logits(hf_dir, tokens)))
    return out


def _assert_parity(ours: torch.Tensor, ref: torch.Tensor, case: object) -> None:
    assert ours.shape == ref.shape, case
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * ref.abs().max().item(), f"{case}: max |diff| {diff:.3e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), case


def test_tp1_matches_transformers(checkpoints, megatron_cpu):
    for case, (hf_dir, tokens, ref) in zip(PARITY_CASES, checkpoints):
        _assert_parity(_megatron_logits(hf_dir, tokens, sequence_parallel=False), ref, case)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_matches_transformers(checkpoints, sequence_parallel):
    cases = [(d, t) for d, t, _ in checkpoints]
    results = run_distributed(_megatron_logits_all, world_size=2, tp=2, args=(cases, sequence_parallel))
    for case, ours, (_, _, ref) in zip(PARITY_CASES, results, checkpoints):
        _assert_parity(ours, ref, (case, "sp" if sequence_parallel else "no sp"))
