"""Micro-benchmark of one attention layer: forward(+backward) time and peak memory per (backend, mask).

``tools/benchmark_attention.py`` is the command line over :func:`run`.  Kernels compared:

- ``flex``: :class:`~megatron_focusft.attention.flex.FlexAttention`'s kernel with the BlockMask of the pack
  (document-aware ``causal`` or ``glm``);
- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` over the whole pack (flash attention on a
  GPU): the speed of plain causal attention, NOT document-aware, ``causal`` only;
- ``dense``: SDPA with the document-aware bool mask (materialises S x S: short sequences only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megatron_focusft import attention
from megatron_focusft.masks import PADDING_DOCUMENT

BENCH_BACKENDS = ("flex", "sdpa", "dense")


def synthetic_trajectory(rng: np.random.Generator, scale: float = 1.0) -> list[tuple[int, int]]:
    """One agentic SFT trajectory as (length, loss) runs: system + user context, several tool-call /
    tool-result turns, a final answer (~2K-15K tokens, ~15% response tokens, as in tool-use data).
    ``scale`` shrinks every run (for CPU smoke runs at a few hundred tokens)."""

    def n(lo: int, hi: int) -> int:
        return max(1, round(int(rng.integers(lo, hi)) * scale))

    runs = [(n(300, 1500) + n(50, 500), 0)]  # system + user (+ the assistant header)
    for _ in range(int(rng.integers(2, 9))):
        runs.append((n(40, 250), 1))  # assistant tool call
        runs.append((n(150, 1800), 0))  # tool result (+ the next assistant header)
    runs.append((n(150, 700), 1))  # final answer
    return runs


def synthetic_pack(seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """document_ids, loss_mask [seq_len] of a pack of synthetic trajectories (the last one truncated).

    Trajectories keep their real size from 4K tokens up; shorter packs scale them down."""
    scale = min(1.0, seq_len / 4096)
    rng = np.random.default_rng(seed)
    docs = np.full(seq_len, PADDING_DOCUMENT, dtype=np.int64)
    lm = np.zeros(seq_len, dtype=np.int64)
    pos, doc = 0, 0
    while pos < seq_len:
        for n, loss in synthetic_trajectory(rng, scale):
            n = min(n, seq_len - pos)
            docs[pos : pos + n] = doc
            lm[pos : pos + n] = loss
            pos += n
            if pos == seq_len:
                break
        doc += 1
    return torch.from_numpy(docs), torch.from_numpy(lm)


@dataclass
class Result:
    backend: str
    mode: str
    seq_len: int
    ms: float | None  # per iteration (fwd+bwd, or fwd only)
    peak_mib: float | None  # peak allocated memory above the inputs (CUDA only)
    mask_ms: float | None  # building the mask (once per batch)
    response_fraction: float
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def run_one(
    backend: str,
    mode: str,
    seq_len: int,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    backward: bool,
    warmup: int = 2,
    iters: int = 5,
    seed: int = 0,
) -> Result:
    docs, lm = synthetic_pack(seq_len, seed)
    frac = float(lm.float().mean())
    if backend == "sdpa" and mode != "causal":
        return Result(backend, mode, seq_len, None, None, None, frac, "sdpa/flash has no glm mask")
    docs, lm = docs.to(device), lm.to(device)
    q, k, v = _random_qkv(seq_len, heads, kv_heads, head_dim, dtype, device, backward, seed)

    def build_mask():
        if backend == "flex":
            return attention.build_attention_mask("flex", docs, lm, mode)
        if backend == "dense":
            return attention.build_attention_mask("dense", docs, lm, mode)
        return None

    try:
        mask = build_mask()  # the first build also warms up
        mask_ms = _timed(build_mask, device, 1) if backend != "sdpa" else None
        attn = _attention_call(backend, mask, q, k, v, device, gqa=heads != kv_heads)

        def step():
            out = attn()
            if backward:
                out.backward(torch.ones_like(out))
                q.grad = k.grad = v.grad = None

        ms, peak = _measure(step, device, backward, warmup, iters)
    except torch.OutOfMemoryError:
        return Result(backend, mode, seq_len, None, None, None, frac, "OOM")
    return Result(backend, mode, seq_len, ms, peak, mask_ms, frac)


def _random_qkv(seq_len, heads, kv_heads, head_dim, dtype, device, backward: bool, seed: int):
    """q [1, heads, s, d] and k, v [1, kv_heads, s, d], drawn in that order from one seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, heads, seq_len, head_dim)
    kv_shape = (1, kv_heads, seq_len, head_dim)
    q = torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(backward)
    k = torch.randn(kv_shape, generator=g, device=device, dtype=dtype).requires_grad_(backward)
    v = torch.randn(kv_shape, generator=g, device=device, dtype=dtype).requires_grad_(backward)
    return q, k, v


