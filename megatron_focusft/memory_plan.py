"""Per-GPU memory of a training run, predicted from the architecture and the parallel layout.

bf16 training on GPUs with Megatron's distributed optimizer (``tools/train.py --device cuda``).  Every
component is computed separately, in bytes on one GPU of one pipeline stage (:func:`plan`; every stage:
:func:`pipeline_plan`; without pipeline parallelism the one stage is the whole model):

``parameters``
    bf16 (2 bytes).  Linear weights, the QKV bias, the embedding and the (untied) output layer are split
    over TP (embedding/output vocab-parallel over the padded vocabulary); the RMSNorm weights are replicated.
    Under PP a stage holds its decoder layers; the first stage the embedding; the last the final norm and the
    output layer, which with tied embeddings is a copy of the embedding (Megatron all-reduces the two
    gradients), so a tied model holds the table twice once PP > 1.
``gradient buffer``
    fp32 (4 bytes per local parameter): ``grad_reduce_in_fp32=True``.
``optimizer state``
    fp32 master weights + Adam m and v (12 bytes per local parameter), sharded over the data-parallel
    group, which for the distributed optimizer is DP x CP.
``activations``
    What the autograd graph keeps per layer per token (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", adapted; see :func:`layer_activation_terms`), times the
    layers whose graph is alive at the peak.  Under FocuSFT: the bottom layers' graph (kept for the outer
    backward) + the top layers' graph of the pass running (outer or inner; an inner pass's graph is
    released by its ``autograd.grad``, see :mod:`megatron_focusft.bilevel`) + the fast-weight LoRA
    activations of the top layers.  (``inner_graph="kept"`` adds one more top-layer graph: what the step
    cost before it dropped its last reference to the last inner pass's graph, since ``autograd.grad``
    frees only the nodes it ran; kept for comparison.)
    Under PP, Megatron's non-interleaved 1F1B schedule runs ``min(P - s, m)`` warm-up forwards on stage s
    (m micro-batches per step), so stage s keeps the graphs of that many micro-batches: the first stage the
    most, the last one.  Where the fast layers sit decides the rest (:func:`stage_shapes`): all on the last
    stage ("local"), that stage runs the one-stage step above on its layers; spread over stages s0..P-1
    ("spanning"), an inner phase before the 1F1B schedule adapts every micro-batch's fast weights (one
    inner pass's graph of a stage's fast layers at a time), which the fast stages keep until the schedule,
    which then runs plain SFT with them in place.  A spanning stage's peak is the larger of its two phases.
``pipeline buffers``
    PP > 1: the activation each in-flight micro-batch received from the stage below (kept by the schedule;
    under full recompute it is the first layer's checkpointed input, already counted) and the one it sent
    on (Megatron keeps it unless ``deallocate_pipeline_outputs``): bf16 [s(/TP under SP), h] each.
``activation working set``
    What exists only while one layer runs backward: the gradients of one layer's activations (about one
    layer's stored activations); under full recompute the recomputed layer's activations; under selective
    recompute with the dense backend one layer's S x S scores; under CP the gradients of the all-gathered
    K and V.
``output head``
    The last stage only.  The final norm and, at response positions only (``response_fraction`` x S), the
    selected hidden states and the fp32 logits of the vocab-parallel cross entropy (V/TP columns; the kept
    softmax plus one fp32 copy, 8 bytes), for at most ``loss_chunk_tokens`` positions at a time (longer:
    chunks recomputed).
``fast weights``
    FocuSFT's per-document LoRA tensors (fp32, TP-sharded as in :mod:`megatron_focusft.fast_weights`) of the
    stage's fast layers: the current ones, their gradients and the updated copy during an inner update (3x).
    Spanning stages keep the adapted copy of all m micro-batches for the 1F1B schedule (m copies; m + 2 while
    the last one adapts).
``overhead``
    CUDA context, NCCL buffers and allocator fragmentation: ``overhead_gib`` + ``overhead_fraction`` x the
    sum of the components above (1.5 GiB + 5% by default).

The numbers are predictions: they have not yet been checked against measured GPU peaks at scale
(``tests/test_memory_plan.py::test_prediction_matches_cuda_peak`` does so on a small model on a GPU).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch
from megatron_focusft.pipeline.split import PipelineSplit, PipelineSplitError

GiB = 1024**3
Recompute = Literal["none", "selective", "full"]
Backend = Literal["flex", "dense"]
FastCase = Literal["none", "local", "spanning"]  # where the fast layers sit: see stage_shapes()
Phase = Literal["schedule", "inner"]  # the step (under PP its 1F1B schedule); the spanning case's inner phase
BACKENDS: tuple[str, ...] = get_args(Backend)  # the attention backends the plan models
BF16, FP32 = 2, 4
ADAM_STATE_BYTES = 12  # fp32 master weight + Adam m + Adam v


@dataclass(frozen=True)
class Layout:
    """Parallel layout of one model replica and the micro-batch each GPU runs; ``pp`` stages split as
    Megatron does (evenly, or ``first_stage_layers``/``last_stage_layers`` on the end stages and the rest
    evenly: ``--decoder-first/last-pipeline-num-layers``)."""

    tp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    pp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def split(self, num_layers: int) -> PipelineSplit:
        """The decoder layers of each pipeline stage of a model of ``num_layers``."""
        return PipelineSplit(num_layers, self.pp, self.first_stage_layers, self.last_stage_layers)


@dataclass(frozen=True)
class Workload:
    """What one micro step does: pack length, recompute, attention backend, SFT or FocuSFT."""

    seq_length: int = 4096
    recompute: Recompute = "none"
    attention_backend: Backend = "flex"
    focusft: bool = True
    inner_steps: int = 2
    layer_fraction: float = 0.35
    lora_rank: int = 32
    documents_per_pack: int = 8
    response_fraction: float = 0.15
    targets: tuple[str, ...] = ("gate", "up", "down")
    inner_graph: Literal["freed", "kept"] = "freed"
    loss_chunk_tokens: int = 4096  # FocuSFTConfig.loss_chunk_tokens: response positions per output-layer chunk

    @property
    def uses_fast_weights(self) -> bool:
        return self.focusft and self.inner_steps > 0

    def fast_layer_count(self, num_layers: int) -> int:
        """As :meth:`FocuSFTConfig.fast_layers`: layers ``int(L * (1 - fraction)) .. L-1``."""
        return num_layers - int(num_layers * (1 - self.layer_fraction)) if self.uses_fast_weights else 0

    def fast_layers(self, num_layers: int) -> range:
        """The global indices of the fast layers (empty without fast weights)."""
        return range(num_layers - self.fast_layer_count(num_layers), num_layers)


@dataclass(frozen=True)
class StageShape:
    """One pipeline stage as the memory plan and the cost model see it (PP=1: the whole model, which is the
    first and the last stage at once)."""

    index: int
    stages: int
    layers: range  # global decoder-layer indices
    fast_layers: int  # how many of them carry fast weights
    micro_batches: int  # per optimizer step and model replica
    case: FastCase  # where the model's fast layers sit (the same for every stage)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    @property
    def non_fast_layers(self) -> int:
        return len(self.layers) - self.fast_layers

    @property
    def in_flight(self) -> int:
        """Micro-batches whose graph the stage keeps at once: the 1F1B warm-up, ``min(P - s, m)``."""
        return min(self.stages - self.index, self.micro_batches)

    def describe(self) -> str:
        """``'stage 1: layers 40-79 + final norm, output layer'``."""
        ends = [what for on, what in ((self.first, "embedding"), (self.last, "final norm, output layer")) if on]
        return f"stage {self.index}: layers {self.layers.start}-{self.layers.stop - 1}" + "".join(
            f" + {e}" for e in ends
        )


def stage_shapes(arch: Qwen2Arch, layout: Layout, work: Workload, micro_batches: int | None = None) -> list[StageShape]:
    """Every stage's shape; ``micro_batches`` (per step and replica) may be left out only at PP=1.

    Where the fast layers sit (``case``): none without fast weights; local when every one is on the last
    stage (always at PP=1, and at PP=2 with the 35% default), which then runs the one-stage step on its
    layers; spanning when they start on an earlier stage, so an inner phase runs through the fast stages
    before the 1F1B schedule."""
    if micro_batches is None:
        if layout.pp > 1:
            raise ConfigError("the pipeline plan needs the micro-batches per step and replica (--micro-batches)")
        micro_batches = 1
    if micro_batches < 1:
        raise ConfigError(f"--micro-batches must be >= 1, got {micro_batches}")
    ranges = layout.split(arch.num_layers).ranges()
    fast = work.fast_layers(arch.num_layers)
    case: FastCase = "none" if not fast else "local" if ranges[-1].start <= fast.start else "spanning"
    return [
        StageShape(s, layout.pp, r, len(range(max(r.start, fast.start), min(r.stop, fast.stop))), micro_batches, case)
        for s, r in enumerate(ranges)
    ]


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    note: str

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class MemoryPlan:
    components: list[Component]
    gpu_memory_gib: float
    description: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_memory_gib

    def __getitem__(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_markdown(self) -> str:
        lines = ["| component | GiB | what |", "| --- | ---: | --- |"]
        lines += [f"| {c.name} | {c.gib:.2f} | {c.note} |" for c in self.components]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"| **total** | **{self.total_gib:.2f}** | {verdict} in {self.gpu_memory_gib:g} GiB |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            **self.description,
            "components": {c.name: {"bytes": c.bytes, "gib": round(c.gib, 4), "note": c.note} for c in self.components},
            "total_bytes": self.total_bytes,
            "total_gib": round(self.total_gib, 4),
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": self.fits,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class PipelinePlan:
    """The plan of every pipeline stage (one at PP=1, shown and written exactly as that one plan)."""

    stages: tuple[MemoryPlan, ...]

    @property
    def peak_stage(self) -> int:
        """The stage with the largest total (the first of equals)."""
        totals = [p.total_bytes for p in self.stages]
        return totals.index(max(totals))

    @property
    def peak(self) -> MemoryPlan:
        return self.stages[self.peak_stage]

    @property
    def fits(self) -> bool:
        return self.peak.fits

    def to_markdown(self) -> str:
        if len(self.stages) == 1:
            return self.stages[0].to_markdown()
        # the last stage has every kind of component any stage has (the output head, fast weights if any)
        names = list(dict.fromkeys(c.name for p in reversed(self.stages) for c in p.components))
        peak = self.peak_stage
        head = " | ".join(f"stage {s}" for s in range(len(self.stages)))
        lines = [f"| component (GiB) | {head} | what (stage {peak}, the peak) |"]
        lines.append("| --- | " + "---: | " * len(self.stages) + "--- |")
        for name in names:
            cells = []
            for p in self.stages:
                have = [c for c in p.components if c.name == name]
                cells.append(f"{have[0].gib:.2f}" if have else "-")
            notes = {s: c.note for s, p in enumerate(self.stages) for c in p.components if c.name == name}
            note = notes[peak] if peak in notes else f"stage {max(notes)}: {notes[max(notes)]}"
            lines.append(f"| {name} | {' | '.join(cells)} | {note} |")
        totals = " | ".join(f"**{p.total_gib:.2f}**" for p in self.stages)
        verdict = "fits" if self.fits else "does NOT fit"
        gpu = self.peak.gpu_memory_gib
        lines.append(f"| **total** | {totals} | peak: stage {peak}, {verdict} in {gpu:g} GiB |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        if len(self.stages) == 1:
            return self.stages[0].to_dict()
        common = {k: v for k, v in self.peak.description.items() if k != "stage"}
        return {
            **common,
            "stages": [p.to_dict() for p in self.stages],
            "peak_stage": self.peak_stage,
            "peak_gib": round(self.peak.total_gib, 4),
            "gpu_memory_gib": self.peak.gpu_memory_gib,
            "fits": self.fits,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---- checks ------------------------------------------------------------------------------------------


def check(arch: Qwen2Arch, layout: Layout, work: Workload) -> None:
    """Raise :class:`ConfigError` naming the first setting this plan (or Megatron) cannot run."""
    for name in ("tp", "cp", "dp", "micro_batch_size"):
        if getattr(layout, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(layout, name)}")
    arch.check_tensor_parallel(layout.tp)
    try:
        layout.split(arch.num_layers).validate()
    except PipelineSplitError as e:
        raise ConfigError(str(e)) from None
    check_sequence(layout, work)
    check_workload(work)


def check_sequence(layout: Layout, work: Workload) -> None:
    """Raise :class:`ConfigError` if CP (and TP under SP) cannot split the sequence."""
    if work.seq_length < 1:
        raise ConfigError(f"sequence length must be >= 1, got {work.seq_length}")
    if work.seq_length % (2 * layout.cp if layout.cp > 1 else 1):
        raise ConfigError(f"context-parallel size {layout.cp} needs a sequence length divisible by 2*CP")
    if layout.sp and (work.seq_length // layout.cp) % layout.tp:
        raise ConfigError(f"sequence parallel: the per-CP-rank sequence is not divisible by TP={layout.tp}")


def check_workload(work: Workload) -> None:
    """Raise :class:`ConfigError` naming the first setting of ``work`` the plan cannot model."""
    if work.recompute not in ("none", "selective", "full"):
        raise ConfigError(f"recompute must be none, selective or full, got {work.recompute!r}")
    if work.attention_backend not in ("flex", "dense"):
        raise ConfigError(f"attention backend must be flex or dense, got {work.attention_backend!r}")
    if not 0.0 <= work.response_fraction <= 1.0:
        raise ConfigError(f"response fraction must be in [0, 1], got {work.response_fraction}")
    if work.focusft and not 0.0 < work.layer_fraction <= 1.0:
        raise ConfigError(f"FocuSFT layer fraction must be in (0, 1], got {work.layer_fraction}")
    if work.uses_fast_weights and (work.lora_rank < 1 or work.documents_per_pack < 1):
        raise ConfigError("FocuSFT needs lora rank >= 1 and documents per pack >= 1")


# ---- parameters ----------------------------------------------------------------------------------------


def parameter_count(
    arch: Qwen2Arch, tp: int = 1, *, layers: int | None = None, first: bool = True, last: bool = True
) -> int:
    """Parameters held by one tensor-parallel rank (padded vocabulary; norms replicated) of a pipeline stage
    of ``layers`` decoder layers (default: all), with the embedding if it is the ``first`` stage and the final
    norm and output layer if it is the ``last``: the tied table is counted once when the stage is both (one
    tensor), twice across two stages (the last one's copy)."""
    arch.check_tensor_parallel(tp)
    h, f, kv = arch.hidden_size, arch.ffn_hidden_size, arch.num_key_value_heads * arch.head_dim
    qkv_out = (h + 2 * kv) // tp
    per_layer = qkv_out * h + qkv_out + h * (h // tp) + (2 * f // tp) * h + h * (f // tp) + 2 * h
    vocab = arch.padded_vocab_size // tp * h
    n = (arch.num_layers if layers is None else layers) * per_layer
    if first:
        n += vocab
    if last:
        n += h + (0 if first and arch.tie_word_embeddings else vocab)
    return n


# ---- activations -------------------------------------------------------------------------------------


def layer_activation_terms(arch: Qwen2Arch, layout: Layout, work: Workload) -> dict[str, float]:
    """Bytes one decoder layer keeps for backward, per token of this rank's (CP-local) sequence, b=1.

    Korthikanti et al.'s 34 s b h (+ 5 a s^2 b) per layer, adapted (bf16, 2 bytes, unless noted):

    - RMSNorm (x2; replaces LayerNorm's 2h input): this repository's norm computes in fp32, so it keeps the
      fp32 input (4h), the fp32 rsqrt (4) and the bf16 normalised input of the weight multiply (2h); its
      output (2h) is kept as the next linear's input.  All divided by TP under sequence parallelism (the
      column-parallel linears keep their local input and all-gather it again in backward).
    - GQA: the fused QKV output (h + 2 kv) stays alive because V is a view of it; RoPE adds new rotated
      Q and K (h + kv) and its cos/sin tables (4 x head_dim, not split by TP).
    - flash/flex attention: the output O (2h, also linear_proj's input) and the fp32 log-sum-exp per query
      per head (4 a); no S^2 term.  Dense (math SDPA): + the fp32 scores per head (4 a S).
    - SwiGLU: fc1's [gate; up] output (2 x 2f), silu(gate) (2f), ``up + glu_linear_offset`` (2f, a copy
      Megatron's glu makes), the product = fc2's input (2f).
    - no dropout: no masks; bias-dropout-add keeps nothing.
    - selective recompute: the attention core keeps nothing of its own (lse, scores); Q, K, V are its
      checkpointed inputs and O is linear_proj's input, so only the lse / S^2 terms go.
    """
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    kv, a, t = arch.num_key_value_heads * d, arch.num_attention_heads, layout.tp
    sp = t if layout.sp else 1
    seq = work.seq_length  # keys each query sees (the whole sequence: CP all-gathers K/V)
    norms = 2 * (FP32 * h + FP32 + BF16 * h + BF16 * h) / sp
    terms = {"rmsnorm x2 (fp32 input, rsqrt, normalised bf16, output)": norms}
    if layout.cp > 1:
        # V is all-gathered, so no view keeps the local fused QKV output, and the local rotated K only feeds
        # the all-gather; the kernel keeps the rotated local Q and the whole sequence's K and V (CP x local).
        terms["RoPE: rotated Q"] = BF16 * h / t
        terms["all-gathered K, V (the whole sequence, CP)"] = BF16 * 2 * kv / t * layout.cp
    else:
        terms["fused QKV output (V is a view of it)"] = BF16 * (h + 2 * kv) / t
        terms["RoPE: rotated Q, K"] = BF16 * (h + kv) / t
    terms |= {
        "RoPE cos/sin for Q and K": 4 * BF16 * d,
        "attention output O": BF16 * h / t,
        "SwiGLU: fc1 out, silu(gate), up + offset, fc2 input": BF16 * (2 * f + f + f + f) / t,
    }
    if work.recompute == "none":
        terms["attention log-sum-exp (fp32)"] = FP32 * a / t
        if work.attention_backend == "dense":
            terms["dense attention scores (fp32, S per head)"] = FP32 * a / t * seq
    return terms


def layer_activation_bytes(arch: Qwen2Arch, layout: Layout, work: Workload, stored: bool = True) -> float:
    """Bytes per token of one layer's graph; ``stored=False``: as if nothing were recomputed."""
    if not stored:
        work = replace(work, recompute="none")
    return sum(layer_activation_terms(arch, layout, work).values())


def _micro_batches(n: int) -> str:
    return f"{n} micro-batch" + ("es" if n > 1 else "")


def _local_tokens(layout: Layout, work: Workload) -> int:
    return work.seq_length // layout.cp * layout.micro_batch_size


def activation_components(
    arch: Qwen2Arch, layout: Layout, work: Workload, shape: StageShape | None = None, phase: Phase = "schedule"
) -> list[Component]:
    """The activation components (graph, working set, pipeline buffers, output head) in bytes on one GPU of
    stage ``shape`` (default: the whole model, PP=1) during ``phase``: the step (under PP its 1F1B schedule)
    or, on a stage of the spanning case's fast layers, the inner phase before it."""
    shape = shape or stage_shapes(arch, layout, work)[0]
    h, t = arch.hidden_size, layout.tp
    sp = t if layout.sp else 1
    tokens = _local_tokens(layout, work)
    n_top, n_bottom = shape.fast_layers, shape.non_fast_layers
    full_layer = layer_activation_bytes(arch, layout, work, stored=False) * tokens
    if work.recompute == "full":
        stored_layer = BF16 * h / sp * tokens  # only each layer's input is checkpointed
    else:
        stored_layer = layer_activation_bytes(arch, layout, work) * tokens
    lora = 0.0
    if work.uses_fast_weights:
        # per fast layer: fc1's A x (r wide, all-gathered to the whole sequence under SP) for gate and up,
        # fc2's A x (r wide, reduce-scattered under SP) for down; bf16.
        r = work.lora_rank
        lora = sum(BF16 * r * (1 if tg != "down" else 1 / sp) for tg in work.targets) * tokens
    passes = 2 if work.inner_graph == "kept" else 1  # top-layer graphs alive while one pass runs
    mode = {"none": "everything", "selective": "no attention-core state", "full": "layer inputs only"}
    stores = f"stores {mode[work.recompute]}"
    kept = "; + the last inner pass's top graph" if work.inner_graph == "kept" else ""
    in_flight = shape.in_flight if phase == "schedule" else 1
    if phase == "inner":  # one inner pass over this stage's fast layers (the layers below ran without a graph)
        graph = (stored_layer + lora) * n_top * passes
        notes = f"inner phase: one inner pass over its {n_top} fast layers; {stores}{kept}"
    elif shape.case == "local" and n_top:  # the one-stage step on the last stage, one micro-batch in flight
        top_graphs = n_top * passes
        graph = stored_layer * (n_bottom + top_graphs)
        graph += lora * top_graphs
        notes = f"bottom layers once + top layers of one pass; {stores}{kept}"
        if shape.stages > 1:
            notes = f"1 micro-batch in flight: {notes}"
    else:  # SFT work (the spanning case's fast stages: with the micro-batch's fast weights in place)
        graph = in_flight * (stored_layer * len(shape.layers) + lora * n_top)
        notes = f"all layers; {stores}"
        if shape.stages > 1:
            notes = f"{_micro_batches(in_flight)} in flight (1F1B warm-up) x {len(shape.layers)} layers; {stores}"

    working = full_layer  # gradients of one layer's activations while it runs backward
    if work.recompute == "full":
        working += full_layer  # the layer being recomputed
    if work.attention_backend == "dense" and work.recompute != "none":
        working += FP32 * arch.num_attention_heads / t * work.seq_length * tokens  # one layer's recomputed scores
    kv = arch.num_key_value_heads * arch.head_dim
    if layout.cp > 1:
        # the gradients of the all-gathered K and V, before their reduce-scatter
        working += 2 * BF16 * kv / t * work.seq_length * layout.micro_batch_size
    working_note = "grads of one layer's activations" + (" + its recomputation" if work.recompute == "full" else "")
    if layout.cp > 1:
        working_note += " + grads of the all-gathered K, V (CP)"
    comps = [
        Component("activations", round(graph), notes),
        Component("activation working set", round(working), working_note),
    ]
    if shape.stages > 1:
        received = not shape.first and work.recompute != "full"
        buffers = in_flight * (int(not shape.last) + int(received)) * BF16 * h / sp * tokens
        what = " + ".join(w for on, w in ((received, "received"), (not shape.last, "sent")) if on) or "none"
        note = f"{what} activation of {_micro_batches(in_flight)}, bf16"
        comps.append(Component("pipeline buffers", round(buffers), note))

    if shape.last:
        responses = math.ceil(work.response_fraction * tokens)
        logit_rows = min(responses, work.loss_chunk_tokens)  # longer: chunks, each recomputed in backward
        head = (FP32 * h + FP32 + BF16 * h + BF16 * h) / sp * tokens  # final norm (as in a layer)
        head += BF16 * h * responses  # selected hidden states (output layer's input)
        # the fp32 softmax the vocab-parallel CE keeps + one more fp32 copy (forward: the max-shifted logits;
        # backward: their gradient)
        head += 2 * FP32 * arch.padded_vocab_size / t * logit_rows
        head_note = f"final norm; fp32 logits x2 at {logit_rows} of {responses} response positions at a time, V/TP"
        comps.append(Component("output head", round(head), head_note))
    if work.attention_backend == "dense":
        # one S x S bool mask per micro-batch (shared by every layer and pass)
        mask_note = "S x S bool, once" if in_flight == 1 else f"S x S bool, once per micro-batch x {in_flight}"
        comps.append(Component("dense attention mask", in_flight * tokens * work.seq_length, mask_note))
    return comps


def fast_weight_bytes(arch: Qwen2Arch, layout: Layout, work: Workload, layers: int | None = None) -> int:
    """FocuSFT's fast weights of one micro-batch on one rank (fp32), one copy, on ``layers`` fast layers
    (default: all of them)."""
    if not work.uses_fast_weights:
        return 0
    h, f, r, t = arch.hidden_size, arch.ffn_hidden_size, work.lora_rank, layout.tp
    per_doc = sum(r * (f // t) + h * r if tg == "down" else r * h + (f // t) * r for tg in work.targets)
    docs = work.documents_per_pack * layout.micro_batch_size
    return FP32 * per_doc * docs * (work.fast_layer_count(arch.num_layers) if layers is None else layers)


# ---- the plan -----------------------------------------------------------------------------------------


def plan(
    arch: Qwen2Arch,
    layout: Layout,
    work: Workload,
    *,
    stage: int = 0,
    micro_batches: int | None = None,
    gpu_memory_gib: float = 80.0,
    overhead_gib: float = 1.5,
    overhead_fraction: float = 0.05,
) -> MemoryPlan:
    """Predicted per-GPU memory of bf16 training with the distributed optimizer on pipeline stage ``stage``
    (PP=1: the whole model); ``micro_batches`` per step and replica (needed when PP > 1)."""
    check(arch, layout, work)
    if not 0 <= stage < layout.pp:
        raise ConfigError(f"stage {stage} is not one of the {layout.pp} pipeline stages")
    shape = stage_shapes(arch, layout, work, micro_batches)[stage]
    return stage_plan(
        arch,
        layout,
        work,
        shape,
        gpu_memory_gib=gpu_memory_gib,
        overhead_gib=overhead_gib,
        overhead_fraction=overhead_fraction,
    )


def pipeline_plan(
    arch: Qwen2Arch,
    layout: Layout,
    work: Workload,
    *,
    micro_batches: int | None = None,
    gpu_memory_gib: float = 80.0,
    overhead_gib: float = 1.5,
    overhead_fraction: float = 0.05,
) -> PipelinePlan:
    """:func:`plan` of every pipeline stage."""
    check(arch, layout, work)
    return PipelinePlan(
        tuple(
            stage_plan(
                arch,
                layout,
                work,
                shape,
                gpu_memory_gib=gpu_memory_gib,
                overhead_gib=overhead_gib,
                overhead_fraction=overhead_fraction,
            )
            for shape in stage_shapes(arch, layout, work, micro_batches)
        )
    )


def stage_plan(
    arch: Qwen2Arch,
    layout: Layout,
    work: Workload,
    shape: StageShape,
    *,
    gpu_memory_gib: float = 80.0,
    overhead_gib: float = 1.5,
    overhead_fraction: float = 0.05,
) -> MemoryPlan:
    """The plan of stage ``shape`` (one of :func:`stage_shapes`) of a layout :func:`check` accepted."""
    phase, comps = stage_components(
        arch, layout, work, shape, overhead_gib=overhead_gib, overhead_fraction=overhead_fraction
    )
    description = {
        "architecture": arch.to_dict(),
        "layout": asdict(layout),
        "workload": asdict(work),
    }
    if shape.stages > 1:
        description["stage"] = {
            "index": shape.index,
            "layers": [shape.layers.start, shape.layers.stop - 1],
            "fast_layers": shape.fast_layers,
            "micro_batches": shape.micro_batches,
            "in_flight": shape.in_flight,
            "case": shape.case,
            "phase": phase,
        }
    return MemoryPlan(comps, gpu_memory_gib, description)


def stage_components(
    arch: Qwen2Arch,
    layout: Layout,
    work: Workload,
    shape: StageShape,
    *,
    overhead_gib: float = 1.5,
    overhead_fraction: float = 0.05,
) -> tuple[Phase, list[Component]]:
    """Stage ``shape``'s components at its peak, and the phase of that peak: a spanning fast stage peaks in
    the larger of the inner phase and the 1F1B schedule, every other stage in the schedule.  (The layout
    search sums these for thousands of splits of a layout it checked once.)"""
    if overhead_gib < 0 or overhead_fraction < 0:
        raise ConfigError("overhead must be >= 0")
    phases: tuple[Phase, ...] = ("schedule",)
    if shape.case == "spanning" and shape.fast_layers:
        phases = ("schedule", "inner")
    found = [
        (phase, _phase_components(arch, layout, work, shape, phase, overhead_gib, overhead_fraction))
        for phase in phases
    ]
    return max(found, key=lambda pc: sum(c.bytes for c in pc[1]))


def _phase_components(
    arch: Qwen2Arch,
    layout: Layout,
    work: Workload,
    shape: StageShape,
    phase: Phase,
    overhead_gib: float,
    overhead_fraction: float,
) -> list[Component]:
    n = parameter_count(arch, layout.tp, layers=len(shape.layers), first=shape.first, last=shape.last)
    shards = layout.dp * layout.cp
    where = f"; {shape.describe()}" if shape.stages > 1 else ""
    comps = [
        Component("parameters", BF16 * n, f"bf16, {n / 1e6:.1f}M per rank (TP={layout.tp}){where}"),
        Component("gradient buffer", FP32 * n, "fp32 main_grad (grad_reduce_in_fp32)"),
        Component(
            "optimizer state",
            math.ceil(ADAM_STATE_BYTES * n / shards),
            f"fp32 master + Adam m, v; sharded over DP x CP = {shards}",
        ),
    ]
    comps += activation_components(arch, layout, work, shape, phase)
    if shape.fast_layers:
        fw = fast_weight_bytes(arch, layout, work, shape.fast_layers)
        m = shape.micro_batches
        if shape.case == "local":
            copies, note = 3, "fp32 LoRA per document: weights, grads, update (3 copies)"
        elif phase == "schedule":
            copies, note = m, f"fp32 LoRA per document: the adapted copy of each of the {m} micro-batches"
        else:
            copies = m + 2
            note = f"fp32 LoRA per document: {m - 1} adapted copies kept + weights, grads, update of the last"
        comps.append(Component("fast weights", copies * fw, note))
    subtotal = sum(c.bytes for c in comps)
    overhead = round(overhead_gib * GiB + overhead_fraction * subtotal)
    note = f"CUDA context/NCCL {overhead_gib:g} GiB + {overhead_fraction:.0%} fragmentation"
    comps.append(Component("overhead", overhead, note))
    return comps
