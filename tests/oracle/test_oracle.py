"""Checks of the FocuSFT oracle (focusft_oracle.py) against independent computations on tiny Qwen2s."""

from __future__ import annotations

import ast
import copy
import pathlib

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.oracle import focusft_oracle as fo

RANK, ALPHA = 8, 16.0
MULTI_TURN = [0] * 6 + [1] * 5 + [0] * 6 + [1] * 7  # context, response, context, response


def tiny_model(seed: int = 0, dtype=torch.float32, tied: bool = False) -> Qwen2ForCausalLM:
    """4 layers (fast layers 2, 3 at fraction 0.35), GQA 4/2, random weights, biases and norm weights."""
    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        vocab_size=1000,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    return model.to(dtype)


def make_sample(seed: int = 0, loss_mask=MULTI_TURN):
    lm = torch.tensor(loss_mask)
    return torch.randint(0, 1000, (len(lm),), generator=torch.Generator().manual_seed(seed)), lm


def draw(model, seed: int = 0):
    return fo.draw_A0(model, RANK, generator=torch.Generator().manual_seed(seed))


def run(model, ids, lm, **kw):
    kw = {"rank": RANK, "alpha": ALPHA, **kw}
    return fo.oracle_step(model, ids, lm, draw(model), **kw)


def assert_grads_close(actual: dict, expected: dict, rtol: float):
    assert actual.keys() == expected.keys()
    for name in expected:
        err = (actual[name] - expected[name]).norm()
        assert err <= rtol * expected[name].norm() + 1e-30, (name, float(err), float(expected[name].norm()))


def labels_for(ids, lm):
    return torch.where(lm.bool(), ids, torch.full_like(ids, -100))


