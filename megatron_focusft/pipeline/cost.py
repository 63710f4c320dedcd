"""Predicted time of one training step, stage by stage, from the FLOP model (:mod:`megatron_focusft.flops`).

What each stage computes per micro-batch, in matmul FLOPs on one of its GPUs (the replica's FLOPs / TP x CP;
2 per multiply-add, document-causal attention over ``documents_per_pack`` equal documents, the output layer
at response positions only, as :func:`~megatron_focusft.flops.sft_flops` counts them):

- SFT work: the forward of the stage's layers (+ the output layer on the last stage) and a backward of 2x
  that, plus what recompute runs again in backward (selective: the attention core; full: the whole layer;
  the output layer when its response positions come in more than one ``loss_chunk_tokens`` chunk).
- FocuSFT's inner steps (K of them) over the stage's fast layers: a forward and a backward to the fast
  weights only, where the linears compute input gradients alone (1x their forward; Megatron's frozen linears
  skip the weight-gradient GEMMs) and attention its dQ, dK, dV (2x), plus the output layer's forward and input
  gradient on the last stage.  The LoRA matmuls themselves (under 1% of a layer's) are not counted.

The schedule is Megatron's non-interleaved 1F1B with m micro-batches per step and replica: it takes
(m + P - 1) x the slowest stage's slot, a slot being one micro-batch's forward and backward on that stage.
Where the fast layers sit (the case of :func:`megatron_focusft.memory_plan.stage_shapes`) decides where the
inner steps go:

- local (every fast layer on the last stage, as at PP=1): the last stage runs the one-stage FocuSFT step on
  its layers, so its slot holds the inner steps too; the other stages do SFT work.
- spanning (the fast layers start on stage s0 < P - 1): an inner phase before the schedule.  For each
  micro-batch in turn the stages below s0 run their layers once more without a graph and send on (never
  waiting: they run ahead), s0 runs its non-fast layers so, then the K inner steps go up the fast stages and
  back down to s0, one stage at a time.  The phase takes the first micro-batch's way up to s0, then m chains
  (or, when the stages below are slower, their pace).  The schedule then runs SFT work with every
  micro-batch's fast weights in place.  Stages that could start their 1F1B warm-up under the phase's tail
  are counted as waiting for it (an upper bound).

Seconds are FLOPs at an assumed achieved throughput per GPU (:data:`DEFAULT_ACHIEVED_TFLOPS`, or measured:
``--achieved-tflops``).  Not modelled: communication (TP/SP and CP collectives, pipeline sends, the DP
gradient reduce-scatter and parameter all-gather: overlapped, or inside the achieved throughput), the
optimizer step, the embedding and the norms.  The figures rank layouts; they are not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_focusft import flops
from megatron_focusft.memory_plan import (
    FastCase,
    Layout,
    StageShape,
    Workload,
    check,
    stage_shapes,
)
from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch

# 40% of the H100 SXM's dense bf16 peak: what a well-tuned Megatron run of a dense model reaches (MFU 35-45%).
DEFAULT_ACHIEVED_TFLOPS = 0.4 * flops.PEAK_TFLOPS["H100 SXM"]


@dataclass(frozen=True)
class StageCost:
    """One stage's work per micro-batch on one of its GPUs."""

    stage: int
    layers: range
    fast_layers: int
    forward_flops: float  # the schedule's forward (with graph), output layer included on the last stage
    backward_flops: float  # its backward, recompute included
    inner_flops: float  # the inner steps (local: inside the slot; spanning: the inner phase, + its extra forward)
    seconds: float  # the micro-batch's slot in the 1F1B schedule (forward + backward, + inner steps when local)
    inner_seconds: float  # the micro-batch's share of the inner phase (spanning only)


