"""Whole-model equalities on a tiny Qwen2 (fp32, CPU): packing, flex vs dense, TP=2 (+SP) vs TP=1."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft import attention
from megatron_focusft.models import qwen2
from tests.distributed import run_distributed

LENS = (13, 21, 9)  # three documents ...
PAD = 5  # ... and a padding tail; 48 tokens, divisible by TP=2 for sequence parallelism
CU_SEQLENS = torch.tensor([0, 13, 34, 43, 48], dtype=torch.int32)  # the documents, then the padding


def build_model(backend: str, tp: int = 1, sequence_parallel: bool = False):
    arch = qwen2.tiny_arch()
    cfg = qwen2.transformer_config(
        arch, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, use_cpu_initialization=True
    )
    spec = qwen2.block_spec(cfg, lambda i: qwen2.layer_spec(attention.core_attention_class(backend)))
    return qwen2.build_gpt_model(arch, cfg, spec, parallel_output=False).eval()


def make_pack(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(LENS)] + [torch.full((PAD,), -1)])
    # each document: context, response, context, response ... runs of random length
    lm = torch.cat([(torch.arange(n) // 4 + torch.randint(0, 2, (1,), generator=g)) % 2 for n in LENS])
    lm = torch.cat([lm, torch.zeros(PAD, dtype=torch.long)])
    tokens = torch.randint(0, 1000, (1, docs.numel()), generator=g)
    positions = torch.cat([torch.arange(n) for n in (*LENS, PAD)])[None]
    return tokens, positions, docs, lm


def run_pack(model, backend, mode, tokens, positions, docs, lm):
    mask = attention.build_attention_mask(backend, docs, lm, mode)
    params = attention.packed_seq_params(CU_SEQLENS)
    return model(tokens, positions, mask, packed_seq_params=params)[0]


def assert_rel_close(got, want, rel=1e-5):
    err = (got - want).abs().max() / want.abs().max()
    assert err <= rel, f"max relative difference {err:.3g} > {rel}"


@pytest.fixture
def models(megatron_cpu):
    torch.manual_seed(0)
    dense = build_model("dense")
    flex = build_model("flex")
    flex.load_state_dict(dense.state_dict())  # core attention has no weights: same model, other kernel
    return {"dense": dense, "flex": flex}


@pytest.mark.parametrize("backend", ["dense", "flex"])
@pytest.mark.parametrize("mode", ["causal", "glm"])
def test_each_document_of_a_pack_equals_running_it_alone(models, backend, mode):
    model = models[backend]
    tokens, positions, docs, lm = make_pack()
    with torch.no_grad():
        packed = run_pack(model, backend, mode, tokens, positions, docs, lm)
        start = 0
        for n in LENS:
            sl = slice(start, start + n)
            # alone: an ordinary (sbhd, b = 1) batch without packed_seq_params
            mask = attention.build_attention_mask(backend, torch.zeros(n, dtype=torch.long), lm[sl], mode)
            alone = model(tokens[:, sl], positions[:, sl], mask)[0]
            assert_rel_close(packed[sl], alone)
            start += n


def _queries_of_first_layer(model, *args, **kwargs) -> torch.Tensor:
    """The rotated queries the first layer's core attention receives, as [tokens, heads, d]."""
    seen = []
    core = model.decoder.layers[0].self_attention.core_attention
    handle = core.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        model(*args, **kwargs)
    handle.remove()
    q = seen[0]
    return q if q.dim() == 3 else q[:, 0]  # thd [t, h, d] or sbhd [s, 1, h, d]


