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


def _config(k: int, mode: str, reduction: str = "sample") -> FocuSFTConfig:
    return FocuSFTConfig(
        inner_steps=k,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        attention_mask=mode,
        attention_backend="dense",
        loss_reduction=reduction,
        inner_grad_clip=0.05,  # small enough that the per-tensor clip is active
        inner_lr=1.0,
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
    return out.grads, out.loss


def _megatron_grads(hf_dir: Path, cfgs: list[FocuSFTConfig], sequence_parallel: bool, padding: int = 4) -> list[dict]:
    """Run one bilevel step per config; return full (unsharded) HF-named gradients and the loss."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_focusft.attention import core_attention_class
    from megatron_focusft.bilevel import BilevelStep
    from megatron_focusft.convert.hf_io import HFCheckpointReader
    from megatron_focusft.convert.layout import megatron_sources, to_hf, tp_unshard
    from megatron_focusft.convert.megatron_io import fill_from_hf
    from megatron_focusft.fast_weights import FastWeightSlot, fast_weight_linears
    from megatron_focusft.models.qwen2 import Qwen2Arch, build_model, tp_partition_dim
    from megatron_focusft.packed_input import PackedInput

    arch = Qwen2Arch.from_hf_dir(hf_dir)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    results = []
    for cfg in cfgs:
        slot = FastWeightSlot()
        model = build_model(
            arch,
            core_attention_class(cfg.attention_backend),
            sequence_parallel=sequence_parallel,
            perform_initialization=False,
            mlp_linears_for_layer=fast_weight_linears(slot, cfg.fast_layers(arch.num_layers), cfg.targets),
        )
        fill_from_hf(model, HFCheckpointReader(hf_dir, arch), torch.float32, progress=False)
        step = BilevelStep(model, cfg, slot, arch.vocab_size)
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
            if getattr(p, "sequence_parallel", False) and tp > 1:
                dist.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
            dim = tp_partition_dim(name)
            if dim is not None and tp > 1:
                shards = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(shards, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                g = tp_unshard(name, shards, dim)
            grads.update(zip(sources, to_hf(name, g, arch)))
        results.append({"grads": grads, "loss": stats.outer_loss_sum * scale})
    return results


def _assert_close(ours: dict, ref: dict, loss, ref_loss, case) -> None:
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), case
    for name, r in ref.items():
        if name == "lm_head.weight" and name not in ours:
            continue
        diff = (ours[name] - r).abs().max().item()
        assert diff <= 1e-4 * max(r.abs().max().item(), 1e-8), f"{case} {name}: max |diff| {diff:.3e}"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    # 4 layers: fast weights on layers 2 and 3; GQA 2; vocabulary padded by Megatron.
    return make_random_hf_checkpoint(gqa_arch(2, tied=False), tmp_path_factory.mktemp("hf"), seed=5)


CASES = [(0, "causal"), (0, "glm"), (1, "causal"), (1, "glm"), (2, "causal"), (2, "glm")]


def test_tp1_pack_of_three_equals_oracle(hf_dir, megatron_cpu):
    cfgs = [_config(k, mode) for k, mode in CASES] + [_config(2, "glm", "token")]
    ours = _megatron_grads(hf_dir, cfgs, sequence_parallel=False)
    for cfg, got in zip(cfgs, ours):
        ref, ref_loss = _oracle_grads(hf_dir, cfg)
        _assert_close(
            got["grads"],
            ref,
            got["loss"],
            ref_loss,
            (cfg.inner_steps, cfg.attention_mask, cfg.loss_reduction),
        )


def test_tp2_sequence_parallel_equals_oracle(hf_dir):
    cfgs = [_config(2, "glm"), _config(1, "causal", "token")]
    ours = run_distributed(_megatron_grads, world_size=2, tp=2, args=(hf_dir, cfgs, True))
    for cfg, got in zip(cfgs, ours):
        ref, ref_loss = _oracle_grads(hf_dir, cfg)
        _assert_close(got["grads"], ref, got["loss"], ref_loss, ("tp2-sp", cfg.inner_steps, cfg.attention_mask))


def test_tp2_sequence_parallel_with_a_rank_holding_only_padding(hf_dir):
    """54 real tokens padded to 112: TP rank 1's sequence chunk (56..111) is all padding."""
    cfgs = [_config(2, "glm")]
    ours = run_distributed(_megatron_grads, world_size=2, tp=2, args=(hf_dir, cfgs, True, 58))
    ref, ref_loss = _oracle_grads(hf_dir, cfgs[0])
    _assert_close(ours[0]["grads"], ref, ours[0]["loss"], ref_loss, "tp2-sp, rank 1 all padding")