@dataclass(frozen=True)
class PipelineCost:
    """The predicted step: every stage's cost and the schedule they make."""

    stages: tuple[StageCost, ...]
    micro_batches: int
    achieved_tflops: float
    case: FastCase
    inner_phase_seconds: float  # the spanning case's inner phase before the schedule (0 otherwise)

    @property
    def slowest_stage(self) -> int:
        slots = [s.seconds for s in self.stages]
        return slots.index(max(slots))

    @property
    def schedule_seconds(self) -> float:
        """1F1B: (m + P - 1) slots of the slowest stage."""
        return (self.micro_batches + len(self.stages) - 1) * self.stages[self.slowest_stage].seconds

    @property
    def step_seconds(self) -> float:
        return self.inner_phase_seconds + self.schedule_seconds

    @property
    def imbalance(self) -> float:
        """The slowest stage's slot over the mean slot (1.0: balanced)."""
        slots = [s.seconds for s in self.stages]
        return max(slots) * len(slots) / sum(slots)

    @property
    def bubble(self) -> float:
        """The share of the step the GPUs sit idle: pipeline fill and drain, waiting on a slower stage, the
        serial inner phase.  Balanced SFT: (P - 1) / (m + P - 1)."""
        busy = sum(self.micro_batches * (s.seconds + s.inner_seconds) for s in self.stages)
        return 1.0 - busy / (len(self.stages) * self.step_seconds)

    def table(self) -> str:
        """A Markdown table of the stages and a line on the step (the training loop prints it at start-up)."""
        spanning = self.case == "spanning"
        lines = [
            "| stage | layers | fast | forward TFLOP | backward TFLOP | inner TFLOP | s / micro-batch "
            "| inner phase s |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in self.stages:
            inner = f"{s.inner_flops / 1e12:.3g}" if s.inner_flops else "-"
            phase = f"{s.inner_seconds:.3g}" if spanning else "-"
            lines.append(
                f"| {s.stage} | {s.layers.start}-{s.layers.stop - 1} | {s.fast_layers} | {s.forward_flops / 1e12:.3g} "
                f"| {s.backward_flops / 1e12:.3g} | {inner} | {s.seconds:.3g} | {phase} |"
            )
        m, p = self.micro_batches, len(self.stages)
        slowest = self.stages[self.slowest_stage]
        lines.append(
            f"\npredicted step {self.step_seconds:.3g} s: 1F1B ({m} + {p} - 1) x {slowest.seconds:.3g} s "
            f"(stage {slowest.stage}, the slowest) + inner phase {self.inner_phase_seconds:.3g} s; bubble "
            f"{self.bubble:.1%}, imbalance {self.imbalance:.2f}; per GPU and micro-batch, at an assumed "
            f"{self.achieved_tflops:.0f} TFLOP/s per GPU; communication not modelled"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "case": self.case,
            "micro_batches": self.micro_batches,
            "achieved_tflops": self.achieved_tflops,
            "stages": [
                {
                    "stage": s.stage,
                    "layers": [s.layers.start, s.layers.stop - 1],
                    "fast_layers": s.fast_layers,
                    "forward_flops": s.forward_flops,
                    "backward_flops": s.backward_flops,
                    "inner_flops": s.inner_flops,
                    "seconds": s.seconds,
                    "inner_seconds": s.inner_seconds,
                }
                for s in self.stages
            ],
            "inner_phase_seconds": self.inner_phase_seconds,
            "schedule_seconds": self.schedule_seconds,
            "step_seconds": self.step_seconds,
            "slowest_stage": self.slowest_stage,
            "bubble": self.bubble,
            "imbalance": self.imbalance,
        }


def pipeline_cost(
    arch: Qwen2Arch, layout: Layout, work: Workload, micro_batches: int, achieved_tflops: float | None = None
) -> PipelineCost:
    """The predicted step of ``layout`` (TP, CP, PP and its split; DP sets nothing here but the
    ``micro_batches`` per step and replica the caller derives) running ``work``."""
    check(arch, layout, work)
    tflops = DEFAULT_ACHIEVED_TFLOPS if achieved_tflops is None else achieved_tflops
    if not tflops > 0:
        raise ConfigError(f"--achieved-tflops must be > 0, got {tflops}")
    return shapes_cost(arch, layout, work, stage_shapes(arch, layout, work, micro_batches), tflops)


def shapes_cost(
    arch: Qwen2Arch, layout: Layout, work: Workload, shapes: list[StageShape], achieved_tflops: float
) -> PipelineCost:
    """:func:`pipeline_cost` of the stages ``shapes`` (:func:`~megatron_focusft.memory_plan.stage_shapes`) of a
    layout :func:`~megatron_focusft.memory_plan.check` accepted (the layout search shares them with the plan)."""
    stages = tuple(stage_cost(arch, layout, work, shape, achieved_tflops) for shape in shapes)
    m, case = shapes[0].micro_batches, shapes[0].case
    inner = inner_phase_seconds(stages, m) if case == "spanning" else 0.0
    return PipelineCost(stages, m, achieved_tflops, case, inner)


def stage_cost(arch: Qwen2Arch, layout: Layout, work: Workload, shape: StageShape, achieved_tflops: float) -> StageCost:
    """Stage ``shape``'s work per micro-batch on one GPU (the module docstring says what is counted)."""
    seq, b = work.seq_length, layout.micro_batch_size
    docs = max(1, work.documents_per_pack)
    lengths = [seq // docs + (i < seq % docs) for i in range(docs)]
    responses = math.ceil(work.response_fraction * seq) * b
    linear = seq * b * flops.layer_flops_per_token(arch)  # one layer's forward
    attention = b * flops.attention_flops(arch, flops.causal_pairs(lengths))
    again = {"none": 0, "selective": attention, "full": linear + attention}[work.recompute]  # recomputed
    head = flops.output_layer_flops(arch, responses) if shape.last else 0
    head_again = head if responses > work.loss_chunk_tokens else 0  # chunks are recomputed in backward
    n, n_fast = len(shape.layers), shape.fast_layers

    forward = n * (linear + attention) + head
    backward = 2 * forward + n * again + head_again
    inner = 0.0
    if n_fast:
        step = n_fast * (linear + attention + linear + 2 * attention + again) + 2 * head + head_again
        inner = work.inner_steps * step
    if shape.case == "spanning":
        inner += shape.non_fast_layers * (linear + attention)  # the inner phase's forward without a graph
    slot = forward + backward + (inner if shape.case == "local" else 0.0)
    per_gpu = layout.tp * layout.cp
    rate = achieved_tflops * 1e12 * per_gpu
    return StageCost(
        stage=shape.index,
        layers=shape.layers,
        fast_layers=n_fast,
        forward_flops=forward / per_gpu,
        backward_flops=backward / per_gpu,
        inner_flops=inner / per_gpu,
        seconds=slot / rate,
        inner_seconds=inner / rate if shape.case == "spanning" else 0.0,
    )


def inner_phase_seconds(stages: tuple[StageCost, ...], micro_batches: int) -> float:
    """The spanning case's inner phase: the stages below the first fast stage s0 forward each micro-batch
    once (their pace: the slowest of them), and the chain s0..P-1 takes every micro-batch in turn."""
    s0 = next(s.stage for s in stages if s.fast_layers)
    below = [s.inner_seconds for s in stages[:s0]]
    chain = sum(s.inner_seconds for s in stages[s0:])
    pace = max(below, default=0.0)
    return sum(below) + max(micro_batches * chain, (micro_batches - 1) * pace + chain)
