"""Attention backends on their own: flex BlockMask vs create_block_mask, flex vs dense, te errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from megatron_focusft import attention
from megatron_focusft.attention.flex import build_block_mask, compiled_flex_attention
from megatron_focusft.attention.te import TEUnavailableError
from megatron_focusft.masks import MaskInputs


def random_pack(s: int, generator: torch.Generator, pad: int = 0, max_run: int = 40):
    """document_ids, loss_mask of one pack: documents of alternating context/response runs, padding tail."""
    docs, lm, d = [], [], 0
    while len(docs) < s - pad:
        for turn in range(int(torch.randint(1, 6, (1,), generator=generator))):
            n = int(torch.randint(1, max_run, (1,), generator=generator))
            docs += [d] * n
            lm += [turn % 2] * n
        d += 1
    docs, lm = docs[: s - pad] + [-1] * pad, lm[: s - pad] + [0] * pad
    return torch.tensor(docs), torch.tensor(lm)


@pytest.mark.parametrize("mode", ["causal", "glm"])
@pytest.mark.parametrize("s,block", [(300, 128), (256, 64), (77, 16)])
def test_block_mask_equals_create_block_mask(mode, s, block, monkeypatch):
    g = torch.Generator().manual_seed(s)
    a, b = random_pack(s, g, pad=5), random_pack(s, g)
    inputs = MaskInputs(torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]]), mode)
    # small bands, so the banded construction is exercised across several bands
    monkeypatch.setattr("megatron_focusft.attention.flex._MAX_BAND_ELEMENTS", 2 * s * block * 2)
    ours = build_block_mask(inputs, block)
    ref = create_block_mask(inputs.mask_mod(), 2, None, s, s, device="cpu", BLOCK_SIZE=block)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    n = ours.kv_num_blocks
    for idx in ("kv_indices", "full_kv_indices"):
        cnt = ours.kv_num_blocks if idx == "kv_indices" else ours.full_kv_num_blocks
        keep = torch.arange(n.shape[-1] + 10)[: getattr(ours, idx).shape[-1]] < cnt[..., None]
        assert torch.equal(getattr(ours, idx)[keep], getattr(ref, idx)[keep]), idx
    assert torch.equal(ours.to_dense(), ref.to_dense())


@pytest.mark.parametrize("mode", ["causal", "glm"])
def test_flex_kernel_equals_sdpa_with_dense_mask(mode):
    g = torch.Generator().manual_seed(0)
    s = 200
    docs, lm = random_pack(s, g, pad=7)
    q = torch.randn(1, 4, s, 16, generator=g)
    k, v = torch.randn(2, 1, 2, s, 16, generator=g)
    dense = attention.build_attention_mask("dense", docs, lm, mode)
    block = attention.build_attention_mask("flex", docs, lm, mode)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    out = flex_attention(q, k, v, block_mask=block, enable_gqa=True)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiled_flex_reuses_one_graph_across_batches():
    """Packs of one length with different documents, blocks and padding: the compiled kernel (what CUDA
    runs) is traced once per mask mode, never per batch (that would cost seconds every step on a GPU),
    and each output equals dense SDPA."""
    torch._dynamo.reset()
    counters.clear()
    kernel = compiled_flex_attention()
    g = torch.Generator().manual_seed(3)
    s = 256
    for mode, pad in (("glm", 0), ("glm", 9), ("glm", 30), ("causal", 0), ("causal", 17)):
        docs, lm = random_pack(s, g, pad=pad)
        q = torch.randn(1, 4, s, 16, generator=g)
        k, v = torch.randn(2, 1, 2, s, 16, generator=g)
        dense = attention.build_attention_mask("dense", docs, lm, mode)
        block = attention.build_attention_mask("flex", docs, lm, mode)
        out = kernel(q, k, v, block_mask=block, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_cu_seqlens_and_packed_seq_params():
    from megatron_focusft.data.packed_input import PackedInput

    docs = [(torch.arange(n), torch.zeros(n)) for n in (3, 2, 4)]
    cu = PackedInput.from_documents(docs, pad_to=11).cu_seqlens
    assert cu.tolist() == [0, 3, 5, 9, 11] and cu.dtype == torch.int32
    p = attention.packed_seq_params(cu)
    assert p.qkv_format == "thd" and p.max_seqlen_q == p.max_seqlen_kv == 4


def test_unknown_backend():
    with pytest.raises(ValueError, match="--attention-backend 'sdpa'"):
        attention.core_attention_class("sdpa")


def test_te_backend_errors_are_clear():
    docs, lm = torch.zeros(8, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 0, 1, 1])
    with pytest.raises(TEUnavailableError, match="no fused kernel for the glm mask"):
        attention.build_attention_mask("te", docs, lm, "glm")
    with pytest.raises(TEUnavailableError, match="supports only --attention-mask causal, not 'glm'"):  # the real flag
        attention.build_attention_mask("te", docs, lm, "glm")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(TEUnavailableError, match="--attention-backend te needs TransformerEngine.*flex"):
            attention.core_attention_class("te")
        with pytest.raises(TEUnavailableError, match="--attention-backend te needs TransformerEngine"):
            attention.build_attention_mask("te", docs, lm, "causal")


@pytest.mark.parametrize("mode", ["causal", "glm"])
def test_context_parallel_query_rows_flex_equals_dense(mode):
    """A CP rank's queries (chunks 1 and 2 of 4) against the whole pack's keys: the BlockMask built with
    ``query_index`` and the dense rows agree, and so do FlexAttention and SDPA on them."""
    from megatron_focusft.attention.context_parallel import load_balanced_index

    g = torch.Generator().manual_seed(7)
    docs, lm = random_pack(256, g, pad=9)
    local = load_balanced_index(256, cp_size=2, cp_rank=1)
    assert local.tolist() == list(range(64, 128)) + list(range(128, 192))
    inputs = MaskInputs(docs, lm, mode, query_index=local)
    rows = inputs.dense()  # [1, 128, 256]
    full = MaskInputs(docs, lm, mode).dense()
    assert torch.equal(rows, full[:, local])
    q = torch.randn(1, 4, 128, 16, generator=g)
    k, v = torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=rows[:, None], enable_gqa=True)
    out = flex_attention(q, k, v, block_mask=build_block_mask(inputs, 32), enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-5)
