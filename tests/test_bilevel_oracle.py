"""The Megatron bilevel step vs the plain-PyTorch oracle of the paper's algorithm (tests/oracle), fp32.

One pack of three documents through Megatron (per-document fast weights, packed THD, dense backend) must
give the base-weight gradients of three oracle runs (HF Qwen2, batch 1, dense 4D mask, hand-written LoRA)
combined with the same reduction, within 1e-4 relative per tensor: K = 0, 1, 2; causal and glm; TP=1 and
TP=2 with sequence parallelism.  The fast weights' random A is drawn by the same keyed function on both
sides, so the comparison is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_focusft.config import FocuSFTConfig
from megatron_focusft.models.random_hf import make_random_hf_checkpoint
from tests.distributed import run_distributed
from tests.models import gqa_arch
from tests.oracle.focusft_oracle import fast_layer_indices, oracle_step_many

RANK, ALPHA, ITERATION, PACK = 8, 16.0, 7, 3
HF_TARGET = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _documents() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three multi-turn documents: context / response blocks of different lengths."""
    g = torch.Generator().manual_seed(11)
    patterns = [
        [(0, 6), (1, 4), (0, 5), (1, 5)],
        [(0, 9), (1, 7)],
        [(0, 3), (1, 2), (0, 4), (1, 3), (0, 2), (1, 4)],
    ]
    docs = []
    for blocks in patterns:
        lm = torch.cat([torch.full((n,), v, dtype=torch.long) for v, n in blocks])
        docs.append((torch.randint(0, 999, (lm.numel(),), generator=g), lm))
    return docs


def _config(k: int, mode: str, reduction: str = "sample", clip: float = 0.05, lr: float = 1.0) -> FocuSFTConfig:
    """``clip``: on this model B's gradient norms are 0.065-0.107 and A's (second step) below 0.01, so 0.05
    clips every B (only its gradient's direction matters), 1.0 clips nothing (sizes matter) and 0.08 some."""
    return FocuSFTConfig(
        inner_steps=k,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        attention_mask=mode,
        attention_backend="dense",
        loss_reduction=reduction,
        inner_grad_clip=clip,
        inner_lr=lr,
    )


