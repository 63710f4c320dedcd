"""FlexAttention on a GPU (skipped without CUDA): forward and backward against the dense reference, and
memory that grows linearly with the sequence length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_focusft import attention
from megatron_focusft.attention.bench import synthetic_pack
from megatron_focusft.attention.flex import flex_kernel

pytestmark = pytest.mark.gpu


def _qkv(s: int, dtype: torch.dtype, heads: int = 8, kv_heads: int = 2, d: int = 64, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, s, d, generator=g, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(1, kv_heads, s, d, generator=g, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)
    )
    return q, k, v


def _fwd_bwd(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, dq, dk, dv


@pytest.mark.parametrize("mode", ["causal", "glm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_forward_backward_equals_dense(mode, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    s = 2048
    docs, lm = synthetic_pack(s, seed=1)
    docs, lm = docs.cuda(), lm.cuda()
    dense_mask = attention.build_attention_mask("dense", docs, lm, mode)
    block_mask = attention.build_attention_mask("flex", docs, lm, mode)
    kernel = flex_kernel(torch.device("cuda"))
    q, k, v = _qkv(s, dtype)
    grad_out = torch.randn_like(q)
    flex = lambda q, k, v: kernel(q, k, v, block_mask=block_mask, enable_gqa=True)  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, enable_gqa=True)  # noqa: E731
    got = _fwd_bwd(flex, q, k, v, grad_out)
    # reference: dense SDPA in fp32 from the same inputs
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = _fwd_bwd(sdpa, q32, k32, v32, grad_out.float())
    if dtype == torch.float32:
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    else:
        # bf16: flex may be off the fp32 reference by about as much as SDPA itself is in bf16
        same_precision = _fwd_bwd(sdpa, q, k, v, grad_out)
        for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, same_precision, strict=True):
            err, sdpa_err = (a.float() - b).abs().max(), (c.float() - b).abs().max()
            assert err <= 2 * sdpa_err + 1e-3, f"{name}: flex bf16 error {err:.3g}, sdpa bf16 {sdpa_err:.3g}"


def _flex_peak_mib(s: int, mode: str) -> tuple[float, float]:
    """(peak MiB of building the BlockMask, peak MiB of flex fwd+bwd above its inputs) at length s."""
    docs, lm = synthetic_pack(s, seed=0)
    docs, lm = docs.cuda(), lm.cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    block_mask = attention.build_attention_mask("flex", docs, lm, mode)
    mask_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    kernel = flex_kernel(torch.device("cuda"))
    q, k, v = _qkv(s, torch.bfloat16, heads=28, kv_heads=4, d=128)
    fwd_bwd = lambda: kernel(q, k, v, block_mask=block_mask, enable_gqa=True).sum().backward()  # noqa: E731
    fwd_bwd()  # compile
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return mask_peak, (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("mode", ["causal", "glm"])
def test_flex_memory_grows_linearly_to_32k(mode):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lengths = (8192, 16384, 32768)
    peaks = {s: _flex_peak_mib(s, mode) for s in lengths}
    for short, long in zip(lengths, lengths[1:]):
        # doubling the length: ~2x for linear memory, 4x for quadratic
        assert peaks[long][1] / peaks[short][1] < 2.6, peaks
    s = lengths[-1]
    # the mask is built in bands: far below one S x S bool matrix (1 GiB at 32K)
    assert peaks[s][0] < 0.5 * s * s / 2**20, peaks