def hf_sft(model, input_ids, labels, attention_mask=None):
    """Plain SFT with the HF model's own loss (labels shifted inside, -100 ignored, mean)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ 1. K=0


@pytest.mark.parametrize("tied", [False, True])
def test_k0_causal_is_plain_sft(tied):
    model = tiny_model(tied=tied)
    ids, lm = make_sample()
    res = run(model, ids, lm, mode="causal", inner_steps=0)
    loss, grads = hf_sft(model, ids[None], labels_for(ids, lm)[None])
    torch.testing.assert_close(res.outer_loss, loss, rtol=1e-6, atol=0)
    assert res.inner_losses == [res.outer_loss.item()] and res.num_tokens == 12
    assert_grads_close(res.grads, grads, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ 2. mask


def brute_force_allowed(loss_mask: list[int], mode: str) -> torch.Tensor:
    S, block = len(loss_mask), [0]
    for t in range(1, S):
        block.append(block[-1] + (loss_mask[t] != loss_mask[t - 1]))
    allowed = torch.zeros(S, S, dtype=torch.bool)
    for q in range(S):
        for k in range(S):
            if mode == "causal":
                allowed[q, k] = k <= q
            elif block[k] < block[q]:
                allowed[q, k] = True
            elif block[k] == block[q]:
                allowed[q, k] = loss_mask[q] == 0 or k <= q
    return allowed


MASKS = [MULTI_TURN, [1, 1, 0, 0, 0, 1, 1, 0, 1], [0] * 7, [1] * 7, [0, 1] * 5]


@pytest.mark.parametrize("mode", ["glm", "causal"])
@pytest.mark.parametrize("loss_mask", MASKS)
def test_mask_matches_brute_force(mode, loss_mask):
    lm = torch.tensor(loss_mask)
    allowed = fo.allowed_attention(lm, mode)
    assert torch.equal(allowed, brute_force_allowed(loss_mask, mode))
    for dtype in (torch.float32, torch.bfloat16):
        add = fo.additive_mask(lm, mode, dtype)
        assert add.shape == (1, 1, len(lm), len(lm)) and add.dtype == dtype
        assert torch.equal(add[0, 0] == 0, allowed)
        assert torch.all(add[0, 0][~allowed] == torch.finfo(dtype).min)


def test_glm_special_cases():
    n = 7
    full = torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(fo.allowed_attention(torch.zeros(n), "glm"), full)  # one context block
    assert torch.equal(fo.allowed_attention(torch.ones(n), "glm"), torch.tril(full))  # one response block
    assert fo.block_ids(torch.tensor(MULTI_TURN)).tolist() == [0] * 6 + [1] * 5 + [2] * 6 + [3] * 7


def logits(model, ids, mask4d=None):
    with torch.no_grad():
        return model(input_ids=ids[None], attention_mask=mask4d, use_cache=False).logits[0]


def test_4d_mask_reaches_eager_attention():
    model = tiny_model()
    ids, lm = make_sample()
    default = logits(model, ids)
    causal = logits(model, ids, fo.additive_mask(lm, "causal", torch.float32))
    torch.testing.assert_close(causal, default, rtol=1e-6, atol=1e-6)
    glm = logits(model, ids, fo.additive_mask(lm, "glm", torch.float32))
    assert not torch.allclose(glm, default, atol=1e-4)  # the custom mask is really applied


def test_glm_mask_through_the_model():
    """Changing a token changes exactly the outputs of the queries allowed to (transitively) see it."""
    model = tiny_model()
    ids, lm = make_sample()
    mask = fo.additive_mask(lm, "glm", torch.float32)
    base = logits(model, ids, mask)
    for pos in (2, 8, 12, 20):  # inside context 0, response 1, context 2, response 3
        changed = ids.clone()
        changed[pos] = (changed[pos] + 1) % 1000
        moved = (logits(model, changed, mask) - base).abs().amax(-1) > 1e-6
        expected = fo.allowed_attention(lm, "glm")[:, pos].clone()
        expected[pos] = True
        assert torch.equal(moved, expected), pos


# ------------------------------------------------------------------------------------------ 3.-5. inner


@pytest.mark.parametrize("mode", ["glm", "causal"])
@pytest.mark.parametrize("seed", [0, 1])
def test_inner_loop_lowers_response_loss(mode, seed):
    model = tiny_model(seed)
    ids, lm = make_sample(seed)
    res = run(model, ids, lm, mode=mode, inner_steps=2, inner_lr=1.0)
    assert len(res.inner_losses) == 3
    assert res.inner_losses[0] > res.inner_losses[1] > res.inner_losses[2]
    assert res.inner_losses[-1] == res.outer_loss.item()


def test_base_weights_untouched_and_only_base_weights_get_grads():
    model = tiny_model()
    ids, lm = make_sample()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    res = run(model, ids, lm, mode="glm", inner_steps=2)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, _ in model.named_parameters()] == names  # no fast weight was registered
    assert all(p.grad is not None for p in model.parameters())
    assert res.grads.keys() == set(names)
    assert all(not m._forward_hooks for m in model.modules())  # LoRA hooks removed
    for A, B in res.fast_weights.values():
        for t in (A, B):
            assert not isinstance(t, torch.nn.Parameter) and not t.requires_grad and t.grad is None


def test_first_inner_step_moves_only_B():
    model = tiny_model()
    ids, lm = make_sample()
    A0 = draw(model)
    assert sorted(A0) == [(i, t) for i in (2, 3) for t in sorted(fo.DEFAULT_TARGETS)]
    one = fo.oracle_step(model, ids, lm, A0, inner_steps=1, rank=RANK, alpha=ALPHA)
    two = fo.oracle_step(model, ids, lm, A0, inner_steps=2, rank=RANK, alpha=ALPHA)
    for key, (A, B) in one.fast_weights.items():
        assert torch.equal(A, A0[key])  # dL/dA = 0 while B = 0
        assert B.abs().max() > 0
        assert not torch.equal(two.fast_weights[key][0], A0[key])  # step 2 moves A as well


@pytest.mark.parametrize("clip", [1.0, 2e-3])
def test_first_inner_step_is_clipped_sgd_on_B(clip):
    """With B = 0, dL/dB = (alpha/r) * dL/dW @ A0^T, with dL/dW the plain SFT gradient (checked via HF)."""
    model = tiny_model()
    ids, lm = make_sample()
    A0 = draw(model)
    lr = 0.5
    res = fo.oracle_step(
        model,
        ids,
        lm,
        A0,
        mode="causal",
        inner_steps=1,
        inner_lr=lr,
        inner_grad_clip=clip,
        rank=RANK,
        alpha=ALPHA,
    )
    _, sft = hf_sft(model, ids[None], labels_for(ids, lm)[None])
    norms = []
    for (i, t), (_, B) in res.fast_weights.items():
        g = ALPHA / RANK * sft[f"model.layers.{i}.mlp.{t}.weight"] @ A0[(i, t)].T
        norms.append(float(g.norm()))
        expected = -lr * g * min(1.0, clip / norms[-1])  # each tensor clipped on its own
        torch.testing.assert_close(B, expected, rtol=1e-4, atol=1e-9)
    if clip < 1.0:
        assert min(norms) < 0.9 * max(norms) and min(norms) > clip  # unequal norms, every tensor clipped


def test_non_finite_inner_loss_skips_the_step():
    model = tiny_model()
    ids, lm = make_sample()
    calls = []

    def poison_first_call(module, args, out):
        calls.append(1)
        return out * float("nan") if len(calls) == 1 else out

    handle = model.lm_head.register_forward_hook(poison_first_call)
    skipped = run(model, ids, lm, inner_steps=2)
    handle.remove()
    plain = run(model, ids, lm, inner_steps=1)
    assert torch.isnan(torch.tensor(skipped.inner_losses[0])) and len(calls) == 3
    for key, (A, B) in plain.fast_weights.items():
        assert torch.equal(skipped.fast_weights[key][0], A) and torch.equal(skipped.fast_weights[key][1], B)
    torch.testing.assert_close(skipped.outer_loss, plain.outer_loss, rtol=0, atol=0)


def test_no_response_tokens_gives_zero_loss_and_zero_grads():
    model = tiny_model()
    ids, _ = make_sample()
    res = run(model, ids, torch.tensor([1] + [0] * 23), inner_steps=2)  # only position 0: never predicted
    assert res.num_tokens == 0 and res.inner_losses == [0.0, 0.0, 0.0]
    assert all(g.abs().max() == 0 for g in res.grads.values())


# ---------------------------------------------------------------------------------------- 6. outer grad


def merged_model(model, fast, scale):
    """A copy with W' = W + scale * B A on every fast target; dL/dW' = dL/dW because B A is constant."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for (i, t), (A, B) in fast.items():
            getattr(merged.model.layers[i].mlp, t).weight += scale * B @ A
    return merged


