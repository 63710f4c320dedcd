"""Greedy decoding: Megatron (KV cache, chunked prefill, TP=2) gives the tokens transformers gives."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_focusft import runtime
from megatron_focusft.analysis.generate import hf_greedy, load_generation_model, megatron_greedy
from megatron_focusft.convert.pipeline import hf_to_megatron, megatron_to_hf
from megatron_focusft.models.qwen2 import tiny_arch
from megatron_focusft.models.random_hf import make_random_hf_checkpoint
from tests.distributed import run_distributed

ARCH = tiny_arch(num_layers=2)
PROMPT = torch.randint(0, ARCH.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
NEW = 24


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    hf = make_random_hf_checkpoint(ARCH, root / "hf", seed=5)
    runtime.initialize("cpu")
    try:
        hf_to_megatron(hf, root / "megatron", torch.float32, progress=False)
        megatron_to_hf(root / "megatron", root / "export", progress=False)
    finally:
        runtime.destroy()
    return root / "megatron", root / "export"


def _megatron_tokens(ckpt, chunks):
    model, arch = load_generation_model(ckpt)
    return [megatron_greedy(model, PROMPT, NEW, arch.vocab_size, prefill_chunk=c) for c in chunks]


def test_megatron_kv_cache_decoding_equals_exported_hf_model(checkpoints, megatron_cpu):
    from transformers import AutoModelForCausalLM

    ckpt, export = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    want = hf_greedy(hf, PROMPT, NEW)
    assert len(want) == NEW and len(set(want)) > 3  # a non-degenerate continuation
    for got in _megatron_tokens(ckpt, [None, 8, 1]):  # whole prompt, chunks of 8, token by token
        assert got == want
    # and a full recompute per token (no cache) agrees too
    model, arch = load_generation_model(ckpt)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)
            ids.append(int(logits[0, -1, : arch.vocab_size].argmax()))
    assert ids[len(PROMPT) :] == want


def test_hf_greedy_ignores_the_folders_generation_config(checkpoints, megatron_cpu, tmp_path):
    """A generation_config.json with sampling and a repetition penalty (as Qwen2.5-Instruct ships) must not
    change hf_greedy: it still equals the Megatron greedy decode and a plain argmax loop."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    ckpt, export = checkpoints
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    cfg = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    cfg.update(max_new_tokens=3, bos_token_id=0, eos_token_id=[1])
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert hf.generation_config.repetition_penalty == 1.05  # the folder's config is loaded
    want = _megatron_tokens(ckpt, [None])[0]
    torch.manual_seed(0)
    assert hf_greedy(hf, PROMPT, NEW) == want
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(NEW):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(PROMPT) :] == want


def test_eos_stops_decoding(checkpoints, megatron_cpu):
    ckpt, _ = checkpoints
    model, arch = load_generation_model(ckpt)
    full = megatron_greedy(model, PROMPT, NEW, arch.vocab_size)
    stop = full[5]
    got = megatron_greedy(model, PROMPT, NEW, arch.vocab_size, eos_ids=[stop])
    assert got == full[: full.index(stop) + 1]


@pytest.mark.slow
def test_tp2_decoding_equals_tp1(checkpoints, megatron_cpu):
    ckpt, _ = checkpoints
    want = _megatron_tokens(ckpt, [None])[0]
    got = run_distributed(_megatron_tokens, world_size=2, tp=2, args=(ckpt, [None, 8]))
    assert got == [want, want]


@pytest.mark.parametrize("sq,sk,hq,hk", [(5, 13, 4, 2), (1, 9, 6, 2), (7, 7, 4, 4), (3, 11, 4, 1)])
def test_lower_right_causal_attention_is_mask_free_and_exact(sq, sk, hq, hk, monkeypatch):
    """The cached-prefill attention equals a float64 softmax with an explicit bottom-right causal mask, and
    never hands SDPA a tensor mask (the math backend's S_chunk x S x heads fp32 scores) or, with a mask,
    enable_gqa."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import CausalBias

    from megatron_focusft.analysis import generate as G

    g = torch.Generator().manual_seed(sq * 100 + sk)
    q, k, v = (torch.randn(2, h, s, 8, generator=g) for h, s in ((hq, sq), (hk, sk), (hk, sk)))
    seen = []

    def spy(*args, **kwargs):
        seen.append((type(kwargs.get("attn_mask")), kwargs.get("enable_gqa", False)))
        return F.scaled_dot_product_attention(*args, **kwargs)

    # generate.py's own F only (torch.nn.functional stays intact for CausalBias's dispatch)
    monkeypatch.setattr(G, "F", types.SimpleNamespace(scaled_dot_product_attention=spy))
    got = G.lower_right_causal_attention(q, k, v, scale=0.3)
    # a prefill chunk: the bias object, no GQA; a decode step (one query): no mask at all
    assert seen == [(CausalBias, False)] if sq > 1 else seen == [(type(None), hq != hk)]

    kk, vv = (t.double().repeat_interleave(hq // hk, dim=1) for t in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2)) * 0.3
    keep = torch.tensor([[j <= (sk - sq) + i for j in range(sk)] for i in range(sq)])
    want = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ vv
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_prompt_beyond_max_position_embeddings_is_an_error(checkpoints, megatron_cpu):
    from transformers import AutoModelForCausalLM

    ckpt, export = checkpoints
    model, arch = load_generation_model(ckpt)
    limit = arch.max_position_embeddings
    long_prompt = [1] * (limit - NEW + 1)
    with pytest.raises(ValueError, match=rf"exceed the model's max_position_embeddings \({limit}\)"):
        megatron_greedy(model, long_prompt, NEW, arch.vocab_size)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        megatron_greedy(model, PROMPT, NEW, arch.vocab_size, max_positions=len(PROMPT) + NEW - 1)
    assert len(megatron_greedy(model, PROMPT, NEW, arch.vocab_size, max_positions=len(PROMPT) + NEW)) == NEW
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match=rf"max_position_embeddings \({hf.config.max_position_embeddings}\)"):
        hf_greedy(hf, [1] * (hf.config.max_position_embeddings - 1), 2)