def _oracle_grads(hf_dir: Path, cfg: FocuSFTConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from megatron_focusft.fast_weights import TARGET_IDS, draw_lora_a

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    layers = model.model.layers
    samples = []
    for d, (ids, lm) in enumerate(_documents()):
        a0 = {}
        for i in fast_layer_indices(len(layers), cfg.layer_fraction):
            for t in ("gate", "up", "down"):
                fan_in = getattr(layers[i].mlp, HF_TARGET[t]).in_features
                keys = (cfg.seed, ITERATION, PACK, d, i, TARGET_IDS[t])
                a0[i, HF_TARGET[t]] = draw_lora_a(keys, RANK, fan_in, torch.device("cpu"))
        samples.append({"input_ids": ids, "loss_mask": lm, "A0": a0})
    out = oracle_step_many(
        model,
        samples,
        cfg.loss_reduction,
        mode=cfg.attention_mask,
        inner_steps=cfg.inner_steps,
        inner_lr=cfg.inner_lr,
        inner_grad_clip=cfg.inner_grad_clip,
        rank=RANK,
        alpha=ALPHA,
        layer_fraction=cfg.layer_fraction,
    )
    return out.grads, out.loss, [r.fast_weights for r in out.per_sample]


def _megatron_grads(hf_dir: Path, cfgs: list[FocuSFTConfig], sequence_parallel: bool, padding: int = 4) -> list[dict]:
    """Run one bilevel step per config; return full (unsharded) HF-named gradients, the loss and the
    adapted fast weights (full tensors, per document)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_focusft.bilevel import BilevelStep
    from megatron_focusft.convert.hf_io import HFCheckpointReader
    from megatron_focusft.convert.layout import megatron_sources, to_hf, tp_unshard
    from megatron_focusft.convert.megatron_io import fill_from_hf
    from megatron_focusft.data.packed_input import PackedInput
    from megatron_focusft.models.focusft import build_focusft_model
    from megatron_focusft.models.qwen2 import Qwen2Arch, tp_partition_dim

    arch = Qwen2Arch.from_hf_dir(hf_dir)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
        if tp == 1:
            return t
        shards = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(shards, t.contiguous(), group=tp_group)
        return torch.cat(shards, dim=dim)

    results = []
    for cfg in cfgs:
        model = build_focusft_model(arch, cfg, sequence_parallel=sequence_parallel, perform_initialization=False)
        fill_from_hf(model, HFCheckpointReader(hf_dir, arch), torch.float32, progress=False)
        step = BilevelStep(model, cfg)
        docs = _documents()
        total = sum(d[0].numel() for d in docs)
        inp = PackedInput.from_documents(docs, pad_to=total + padding, pack_index=PACK)  # padding tail too
        scale = 1 / 3 if cfg.loss_reduction == "sample" else 1 / int(inp.label_mask.sum())
        stats = step(inp, loss_scale=scale, iteration=ITERATION)
        params = dict(model.named_parameters())
        grads = {}
        for name, sources in megatron_sources(arch):
            p = params[name]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if parallel_state.get_context_parallel_world_size() > 1:  # what DDP does over DP x CP
                dist.all_reduce(g, group=parallel_state.get_context_parallel_group())
            if getattr(p, "sequence_parallel", False) and tp > 1:
                dist.all_reduce(g, group=tp_group)
            dim = tp_partition_dim(name)
            if dim is not None and tp > 1:
                shards = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(shards, g.contiguous(), group=tp_group)
                g = tp_unshard(name, shards, dim)
            grads.update(zip(sources, to_hf(name, g, arch)))
        adapted = {}
        if stats.adapted is not None:
            for (layer, target), a in stats.adapted.a.items():
                b = stats.adapted.b[layer, target]
                a, b = (gather_tp(a, 2), b) if target == "down" else (a, gather_tp(b, 1))
                adapted[layer, HF_TARGET[target]] = (a, b)
        results.append({"grads": grads, "loss": stats.outer_loss_sum * scale, "adapted": adapted})
    return results


def _assert_close(ours: dict, ref: tuple, case) -> None:
    """Loss, base-weight gradients and (K > 0) every document's adapted fast weights equal the oracle's."""
    ref_grads, ref_loss, ref_fast = ref
    assert abs(float(ours["loss"]) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), case
    for key, (a, b) in ours["adapted"].items():
        for d, fast in enumerate(ref_fast):
            for got, want in zip((a[d], b[d]), fast[key]):
                err = (got - want).abs().max().item()
                assert err <= 1e-4 * max(want.abs().max().item(), 1e-8), f"{case} fast weight {key} doc {d}: {err:.3e}"
    _assert_grads_close(ours["grads"], ref_grads, case)


def _assert_grads_close(ours: dict, ref: dict, case) -> None:
    for name, r in ref.items():
        if name == "lm_head.weight" and name not in ours:
            continue
        diff = (ours[name] - r).abs().max().item()
        assert diff <= 1e-4 * max(r.abs().max().item(), 1e-8), f"{case} {name}: max |diff| {diff:.3e}"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    # 3 layers: fast weights on layers 1 and 2; GQA 2; vocabulary padded by Megatron.
    return make_random_hf_checkpoint(gqa_arch(2, tied=False), tmp_path_factory.mktemp("hf"), seed=5)


CASES = [(0, "causal"), (0, "glm"), (1, "causal"), (1, "glm"), (2, "causal"), (2, "glm")]


def test_tp1_pack_of_three_equals_oracle(hf_dir, megatron_cpu):
    import dataclasses

    cfgs = [_config(k, mode) for k, mode in CASES] + [_config(2, "glm", "token")]
    cfgs += [_config(2, "glm", clip=1.0, lr=0.5), _config(2, "causal", clip=0.08, lr=0.5)]
    # Activation recompute and a chunked loss (7 response positions at a time) change no number.
    cfgs += [dataclasses.replace(_config(2, "glm"), recompute=r, loss_chunk_tokens=7) for r in ("selective", "full")]
    ours = _megatron_grads(hf_dir, cfgs, sequence_parallel=False)
    for cfg, got in zip(cfgs, ours):
        case = (cfg.inner_steps, cfg.attention_mask, cfg.loss_reduction, cfg.inner_grad_clip, cfg.inner_lr)
        _assert_close(got, _oracle_grads(hf_dir, cfg), case)


@pytest.mark.parametrize(
    "world, tp, cp, padding",
    [
        (2, 2, 1, 4),  # TP=2 + sequence parallelism
        (2, 2, 1, 58),  # 54 real tokens padded to 112: TP rank 1's sequence chunk (56..111) is all padding
        (2, 1, 2, 2),  # CP=2: 56 tokens in 4 chunks, rank 0 holds chunks 0 and 3
        (4, 2, 2, 2),  # TP=2 + SP x CP=2 on 4 processes
    ],
    ids=["tp2-sp", "tp2-sp-padding-rank", "cp2", "tp2-sp-cp2"],
)
def test_parallel_layouts_equal_oracle(hf_dir, world, tp, cp, padding):
    cfgs = [_config(2, "glm"), _config(1, "causal", "token"), _config(2, "glm", clip=1.0, lr=0.5)]
    ours = run_distributed(_megatron_grads, world_size=world, tp=tp, cp=cp, args=(hf_dir, cfgs, tp > 1, padding))
    for cfg, got in zip(cfgs, ours):
        case = (world, tp, cp, cfg.inner_steps, cfg.attention_mask, cfg.inner_grad_clip)
        _assert_close(got, _oracle_grads(hf_dir, cfg), case)
