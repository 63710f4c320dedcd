"""Per-GPU memory of a training run, predicted from the architecture and the parallel layout.

bf16 training on GPUs with Megatron's distributed optimizer (``tools/train.py --device cuda``), one
pipeline stage.  Every component is computed separately, in bytes on one GPU:

``parameters``
    bf16 (2 bytes).  Linear weights, the QKV bias, the embedding and the (untied) output layer are split
    over TP (embedding/output vocab-parallel over the padded vocabulary); the RMSNorm weights are replicated.
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
``activation working set``
    What exists only while one layer runs backward: the gradients of one layer's activations (about one
    layer's stored activations); under full recompute the recomputed layer's activations; under selective
    recompute with the dense backend one layer's S x S scores; under CP the gradients of the all-gathered
    K and V.
``output head``
    The final norm and, at response positions only (``response_fraction`` x S), the selected hidden states
    and the fp32 logits of the vocab-parallel cross entropy (V/TP columns; the kept softmax plus one fp32
    copy, 8 bytes), for at most ``loss_chunk_tokens`` positions at a time (longer: chunks recomputed).
``fast weights``
    FocuSFT's per-document LoRA tensors (fp32, TP-sharded as in :mod:`megatron_focusft.fast_weights`):
    the current ones, their gradients and the updated copy during an inner update (3x).
``overhead``
    CUDA context, NCCL buffers and allocator fragmentation: ``overhead_gib`` + ``overhead_fraction`` x the
    sum of the components above (1.5 GiB + 5% by default).

The numbers are predictions: they have not yet been checked against measured GPU peaks at scale
(``tests/test_memory_plan.py::test_prediction_matches_cuda_peak`` does so on a small model on a GPU).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from megatron_focusft.models.qwen2 import ConfigError, Qwen2Arch

GiB = 1024**3
Recompute = Literal["none", "selective", "full"]
Backend = Literal["flex", "dense"]
BACKENDS: tuple[str, ...] = get_args(Backend)  # the attention backends the plan models
BF16, FP32 = 2, 4
ADAM_STATE_BYTES = 12  # fp32 master weight + Adam m + Adam v


@dataclass(frozen=True)
class Layout:
    """Parallel layout of one model replica and the micro-batch each GPU runs."""

    tp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1


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


# ---- checks ------------------------------------------------------------------------------------------


def check(arch: Qwen2Arch, layout: Layout, work: Workload) -> None:
    """Raise :class:`ConfigError` naming the first setting this plan (or Megatron) cannot run."""
    for name in ("tp", "cp", "dp", "micro_batch_size"):
        if getattr(layout, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(layout, name)}")
    arch.check_tensor_parallel(layout.tp)
    if work.seq_length < 1:
        raise ConfigError(f"sequence length must be >= 1, got {work.seq_length}")
    if work.seq_length % (2 * layout.cp if layout.cp > 1 else 1):
        raise ConfigError(f"context-parallel size {layout.cp} needs a sequence length divisible by 2*CP")
    if layout.sp and (work.seq_length // layout.cp) % layout.tp:
        raise ConfigError(f"sequence parallel: the per-CP-rank sequence is not divisible by TP={layout.tp}")
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


def parameter_count(arch: Qwen2Arch, tp: int = 1) -> int:
    """Parameters held by one tensor-parallel rank (padded vocabulary; norms replicated; tied counted once)."""
    arch.check_tensor_parallel(tp)
    h, f, kv = arch.hidden_size, arch.ffn_hidden_size, arch.num_key_value_heads * arch.head_dim
    qkv_out = (h + 2 * kv) // tp
    per_layer = qkv_out * h + qkv_out + h * (h // tp) + (2 * f // tp) * h + h * (f // tp) + 2 * h
    vocab = arch.padded_vocab_size // tp * h
    return arch.num_layers * per_layer + vocab * (1 if arch.tie_word_embeddings else 2) + h


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
        work = Workload(**{**asdict(work), "recompute": "none"})
    return sum(layer_activation_terms(arch, layout, work).values())


def _local_tokens(layout: Layout, work: Workload) -> int:
    return work.seq_length // layout.cp * layout.micro_batch_size


def activation_components(arch: Qwen2Arch, layout: Layout, work: Workload) -> list[Component]:
    """The activation components (graph, working set, output head) in bytes on one GPU."""
    h, t = arch.hidden_size, layout.tp
    sp = t if layout.sp else 1
    tokens = _local_tokens(layout, work)
    n_top = work.fast_layer_count(arch.num_layers)
    n_bottom = arch.num_layers - n_top
    full_layer = layer_activation_bytes(arch, layout, work, stored=False) * tokens
    if work.recompute == "full":
        stored_layer = BF16 * h / sp * tokens  # only each layer's input is checkpointed
    else:
        stored_layer = layer_activation_bytes(arch, layout, work) * tokens
    top_graphs = n_top * (2 if work.inner_graph == "kept" else 1)
    graph = stored_layer * (n_bottom + top_graphs)
    if work.uses_fast_weights:
        # per fast layer: fc1's A x (r wide, all-gathered to the whole sequence under SP) for gate and up,
        # fc2's A x (r wide, reduce-scattered under SP) for down; bf16.
        r = work.lora_rank
        lora = sum(BF16 * r * (1 if tg != "down" else 1 / sp) for tg in work.targets) * tokens
        graph += lora * top_graphs
    what = "bottom layers once + top layers of one pass" if n_top else "all layers"
    mode = {"none": "everything", "selective": "no attention-core state", "full": "layer inputs only"}
    notes = f"{what}; stores {mode[work.recompute]}"
    if work.inner_graph == "kept" and n_top:
        notes += "; + the last inner pass's top graph"

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

    responses = math.ceil(work.response_fraction * tokens)
    logit_rows = min(responses, work.loss_chunk_tokens)  # longer: chunks, each recomputed in backward
    head = (FP32 * h + FP32 + BF16 * h + BF16 * h) / sp * tokens  # final norm (as in a layer)
    head += BF16 * h * responses  # selected hidden states (output layer's input)
    # the fp32 softmax the vocab-parallel CE keeps + one more fp32 copy (forward: the max-shifted logits;
    # backward: their gradient)
    head += 2 * FP32 * arch.padded_vocab_size / t * logit_rows
    head_note = f"final norm; fp32 logits x2 at {logit_rows} of {responses} response positions at a time, V/TP"
    comps = [
        Component("activations", round(graph), notes),
        Component("activation working set", round(working), working_note),
        Component("output head", round(head), head_note),
    ]
    if work.attention_backend == "dense":
        # one S x S bool mask per micro-batch (shared by every layer and pass)
        comps.append(Component("dense attention mask", tokens * work.seq_length, "S x S bool, once"))
    return comps


def fast_weight_bytes(arch: Qwen2Arch, layout: Layout, work: Workload) -> int:
    """FocuSFT's fast weights of one micro-batch on one rank (fp32), one copy."""
    if not work.uses_fast_weights:
        return 0
    h, f, r, t = arch.hidden_size, arch.ffn_hidden_size, work.lora_rank, layout.tp
    per_doc = sum(r * (f // t) + h * r if tg == "down" else r * h + (f // t) * r for tg in work.targets)
    docs = work.documents_per_pack * layout.micro_batch_size
    return FP32 * per_doc * docs * work.fast_layer_count(arch.num_layers)


# ---- the plan -----------------------------------------------------------------------------------------


def plan(
    arch: Qwen2Arch,
    layout: Layout,
    work: Workload,
    *,
    gpu_memory_gib: float = 80.0,
    overhead_gib: float = 1.5,
    overhead_fraction: float = 0.05,
) -> MemoryPlan:
    """Predicted per-GPU memory of bf16 training with the distributed optimizer."""
    check(arch, layout, work)
    if overhead_gib < 0 or overhead_fraction < 0:
        raise ConfigError("overhead must be >= 0")
    n = parameter_count(arch, layout.tp)
    shards = layout.dp * layout.cp
    comps = [
        Component("parameters", BF16 * n, f"bf16, {n / 1e6:.1f}M per rank (TP={layout.tp})"),
        Component("gradient buffer", FP32 * n, "fp32 main_grad (grad_reduce_in_fp32)"),
        Component(
            "optimizer state",
            math.ceil(ADAM_STATE_BYTES * n / shards),
            f"fp32 master + Adam m, v; sharded over DP x CP = {shards}",
        ),
    ]
    comps += activation_components(arch, layout, work)
    if work.uses_fast_weights:
        fw = fast_weight_bytes(arch, layout, work)
        comps.append(Component("fast weights", 3 * fw, "fp32 LoRA per document: weights, grads, update (3 copies)"))
    subtotal = sum(c.bytes for c in comps)
    overhead = round(overhead_gib * GiB + overhead_fraction * subtotal)
    note = f"CUDA context/NCCL {overhead_gib:g} GiB + {overhead_fraction:.0%} fragmentation"
    comps.append(Component("overhead", overhead, note))
    description = {
        "architecture": arch.to_dict(),
        "layout": asdict(layout),
        "workload": asdict(work),
    }
    return MemoryPlan(comps, gpu_memory_gib, description)
