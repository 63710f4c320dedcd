"""Step-time benchmark of the paper's 2x2 ablation (bilevel x mask), side by side in one process.

Modes (paper table 3): standard SFT (no bilevel, causal), SFT + bidirectional context (no bilevel, glm),
causal bilevel, FocuSFT (bilevel, glm).  Each mode runs the same :class:`BilevelStep` on the same model and
pack; only the config differs.  Reported per mode: step time (forward, inner loop, backward; no optimizer
step, identical for all modes), tokens/s, TFLOP/s and MFU, peak memory next to what
:mod:`megatron_focusft.memory_plan` predicts for the same state, and the ratio to standard SFT.

FLOPs are *SFT-equivalent* (:func:`megatron_focusft.flops.sft_flops`): the matmul FLOPs a standard SFT step
on the pack needs (6 x tokens x layer parameters, the output layer at response positions, document-causal
attention).  Every mode is credited the same useful work, so a slower mode shows a lower TFLOP/s and MFU
instead of taking credit for its extra inner passes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from megatron_focusft.attention.bench import synthetic_pack
from megatron_focusft.bilevel import BilevelStep
from megatron_focusft.config import FocuSFTConfig
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.flops import sft_flops
from megatron_focusft.memory_plan import Layout, Workload
from megatron_focusft.memory_plan import plan as memory_plan
from megatron_focusft.models.focusft import FocuSFTModel, build_focusft_model
from megatron_focusft.models.qwen2 import Qwen2Arch

ABLATION_MODES: dict[str, dict] = {
    "standard SFT": {"bilevel": False, "attention_mask": "causal"},
    "SFT + bidir": {"bilevel": False, "attention_mask": "glm"},
    "causal bilevel": {"bilevel": True, "attention_mask": "causal"},
    "FocuSFT": {"bilevel": True, "attention_mask": "glm"},
}


def synthetic_input(seq_len: int, vocab_size: int, seed: int = 0) -> PackedInput:
    """A pack of synthetic agentic trajectories (random token ids); documents without a response token
    (the truncated tail) become padding, as the data pipeline would never emit them."""
    docs, loss = synthetic_pack(seq_len, seed)
    for d in docs.unique().tolist():
        at = docs == d
        idx = at.nonzero().reshape(-1)
        if d >= 0 and not bool(loss[idx[1:]].any()):
            docs[at], loss[at] = -1, 0
    if (docs[:-1] == -1).logical_and(docs[1:] != -1).any():
        raise AssertionError("padding must be the tail of the synthetic pack")
    tokens = torch.randint(0, vocab_size, (seq_len,), generator=torch.Generator().manual_seed(seed))
    ids = docs.unique_consecutive().tolist()
    documents = [(tokens[docs == d], loss[docs == d]) for d in ids if d >= 0]
    return PackedInput.from_documents(documents, pad_to=seq_len)


# What the benchmark holds at its peak, in the memory plan's terms: parameters and their .grad (same dtype,
# no DDP buffer, no optimizer), activations, the working set, the output head and the fast weights.
_BENCHMARK_STATE = ("parameters", "activations", "activation working set", "output head", "fast weights")


def predicted_peak_bytes(arch: Qwen2Arch, cfg: FocuSFTConfig, inp: PackedInput) -> int:
    """The memory plan's prediction of this benchmark's peak allocated memory (bf16, one GPU)."""
    work = Workload(
        seq_length=inp.length,
        recompute=cfg.recompute or "none",
        attention_backend=cfg.attention_backend,
        focusft=cfg.bilevel,
        inner_steps=cfg.inner_steps,
        layer_fraction=cfg.layer_fraction,
        lora_rank=cfg.lora_rank,
        documents_per_pack=inp.num_documents,
        response_fraction=inp.num_response_tokens / max(inp.num_tokens, 1),
        targets=tuple(cfg.targets),
    )
    components = {c.name: c.bytes for c in memory_plan(arch, Layout(), work).components}
    return components["parameters"] + sum(components.get(name, 0) for name in _BENCHMARK_STATE)


@dataclass
class Row:
    mode: str
    seq_len: int
    step_ms: float
    tokens_per_s: float
    tflops: float
    mfu: float | None
    peak_gib: float | None
    plan_gib: float | None
    ratio: float = 1.0


def run(
    arch: Qwen2Arch,
    seq_lens: list[int],
    base: FocuSFTConfig,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 1,
    iters: int = 3,
    peak_tflops: float | None = None,
) -> list[Row]:
    """Time each ablation mode on one model and one pack of each length; ratios are to standard SFT at the
    same length."""
    model = build_focusft_model(arch, base, params_dtype=dtype, perform_initialization=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, arch.initializer_range)
    model = model.to(device)
    rows: list[Row] = []
    for seq_len in seq_lens:
        rows += _run_length(model, arch, seq_len, base, device, warmup, iters, peak_tflops, dtype)
    return rows


def _run_length(
    model: FocuSFTModel,
    arch: Qwen2Arch,
    seq_len: int,
    base: FocuSFTConfig,
    device: torch.device,
    warmup: int,
    iters: int,
    peak_tflops: float | None,
    dtype: torch.dtype,
) -> list[Row]:
    inp = synthetic_input(seq_len, arch.vocab_size).to(device)
    flops = sft_flops(arch, inp)
    cuda = device.type == "cuda"
    rows: list[Row] = []
    for mode, changes in ABLATION_MODES.items():
        cfg = dataclasses.replace(base, **changes)
        step = BilevelStep(model, cfg)
        for _ in range(warmup):
            step(inp, loss_scale=1.0)
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            step(inp, loss_scale=1.0)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iters
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        model.zero_grad(set_to_none=True)
        tflops = flops / seconds / 1e12
        rows.append(
            Row(
                mode=mode,
                seq_len=seq_len,
                step_ms=seconds * 1e3,
                tokens_per_s=seq_len / seconds,
                tflops=tflops,
                mfu=tflops / peak_tflops if peak_tflops else None,
                peak_gib=peak,
                plan_gib=predicted_peak_bytes(arch, cfg, inp) / 2**30 if dtype == torch.bfloat16 else None,
            )
        )
    for row in rows:
        row.ratio = row.step_ms / rows[0].step_ms
    return rows


def format_table(rows: list[Row]) -> str:
    """Markdown table; ``plan GiB`` is the memory plan's prediction of ``peak GiB`` (bf16 only)."""
    lines = [
        "| tokens | mode | step ms | tokens/s | TFLOP/s (SFT-equiv.) | MFU | peak GiB | plan GiB "
        "| step time / standard SFT |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        plan = f"{r.plan_gib:.2f}" if r.plan_gib is not None else "-"
        cells = [str(r.seq_len), r.mode, f"{r.step_ms:.1f}", f"{r.tokens_per_s:,.0f}", f"{r.tflops:.3f}", mfu]
        lines.append("| " + " | ".join(cells + [peak, plan]) + f" | {r.ratio:.2f}x |")
    return "\n".join(lines)