def test_rope_positions_restart_in_every_document(models):
    """With a document-aware mask the logits hardly depend on where RoPE starts (it is relative), so the
    restart is checked where it happens: the rotated queries of a packed document equal those of the
    document alone, and differ from a pack without packed_seq_params."""
    model, backend, mode = models["dense"], "dense", "glm"
    tokens, positions, docs, lm = make_pack()
    mask = attention.build_attention_mask(backend, docs, lm, mode)
    params = attention.packed_seq_params(CU_SEQLENS)
    packed = _queries_of_first_layer(model, tokens, positions, mask, packed_seq_params=params)
    unrestarted = _queries_of_first_layer(model, tokens, positions, mask)
    start = LENS[0]
    sl = slice(start, start + LENS[1])
    alone_mask = attention.build_attention_mask(backend, torch.zeros(LENS[1], dtype=torch.long), lm[sl], mode)
    alone = _queries_of_first_layer(model, tokens[:, sl], positions[:, sl], alone_mask)
    torch.testing.assert_close(packed[sl], alone, rtol=1e-6, atol=1e-6)
    assert (unrestarted[sl] - alone).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["causal", "glm"])
def test_flex_forward_equals_dense(models, mode):
    tokens, positions, docs, lm = make_pack(1)
    with torch.no_grad():
        # packed (thd)
        want = run_pack(models["dense"], "dense", mode, tokens, positions, docs, lm)
        got = run_pack(models["flex"], "flex", mode, tokens, positions, docs, lm)
        assert_rel_close(got, want)
        # padded batch of two sequences (sbhd, b = 2), each one document + padding
        docs2 = torch.stack([torch.where(torch.arange(48) < 40, 0, -1), torch.where(torch.arange(48) < 31, 0, -1)])
        lm2 = torch.stack([lm, lm.roll(7)])
        tokens2 = torch.cat([tokens, tokens.roll(3)])
        pos2 = torch.arange(48).expand(2, 48)
        want = models["dense"](tokens2, pos2, attention.build_attention_mask("dense", docs2, lm2, mode))
        got = models["flex"](tokens2, pos2, attention.build_attention_mask("flex", docs2, lm2, mode))
        assert_rel_close(got[docs2 >= 0], want[docs2 >= 0])


def test_dense_pack_backward_is_finite_with_padding(models):
    """Padding rows attend to themselves only, so no NaN reaches the gradients."""
    model = models["dense"].train()
    tokens, positions, docs, lm = make_pack(2)
    logits = run_pack(model, "dense", "glm", tokens, positions, docs, lm)
    loss = torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:], reduction="none")
    (loss * lm[1:]).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_flex_backward_on_cpu_is_a_clear_error(models):
    tokens, positions, docs, lm = make_pack()
    with pytest.raises(NotImplementedError, match="no backward pass on CPU"):
        run_pack(models["flex"].train(), "flex", "glm", tokens, positions, docs, lm)


# ---- tensor parallelism: TP=2 (and TP=2 + sequence parallelism) equals TP=1 ----------------------------


def _shard(full: torch.Tensor, param: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's slice of a full (TP=1) weight, from Megatron's partition attributes of ``param``."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride  # fc1 = [gate; up]: stride 2
    parts = [part.chunk(tp, dim)[rank] for part in full.chunk(stride, dim)]
    return torch.cat(parts, dim)


def _tp_logits(full_state: dict, backend: str):
    """{(sequence_parallel, mode): logits of the pack} on this TP group (rank 0's result is returned)."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = {}
    for sequence_parallel in (False, True):
        model = build_model(backend, tp=tp, sequence_parallel=sequence_parallel)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_shard(full_state[name], p, tp, rank))
            for mode in ("causal", "glm"):
                out[sequence_parallel, mode] = run_pack(model, backend, mode, *make_pack(3))
    return out


@pytest.mark.slow
def test_tensor_parallel_equals_single_rank(models):
    """TP=2 and TP=2 with sequence parallelism (which splits the packed [t, 1, h] sequence) equal TP=1."""
    model = models["dense"]
    with torch.no_grad():
        want = {mode: run_pack(model, "dense", mode, *make_pack(3)) for mode in ("causal", "glm")}
    state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    got = run_distributed(_tp_logits, world_size=2, tp=2, args=(state, "dense"))
    for (sequence_parallel, mode), logits in got.items():
        assert logits.shape == want[mode].shape, (sequence_parallel, mode)
        assert_rel_close(logits, want[mode])
    assert len(got) == 4