def _attention_call(backend: str, mask, q, k, v, device: torch.device, *, gqa: bool) -> Callable[[], torch.Tensor]:
    """The attention under test as a call without arguments: FlexAttention's kernel with the BlockMask, or
    SDPA with the bool mask (``dense``) or with ``is_causal`` and no mask (``sdpa``)."""
    if backend == "flex":
        from megatron_focusft.attention.flex import flex_kernel

        kernel = flex_kernel(device)
        return lambda: kernel(q, k, v, block_mask=mask, enable_gqa=gqa)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def _measure(step: Callable[[], None], device: torch.device, backward: bool, warmup: int, iters: int):
    """(ms per ``step`` after ``warmup`` untimed ones, peak MiB allocated above the start on CUDA else None)."""
    grad_ctx = torch.enable_grad if backward else torch.no_grad
    with grad_ctx():
        for _ in range(warmup):
            step()
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        ms = _timed(step, device, iters)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return ms, peak


def run(
    lengths: list[int],
    modes: list[str],
    backends: list[str],
    *,
    heads: int = 28,
    kv_heads: int = 4,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    backward: bool | None = None,
    warmup: int = 2,
    iters: int = 5,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Every (length, backend, mode); ``backward`` defaults to True on CUDA and False on CPU (PyTorch's
    FlexAttention has no CPU backward)."""
    dev = torch.device(device)
    if backward is None:
        backward = dev.type == "cuda"
    results = []
    for s in lengths:
        for backend in backends:
            if backend not in BENCH_BACKENDS:
                raise ValueError(f"unknown benchmark backend {backend!r}; choose from {BENCH_BACKENDS}")
            for mode in modes:
                r = run_one(
                    backend,
                    mode,
                    s,
                    heads=heads,
                    kv_heads=kv_heads,
                    head_dim=head_dim,
                    dtype=dtype,
                    device=dev,
                    backward=backward,
                    warmup=warmup,
                    iters=iters,
                )
                results.append(r)
                if on_result:
                    on_result(r)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return results


def ratios(results: list[Result]) -> list[tuple[str, int, float]]:
    """(backend, seq_len, glm ms / causal ms) wherever both were measured."""
    by = {(r.backend, r.seq_len, r.mode): r.ms for r in results}
    out = []
    for (backend, s, mode), ms in by.items():
        causal = by.get((backend, s, "causal"))
        if mode == "glm" and ms and causal:
            out.append((backend, s, ms / causal))
    return out


def format_table(results: list[Result], backward: bool) -> str:
    what = "fwd+bwd" if backward else "fwd"
    lines = [
        f"| seq len | backend | mask | {what} ms | peak MiB | mask build ms | response frac | note |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]

    def f(x, p=1):
        return "-" if x is None else f"{x:.{p}f}"

    for r in results:
        lines.append(
            f"| {r.seq_len} | {r.backend} | {r.mode} | {f(r.ms, 2)} | {f(r.peak_mib)} | {f(r.mask_ms, 2)} "
            f"| {r.response_fraction:.2f} | {r.note} |"
        )
    rs = ratios(results)
    if rs:
        lines += ["", "| seq len | backend | glm / causal time |", "|---:|---|---:|"]
        lines += [f"| {s} | {b} | {x:.2f}x |" for b, s, x in rs]
    by = {(r.backend, r.seq_len, r.mode): r.ms for r in results}
    pairs = [
        (s, by[("flex", s, "causal")] / by[("sdpa", s, "causal")])
        for (b, s, m) in by
        if b == "sdpa" and m == "causal" and by[(b, s, m)] and by.get(("flex", s, "causal"))
    ]
    if pairs:
        lines += ["", "| seq len | flex causal / sdpa causal time |", "|---:|---:|"]
        lines += [f"| {s} | {x:.2f}x |" for s, x in pairs]
    return "\n".join(lines)
