"""The bilevel step's behaviour on its own: the inner loop adapts, base weights stay put, bad settings."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.bilevel import BilevelStep
from megatron_focusft.config import FocuSFTConfig, FocuSFTConfigError
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.models.focusft import build_focusft_model
from megatron_focusft.models.qwen2 import tiny_arch


def _pack() -> PackedInput:
    g = torch.Generator().manual_seed(3)
    docs = []
    for blocks in ([(0, 12), (1, 6), (0, 8), (1, 6)], [(0, 16), (1, 10)]):
        lm = torch.cat([torch.full((n,), v) for v, n in blocks])
        docs.append((torch.randint(0, 200, (lm.numel(),), generator=g), lm))
    return PackedInput.from_documents(docs, pad_to=64)


def _model_and_step(cfg: FocuSFTConfig):
    model = build_focusft_model(tiny_arch(vocab_size=256), cfg)
    return model, BilevelStep(model, cfg)


def test_inner_loop_lowers_every_documents_loss_and_leaves_base_weights_alone(megatron_cpu):
    model, sft = _model_and_step(FocuSFTConfig(inner_steps=0, attention_backend="dense"))
    pack = _pack()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(8):  # a few plain SFT steps, so the model is no longer random
        sgd.zero_grad()
        sft(pack, loss_scale=0.5)
        sgd.step()

    bilevel = BilevelStep(model, FocuSFTConfig(inner_steps=2, attention_backend="dense"))
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    names = set(before)
    model.zero_grad()
    stats = bilevel(pack, loss_scale=0.5)
    l0, l1 = stats.inner_losses
    assert bool((l1 < l0).all()) and bool((stats.document_losses < l1).all()), (l0, l1, stats.document_losses)
    # The step computes gradients; it never changes a base weight, and fast weights are nowhere in the model.
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(after) == names and all(torch.equal(before[k], after[k]) for k in names)
    assert all(p.grad is not None for p in model.parameters())
    assert model.slot.active is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lora_rank": 65}, "--focusft-lora-rank 65 is larger than the FFN's width"),
        ({"layer_fraction": 0.0}, "--focusft-layer-fraction must be in \\(0, 1\\]"),
        ({"layer_fraction": 1.5}, "--focusft-layer-fraction must be in \\(0, 1\\]"),
        ({"inner_steps": -1}, "--focusft-inner-steps must be >= 0"),
        ({"lora_alpha": 0.0}, "--focusft-lora-alpha must be > 0"),
        ({"attention_backend": "te"}, "--attention-backend te cannot run --attention-mask glm"),
        (
            {"attention_backend": "te", "attention_mask": "causal", "recompute": "selective"},
            "with --attention-backend te use --recompute-granularity full",
        ),
    ],
)
def test_bad_configuration_is_a_clear_error(changes, message):
    cfg = FocuSFTConfig(**changes)
    with pytest.raises(FocuSFTConfigError, match=message):
        cfg.validate(hidden_size=64, ffn_hidden_size=160)


def test_a_step_whose_config_disagrees_with_the_built_model_is_refused(megatron_cpu):
    """The model fixes its backend, recompute and fast layers at build time (layer specs); the step's
    config may change only the algorithm (mask, inner loop, reduction)."""
    model = build_focusft_model(tiny_arch(vocab_size=256), FocuSFTConfig(attention_backend="dense"))
    BilevelStep(model, FocuSFTConfig(attention_backend="dense", attention_mask="causal", bilevel=False))
    with pytest.raises(FocuSFTConfigError, match="built with recompute=None, the step asks for 'selective'"):
        BilevelStep(model, FocuSFTConfig(attention_backend="dense", recompute="selective"))
    with pytest.raises(FocuSFTConfigError, match="built with fast_layers=\\(2, 3\\)"):
        BilevelStep(model, FocuSFTConfig(attention_backend="dense", layer_fraction=0.75))
    selective = build_focusft_model(
        tiny_arch(vocab_size=256), FocuSFTConfig(attention_backend="dense", recompute="selective")
    )
    assert all(layer.self_attention.core_attention.recompute for layer in selective.decoder.layers)
    assert not any(layer.self_attention.core_attention.recompute for layer in model.decoder.layers)


def test_fast_layers_are_the_top_35_percent():
    assert list(FocuSFTConfig().fast_layers(28)) == list(range(18, 28))
