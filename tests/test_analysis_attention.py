"""Attention statistics from the Megatron model (chunked ProbeAttention) against brute force from
``transformers`` eager attention, TP=2 against TP=1, and ProbeAttention's output against DenseAttention."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from megatron_focusft import attention, runtime
from megatron_focusft.analysis.analyze import Sample, analyze, fold_tokens, load_probe_model
from megatron_focusft.analysis.attention_stats import (
    CATEGORIES,
    ROLE_ASSISTANT,
    ROLE_SYSTEM_USER,
    ROLE_TOOL,
    key_categories,
    position_bins,
    token_roles,
)
from megatron_focusft.analysis.capture import AttentionProbe
from megatron_focusft.convert.pipeline import hf_to_megatron
from megatron_focusft.data import ChatEncoder, load_tokenizer
from megatron_focusft.models.qwen2 import tiny_arch
from megatron_focusft.models.random_hf import make_random_hf_checkpoint
from tests.distributed import run_distributed

QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", "/work/shared/qwen2-tokenizer")
ARCH = tiny_arch(num_layers=3)
BINS = 8

CONVERSATION = {
    "tools": [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "system", "content": "You answer questions about the weather."},
        {"role": "user", "content": "Is it raining in Paris right now? And in Rome?"},
        {"role": "assistant", "tool_calls": [{"name": "search", "arguments": {"q": "rain Paris"}}]},
        {"role": "tool", "content": "Paris: light rain, 12 C, wind from the west."},
        {"role": "tool", "content": "Rome: sunny, 21 C."},
        {"role": "assistant", "content": "It is raining lightly in Paris; Rome is sunny."},
        {"role": "user", "content": "Thanks. Umbrella?"},
        {"role": "assistant", "content": "Yes, take one in Paris."},
    ],
}


@functools.lru_cache(maxsize=1)
def qwen_tokenizer():
    return load_tokenizer(QWEN2_DIR, added_tokens="qwen2.5")


@functools.lru_cache(maxsize=1)
def make_sample() -> Sample:
    tok = qwen_tokenizer()
    doc = ChatEncoder(tok, renderer="qwen2.5").encode(CONVERSATION)
    return Sample(doc.input_ids, doc.loss_mask, token_roles(doc.input_ids, tok))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    hf = make_random_hf_checkpoint(ARCH, root / "hf", seed=3)
    runtime.initialize("cpu")
    try:
        hf_to_megatron(hf, root / "megatron", torch.float32, progress=False)
    finally:
        runtime.destroy()
    return hf, root / "megatron"


def test_token_roles_follow_the_turns():
    tok = qwen_tokenizer()
    sample = make_sample()
    roles = sample.roles
    text_of = {r: tok.decode(sample.input_ids[roles == r]) for r in (ROLE_SYSTEM_USER, ROLE_TOOL, ROLE_ASSISTANT)}
    assert "weather" in text_of[ROLE_SYSTEM_USER] and "Umbrella" in text_of[ROLE_SYSTEM_USER]
    assert "light rain" in text_of[ROLE_TOOL] and "Rome: sunny" in text_of[ROLE_TOOL]
    assert "Paris" not in text_of[ROLE_SYSTEM_USER].split("Umbrella")[1]
    assert "take one" in text_of[ROLE_ASSISTANT] and "light rain" not in text_of[ROLE_ASSISTANT]
    assert np.all(roles[sample.loss_mask == 1] == ROLE_ASSISTANT)


def brute_force(attentions, roles, loss_mask):
    """Plain loops over layers, heads and response queries on full [heads, s, s] attention maps."""
    s = roles.shape[0]
    cats, bins = key_categories(torch.as_tensor(roles)), position_bins(s, BINS)
    queries = [q for q in range(s) if loss_mask[q]]
    category = np.zeros((len(attentions), len(CATEGORIES)))
    profile = np.zeros((len(attentions), BINS))
    for layer, att in enumerate(attentions):
        att = att[0].double()
        for h in range(att.shape[0]):
            for q in queries:
                for c in range(len(CATEGORIES)):
                    category[layer, c] += att[h, q][cats == c].sum().item()
                for j in range(BINS):
                    profile[layer, j] += att[h, q][bins == j].sum().item()
        category[layer] /= att.shape[0] * len(queries)
        profile[layer] /= att.shape[0] * len(queries)
    return category, profile


def _analyze(ckpt, sample, mode, chunk_elements):
    model, arch = load_probe_model(ckpt)
    stats = analyze(
        model, [sample], mode, vocab_size=arch.vocab_size, bins=BINS, chunk_elements=chunk_elements, fold_vocab=True
    )
    return stats.category, stats.profile, stats.heatmap


def test_sink_mass_and_engagement_equal_brute_force_from_transformers(checkpoints, megatron_cpu):
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = checkpoints
    sample = make_sample()
    # small chunks: many query chunks per layer
    category, profile, heat = _analyze(ckpt, sample, "causal", chunk_elements=4 * 150 * 16)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = hf(fold_tokens(sample.input_ids, ARCH.vocab_size, fold=True), output_attentions=True)
    want_cat, want_prof = brute_force(out.attentions, sample.roles, sample.loss_mask)
    assert category.shape == (ARCH.num_layers, len(CATEGORIES))
    np.testing.assert_allclose(category, want_cat, atol=1e-5, rtol=0)
    np.testing.assert_allclose(profile, want_prof, atol=1e-5, rtol=0)
    np.testing.assert_allclose(category.sum(1), 1.0, atol=1e-6)
    # the heatmap of the middle layer: rows are query bins, mass sums to 1 over keys
    layer = ARCH.num_layers // 2
    s = len(sample.input_ids)
    assert heat.shape == (min(128, s), min(128, s))
    full = out.attentions[layer][0].double().mean(0)
    np.testing.assert_allclose(heat.sum(1), 1.0, atol=1e-6)
    grid = position_bins(s, heat.shape[0])
    row0 = full[grid == 0].sum(0)  # the queries of the first bin, keys summed per bin
    want_row0 = torch.zeros(heat.shape[1], dtype=torch.float64).index_add_(0, grid, row0) / (grid == 0).sum()
    np.testing.assert_allclose(heat[0], want_row0.numpy(), atol=1e-6)


def _tp_worker(ckpt, sample):
    return {mode: _analyze(ckpt, sample, mode, chunk_elements=2 * 100 * 16) for mode in ("causal", "glm")}


@pytest.mark.slow
def test_tp2_equals_tp1(checkpoints, megatron_cpu):
    _, ckpt = checkpoints
    sample = make_sample()
    tp2 = run_distributed(_tp_worker, world_size=2, tp=2, args=(ckpt, sample))
    for mode in ("causal", "glm"):
        cat1, prof1, heat1 = _analyze(ckpt, sample, mode, chunk_elements=None)
        cat2, prof2, heat2 = tp2[mode]
        np.testing.assert_allclose(cat2, cat1, atol=1e-6)
        np.testing.assert_allclose(prof2, prof1, atol=1e-6)
        np.testing.assert_allclose(heat2, heat1, atol=1e-6)
        if mode == "glm":  # loaded with glm, the first 5 tokens are no longer the only global keys
            assert not np.allclose(cat1, _analyze(ckpt, sample, "causal", None)[0])


@pytest.mark.parametrize("mode", ["causal", "glm"])
def test_probe_attention_output_equals_dense_attention(checkpoints, megatron_cpu, mode):
    from megatron_focusft.analysis.capture import decoder_hidden_states
    from megatron_focusft.attention.dense import DenseAttention
    from megatron_focusft.convert.megatron_io import load_model
    from megatron_focusft.models.qwen2 import build_model

    _, ckpt = checkpoints
    sample = make_sample()
    probe_model, _ = load_probe_model(ckpt)
    dense = build_model(ARCH, DenseAttention, perform_initialization=False)
    load_model(dense, ckpt)
    tokens = fold_tokens(sample.input_ids, ARCH.vocab_size, fold=True)
    lm = torch.as_tensor(sample.loss_mask).long()
    docs = torch.zeros_like(lm)
    with torch.no_grad():
        probe = AttentionProbe(torch.as_tensor(sample.roles), lm, mode, chunk_elements=1000)
        got = decoder_hidden_states(probe_model, tokens, probe)
        want = decoder_hidden_states(dense.eval(), tokens, attention.build_attention_mask("dense", docs, lm, mode))
        # and the ordinary (mask) path of ProbeAttention is DenseAttention itself
        same = decoder_hidden_states(probe_model, tokens, attention.build_attention_mask("dense", docs, lm, mode))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(same, want)


def test_probe_converts_values_once_per_layer(checkpoints, megatron_cpu):
    """bf16 weights, many query chunks: V is converted to fp32 once per layer, not once per chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_focusft.analysis.capture import decoder_hidden_states

    _, ckpt = checkpoints
    sample = make_sample()
    model, _ = load_probe_model(ckpt, torch.bfloat16)
    tokens = fold_tokens(sample.input_ids, ARCH.vocab_size, fold=True)
    s, heads = tokens.shape[1], ARCH.num_attention_heads
    probe = AttentionProbe(
        torch.as_tensor(sample.roles), torch.as_tensor(sample.loss_mask), "causal", chunk_elements=heads * s * 16
    )
    assert s / probe.chunk_rows(heads) > 4  # several chunks per layer
    full_v = (heads, s, ARCH.hidden_size // heads)

    class CountV(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            x = args[0] if args else None
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and isinstance(x, torch.Tensor):
                if x.dtype == torch.bfloat16 and tuple(x.shape) == full_v and kwargs.get("dtype") == torch.float32:
                    CountV.n += 1
            return func(*args, **kwargs)

    with torch.no_grad(), CountV():
        decoder_hidden_states(model, tokens, probe)
    assert CountV.n == ARCH.num_layers
