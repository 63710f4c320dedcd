"""The layout search behind ``tools/memory_plan.py --suggest``: every parallel layout of G GPUs, checked,
planned stage by stage (:mod:`megatron_focusft.memory_plan`) and costed (:mod:`.cost`) for the same global
batch; the ones that fit ranked by predicted step time, the others grouped by why they fail.

Enumerated: TP in 1, 2, 4, 8 (one node's GPUs at most; SP on when TP > 1); CP and PP among the divisors of
G and the powers of two up to G; DP = G / (TP x CP x PP); recompute none, selective, full.  Under PP the
even split and every ``--decoder-first/last-pipeline-num-layers`` split Megatron builds that gives each
stage between half and twice the even share of the layers are tried (an uneven split moves layers off a
stage that carries more: the first keeps the most micro-batches in flight, the last holds the output layer
and, with local fast layers, the inner steps; or it puts every fast layer on the last stage); the fastest
that fits stands for the layout (the even one among equals).  The micro-batches per step and replica are
``global batch / (micro-batch x DP)``.

A layout is rejected with the first reason that applies, in the order of :data:`REJECTIONS`.  The ranking
is by the FLOP model's step time, which does not see communication: between layouts of equal predicted time
it prefers less CP, then less TP, then fewer stages.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from megatron_focusft.memory_plan import (
    GiB,
    Layout,
    PipelinePlan,
    Recompute,
    StageShape,
    Workload,
    check_sequence,
    check_workload,
    pipeline_plan,
    stage_components,
    stage_shapes,
)
from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch
from megatron_focusft.pipeline.cost import DEFAULT_ACHIEVED_TFLOPS, PipelineCost, shapes_cost

TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
RECOMPUTES: tuple[Recompute, ...] = ("none", "selective", "full")
# Why a layout fails, in the order the checks run (the first that applies is its reason).
REJECTIONS = {
    "tensor": "TP does not divide the model",
    "sequence": "CP x TP does not divide the sequence",
    "world": "world not divisible",
    "pipeline": "PP cannot split the layers",
    "batch": "global batch not divisible",
    "memory": "does not fit",
}


@dataclass(frozen=True)
class Fit:
    """A layout that fits, with its per-stage memory and its predicted step."""

    layout: Layout
    recompute: Recompute
    micro_batches: int
    memory: PipelinePlan
    cost: PipelineCost

    @property
    def split(self) -> str:
        return split_text(self.layout)

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "tp": lay.tp,
            "pp": lay.pp,
            "cp": lay.cp,
            "dp": lay.dp,
            "sp": lay.sp,
            "recompute": self.recompute,
            "first_stage_layers": lay.first_stage_layers,
            "last_stage_layers": lay.last_stage_layers,
            "stage_layers": [len(s.layers) for s in self.cost.stages],
            "micro_batches": self.micro_batches,
            "peak_gib": round(self.memory.peak.total_gib, 4),
            "peak_stage": self.memory.peak_stage,
            "step_seconds": self.cost.step_seconds,
            "bubble": self.cost.bubble,
            "imbalance": self.cost.imbalance,
            "fast_case": self.cost.case,
        }

    def shell(self) -> str:
        """Shell assignments for ``examples/run_focusft_qwen7b.sh`` (empty end-stage layers: the even split)."""
        lay = self.layout
        first, last = lay.first_stage_layers, lay.last_stage_layers
        return (
            f"TP={lay.tp} PP={lay.pp} CP={lay.cp} DP={lay.dp} SP={int(lay.sp)} RECOMPUTE={self.recompute} "
            f"FIRST_STAGE_LAYERS={'' if first is None else first} LAST_STAGE_LAYERS={'' if last is None else last}"
        )


@dataclass(frozen=True)
class Rejection:
    """A layout that cannot run, and why; a size left None: the reason holds for every value of it."""

    kind: str  # a key of REJECTIONS
    reason: str  # one line
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    dp: int | None = None
    recompute: Recompute | None = None
    split: str | None = None

    @property
    def layout(self) -> str:
        """``'TP=8 PP=1 CP=1 DP=4 recompute=none'``: the sizes the reason is about (any value of the others)."""
        sizes = (("TP", self.tp), ("PP", self.pp), ("CP", self.cp), ("DP", self.dp), ("recompute", self.recompute))
        text = " ".join(f"{k}={v}" for k, v in sizes if v is not None)
        return f"{text} split {self.split}" if self.split not in (None, "-") else text

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("kind", "reason", "tp", "pp", "cp", "dp", "recompute", "split")}


@dataclass(frozen=True)
class Suggestion:
    """What :func:`suggest` found: the layouts that fit, fastest first, and the rejected ones."""

    num_gpus: int
    gpu_memory_gib: float
    global_batch_size: int
    fits: tuple[Fit, ...]
    rejected: tuple[Rejection, ...]

    @property
    def best(self) -> Fit | None:
        return self.fits[0] if self.fits else None

    def to_markdown(self) -> str:
        lines = [
            f"{len(self.fits)} layouts fit in {self.gpu_memory_gib:g} GiB on {self.num_gpus} GPUs, fastest first "
            f"(global batch {self.global_batch_size}); {len(self.rejected)} rejected.",
            "",
            "| # | TP | PP | CP | DP | SP | recompute | split | peak GiB (stage) | predicted step s | bubble |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
        ]
        for i, f in enumerate(self.fits, 1):
            lay = f.layout
            lines.append(
                f"| {i} | {lay.tp} | {lay.pp} | {lay.cp} | {lay.dp} | {int(lay.sp)} | {f.recompute} | {f.split} "
                f"| {f.memory.peak.total_gib:.2f} ({f.memory.peak_stage}) | {f.cost.step_seconds:.2f} "
                f"| {f.cost.bubble:.1%} |"
            )
        for kind, title in REJECTIONS.items():
            group = [r for r in self.rejected if r.kind == kind]
            if not group:
                continue
            lines += ["", f"Rejected, {title} ({len(group)}; sizes not named: any):", ""]
            lines += ["| layout | reason |", "| --- | --- |"]
            lines += [f"| {r.layout} | {r.reason} |" for r in group]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "num_gpus": self.num_gpus,
            "gpu_memory_gib": self.gpu_memory_gib,
            "global_batch_size": self.global_batch_size,
            "fits": [f.to_dict() for f in self.fits],
            "rejected": [r.to_dict() for r in self.rejected],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def split_text(layout: Layout) -> str:
    """``'even'``, ``'first=46'``, ``'first=18 last=28'`` (Megatron's flags; ``'-'`` without PP)."""
    if layout.pp == 1:
        return "-"
    ends = [f"{k}={v}" for k, v in (("first", layout.first_stage_layers), ("last", layout.last_stage_layers)) if v]
    return " ".join(ends) or "even"


def split_candidates(num_layers: int, pp: int) -> list[tuple[int | None, int | None]]:
    """The (first, last) splits of ``num_layers`` over ``pp`` stages that Megatron builds and that give every
    stage between half and twice the even share (L / PP) of the layers, the even split first; None: that end
    stage gets what a middle stage gets.  Empty when PP > L."""
    if pp == 1:
        return [(None, None)]
    low, high = _share_bounds(num_layers, pp)
    out: list[tuple[int | None, int | None]] = [(None, None)] if num_layers % pp == 0 and pp <= num_layers else []
    if pp == 2:
        firsts = range(max(low, num_layers - high), min(high, num_layers - low) + 1)
        return out + [(first, None) for first in firsts if 2 * first != num_layers]
    for middle in range(low, high + 1):
        ends = num_layers - (pp - 2) * middle
        for first in range(max(low, ends - high), min(high, ends - low) + 1):
            last = ends - first
            if first != middle or last != middle:
                out.append((None if first == middle else first, None if last == middle else last))
    return out


def _share_bounds(num_layers: int, pp: int) -> tuple[int, int]:
    """The fewest and most layers a stage of a candidate split holds: half and twice the even share."""
    return max(1, math.ceil(num_layers / pp / 2)), math.floor(2 * num_layers / pp)


def _no_split(num_layers: int, pp: int) -> str:
    if pp > num_layers:
        return f"PP={pp} is more stages than the model's {num_layers} layers"
    low, high = _share_bounds(num_layers, pp)
    return (
        f"PP={pp} does not divide the model's {num_layers} layers, and no first/last split gives every stage "
        f"{low} to {high} layers"
    )


def sizes(num_gpus: int) -> list[int]:
    """The CP and PP sizes tried: the divisors of ``num_gpus`` and the powers of two up to it."""
    powers = {1 << k for k in range(num_gpus.bit_length()) if 1 << k <= num_gpus}
    return sorted(powers | {d for d in range(1, num_gpus + 1) if num_gpus % d == 0})


def suggest(
    arch: Qwen2Arch,
    work: Workload,
    *,
    num_gpus: int,
    gpu_memory_gib: float = 80.0,
    global_batch_size: int = 32,
    micro_batch_size: int = 1,
    achieved_tflops: float | None = None,
    overhead_gib: float = 1.5,
    overhead_fraction: float = 0.05,
) -> Suggestion:
    """Every layout of ``num_gpus`` GPUs for ``work`` (its ``recompute`` is enumerated, not taken)."""
    for flag, value in (("--num-gpus", num_gpus), ("--global-batch-size", global_batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    check_workload(work)
    memory = {"gpu_memory_gib": gpu_memory_gib, "overhead_gib": overhead_gib, "overhead_fraction": overhead_fraction}
    fits: list[Fit] = []
    rejected: list[Rejection] = []
    for tp in TENSOR_PARALLEL_SIZES:
        if tp > num_gpus:
            continue
        try:
            arch.check_tensor_parallel(tp)
        except ConfigError as e:
            rejected.append(Rejection("tensor", str(e), tp=tp))
            continue
        for cp in sizes(num_gpus):
            if tp * cp > num_gpus:
                continue
            try:
                check_sequence(Layout(tp, cp, sequence_parallel=tp > 1), work)
            except ConfigError as e:
                rejected.append(Rejection("sequence", str(e), tp=tp, cp=cp))
                continue
            for pp in sizes(num_gpus):
                n = tp * cp * pp
                if n > num_gpus:
                    continue
                where = {"tp": tp, "pp": pp, "cp": cp}
                if num_gpus % n:
                    rejected.append(
                        Rejection("world", f"TP x CP x PP = {n} does not divide the {num_gpus} GPUs", **where)
                    )
                    continue
                dp = num_gpus // n
                splits = split_candidates(arch.num_layers, pp)
                if not splits:
                    if not any(r.kind == "pipeline" and r.pp == pp for r in rejected):
                        rejected.append(Rejection("pipeline", _no_split(arch.num_layers, pp), pp=pp))
                    continue
                if global_batch_size % (micro_batch_size * dp):
                    reason = (
                        f"global batch {global_batch_size} is not divisible by micro-batch {micro_batch_size} x DP {dp}"
                    )
                    rejected.append(Rejection("batch", reason, dp=dp, **where))
                    continue
                m = global_batch_size // (micro_batch_size * dp)
                base = Layout(tp, cp, dp, tp > 1, micro_batch_size, pp)
                for recompute in RECOMPUTES:
                    job = replace(work, recompute=recompute)
                    found = _best_split(arch, base, job, splits, m, achieved_tflops, memory)
                    if isinstance(found, Fit):
                        fits.append(found)
                    else:
                        peak, stage, layout = found
                        reason = f"does not fit: {peak:.1f} GiB on stage {stage} > {gpu_memory_gib:g} GiB"
                        split = split_text(layout)
                        rejected.append(Rejection("memory", reason, dp=dp, recompute=recompute, split=split, **where))
    order = {r: i for i, r in enumerate(RECOMPUTES)}
    fits.sort(
        key=lambda f: (
            f.cost.step_seconds,
            f.layout.cp,
            f.layout.tp,
            f.layout.pp,
            order[f.recompute],
            f.memory.peak.total_bytes,
        )
    )
    return Suggestion(num_gpus, gpu_memory_gib, global_batch_size, tuple(fits), tuple(rejected))


def _best_split(
    arch: Qwen2Arch,
    base: Layout,
    work: Workload,
    splits: list[tuple[int | None, int | None]],
    micro_batches: int,
    achieved_tflops: float | None,
    memory: dict[str, float],
) -> Fit | tuple[float, int, Layout]:
    """The fastest of ``splits`` that fits, or (peak GiB, its stage, layout) of the one with the lowest peak.

    A stage's memory depends only on its index, its layer and fast-layer counts and where the fast layers
    sit, so each such stage is planned once."""
    tflops = DEFAULT_ACHIEVED_TFLOPS if achieved_tflops is None else achieved_tflops
    overheads = {k: v for k, v in memory.items() if k != "gpu_memory_gib"}
    stage_totals: dict[tuple[int, int, int, str], int] = {}

    def total(layout: Layout, shape: StageShape) -> int:
        key = (shape.index, len(shape.layers), shape.fast_layers, shape.case)
        if key not in stage_totals:
            _, comps = stage_components(arch, layout, work, shape, **overheads)
            stage_totals[key] = sum(c.bytes for c in comps)
        return stage_totals[key]

    layouts = [replace(base, first_stage_layers=f, last_stage_layers=la) for f, la in splits]
    shapes = [stage_shapes(arch, layout, work, micro_batches) for layout in layouts]
    costs = [shapes_cost(arch, layout, work, s, tflops) for layout, s in zip(layouts, shapes)]
    ranked = sorted(range(len(layouts)), key=lambda i: (costs[i].step_seconds, i))  # the even split first of equals
    lowest: tuple[int, int, Layout] | None = None
    for i in ranked:
        totals = [total(layouts[i], shape) for shape in shapes[i]]
        peak = max(totals)
        if peak / GiB <= memory["gpu_memory_gib"]:  # as MemoryPlan.fits
            plan = pipeline_plan(arch, layouts[i], work, micro_batches=micro_batches, **memory)
            return Fit(layouts[i], work.recompute, micro_batches, plan, costs[i])
        if lowest is None or peak < lowest[0]:
            lowest = (peak, totals.index(peak), layouts[i])
    assert lowest is not None  # splits is never empty
    return lowest[0] / GiB, lowest[1], lowest[2]