def merged_loss(merged, ids, lm, mode):
    mask = None if mode == "causal" else fo.additive_mask(lm, mode, torch.float64)  # causal: HF's own
    out = merged(input_ids=ids[None], attention_mask=mask, use_cache=False).logits[0]
    return F.cross_entropy(out[:-1], labels_for(ids, lm)[1:], ignore_index=-100)


@pytest.mark.parametrize("mode", ["causal", "glm"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_outer_gradient_is_first_order(mode, inner_steps):
    model = tiny_model(dtype=torch.float64)
    ids, lm = make_sample()
    res = run(model, ids, lm, mode=mode, inner_steps=inner_steps)
    merged = merged_model(model, res.fast_weights, ALPHA / RANK)
    loss = merged_loss(merged, ids, lm, mode)
    loss.backward()
    torch.testing.assert_close(res.outer_loss, loss.detach(), rtol=1e-12, atol=0)
    assert_grads_close(res.grads, {n: p.grad for n, p in merged.named_parameters()}, rtol=1e-6)

    # and a central finite difference along a random direction, for the weights after the final norm: HF
    # Qwen2 runs RMSNorm and the eager softmax in fp32 even in an fp64 model, which swamps a finite
    # difference of anything upstream (the merged-model autograd check above covers those)
    for name in ("model.norm.weight", "lm_head.weight"):
        p = dict(merged.named_parameters())[name]
        d = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(0))
        eps, fd = 1e-5, []
        with torch.no_grad():
            for sign in (1, -1):
                p.add_(sign * eps * d)
                fd.append(merged_loss(merged, ids, lm, mode))
                p.sub_(sign * eps * d)
        directional = (fd[0] - fd[1]) / (2 * eps)
        torch.testing.assert_close(directional, (res.grads[name] * d).sum(), rtol=1e-6, atol=1e-12)


# -------------------------------------------------------------------------------------------- helpers


def test_clip_per_tensor():
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fo.clip_per_tensor(g, 100.0), g)  # below the threshold: untouched
    assert torch.equal(fo.clip_per_tensor(g, 0.0), g)  # disabled
    clipped = fo.clip_per_tensor(g, 1.0)
    torch.testing.assert_close(clipped.norm(), torch.tensor(1.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(clipped / clipped.norm(), g / g.norm())
    reference = g.clone().requires_grad_()
    reference.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([reference], 1.0)
    torch.testing.assert_close(clipped, reference.grad, rtol=1e-5, atol=0)  # clip_grad_norm_: +1e-6 eps
    zero = torch.zeros(3, 4)
    assert torch.equal(fo.clip_per_tensor(zero, 1.0), zero)


def test_kaiming_uniform_A_and_layer_selection():
    A = fo.kaiming_uniform_A((32, 160), torch.Generator().manual_seed(3))
    ref = torch.empty(32, 160)
    torch.nn.init.kaiming_uniform_(ref, a=5**0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(A, ref)
    assert A.abs().max() <= 160**-0.5 and A.abs().max() > 0.9 * 160**-0.5
    assert fo.fast_layer_indices(28) == list(range(18, 28))
    assert fo.fast_layer_indices(4) == [2, 3]
    shapes = {k: tuple(v.shape) for k, v in fo.draw_A0(tiny_model(), 8).items()}
    assert shapes[(2, "gate_proj")] == (8, 64) and shapes[(3, "down_proj")] == (8, 160)


# -------------------------------------------------------------------------------------- multi-sample


def three_samples(model):
    masks = [MULTI_TURN, [0] * 5 + [1] * 9, [0] * 4 + [1] * 3 + [0] * 3 + [1] * 2]
    return [
        {"input_ids": make_sample(s, m)[0], "loss_mask": torch.tensor(m), "A0": draw(model, s)}
        for s, m in enumerate(masks)
    ]


def test_many_k0_token_reduction_is_padded_batch_sft():
    model = tiny_model()
    samples = three_samples(model)
    many = fo.oracle_step_many(model, samples, "token", mode="causal", inner_steps=0, rank=RANK, alpha=ALPHA)
    S = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(3, S, dtype=torch.long)
    labels = torch.full((3, S), -100)
    attn = torch.zeros(3, S, dtype=torch.long)
    for b, s in enumerate(samples):  # right padding: invisible to earlier tokens under causal attention
        n = len(s["input_ids"])
        ids[b, :n], labels[b, :n], attn[b, :n] = s["input_ids"], labels_for(s["input_ids"], s["loss_mask"]), 1
    loss, grads = hf_sft(model, ids, labels, attn)
    torch.testing.assert_close(many.loss, loss, rtol=1e-6, atol=0)
    assert_grads_close(many.grads, grads, rtol=1e-5)


def test_many_sample_reduction_averages_independent_runs():
    model = tiny_model()
    samples = three_samples(model)
    kw = {"mode": "glm", "inner_steps": 2, "rank": RANK, "alpha": ALPHA}
    many = fo.oracle_step_many(model, samples, "sample", **kw)
    single = [fo.oracle_step(tiny_model(), **s, **kw) for s in samples]  # fresh model: no grad leftovers
    torch.testing.assert_close(many.loss, sum(r.outer_loss for r in single) / 3)
    assert_grads_close(many.grads, {n: sum(r.grads[n] for r in single) / 3 for n in many.grads}, rtol=1e-6)
    assert [r.num_tokens for r in many.per_sample] == [12, 9, 5]
    with pytest.raises(ValueError):
        fo.oracle_step_many(model, samples, "batch", **kw)


def test_oracle_is_independent_of_megatron_focusft():
    tree = ast.parse(pathlib.Path(fo.__file__).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in modules if m.startswith("megatron")]
