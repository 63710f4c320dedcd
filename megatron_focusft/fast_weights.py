"""Fast weights: per-document LoRA on the FFN of the top layers, sharded inside the tensor-parallel group.

For one micro-batch (a pack of D documents) and every fast layer, each target (gate, up, down) has
``A`` [D, r, in] and ``B`` [D, out, r]; document d's tokens get ``y = W x + (alpha / r) * B_d (A_d x)``,
so a pack behaves like D separate batch-1 samples.  They are plain tensors held by a
:class:`FastWeightSlot`, never ``nn.Parameter``\\ s: they stay out of DDP buffers, the optimizer, the
gradient-norm clip and checkpoints by construction.

Tensor-parallel layout (``_i`` = this rank's shard), matching Megatron's own linears:

- ``linear_fc1`` (column parallel, local output ``[gate_i; up_i]``): A replicated [r, h], B split along its
  output rows so that ``B_i`` lines up with ``gate_i`` / ``up_i``.  The r-wide product ``A x`` is entered
  into the TP region (identity forward, all-reduce backward) -- or, under sequence parallelism, computed on
  the local sequence chunk and all-gathered (r wide, cheap).
- ``linear_fc2`` (row parallel): A split along its input (ffn) dimension, the r-wide partial products
  all-reduced (reduce-scattered along the sequence under SP), B replicated [h, r].

Under sequence parallelism the replicated tensors (fc1's A, fc2's B) see only the local sequence chunk, so
their gradients are partial sums, which the bilevel step's inner update all-reduces over the TP group.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec

# (layer, target) -> tensor
Key = tuple[int, str]


@dataclass(frozen=True)
class DocumentSegments:
    """Where each document's tokens are in this rank's sequence: runs ``(start, end, document)``.

    Under context parallelism a rank holds two chunks of the pack, so a document can have two runs here,
    or none; ``num_documents`` counts the documents of the whole pack.
    """

    runs: tuple[tuple[int, int, int], ...]
    num_documents: int

    @classmethod
    def from_bounds(
        cls,
        cu_seqlens: torch.Tensor,
        segment_documents: torch.Tensor,
        num_documents: int,
        chunks: Sequence[tuple[int, int]] | None = None,
    ) -> DocumentSegments:
        """The runs of a pack's documents in the tokens ``chunks`` (global ``(start, end)`` ranges, in the
        order this rank holds them; default: the whole pack) from the pack's boundaries.

        ``cu_seqlens`` [n + 1] are the segment boundaries and ``segment_documents`` [n] each segment's document
        (-1: padding, which belongs to no run).  Each chunk clips the segments with tensor ops (one host
        transfer of the runs): this runs every micro-batch on packs of 128K tokens.
        """
        cu = cu_seqlens.long()
        real = segment_documents >= 0
        starts, ends, docs = cu[:-1][real], cu[1:][real], segment_documents[real].long()
        runs, offset = [], 0
        for lo, hi in chunks if chunks is not None else [(0, int(cu[-1]))]:
            s, e = starts.clamp(lo, hi), ends.clamp(lo, hi)
            keep = s < e
            runs.append(torch.stack([s[keep] - lo + offset, e[keep] - lo + offset, docs[keep]], dim=1))
            offset += hi - lo
        flat = torch.cat(runs).tolist() if runs else []
        return cls(tuple(tuple(r) for r in flat), num_documents)

    def __len__(self) -> int:
        return self.num_documents


def segment_linear(x: torch.Tensor, weight: torch.Tensor, segments: DocumentSegments, offset: int = 0) -> torch.Tensor:
    """``y[t] = weight[d(t)] @ x[t]`` for the tokens of document d, 0 elsewhere.

    ``x``: [n, b=1, in], rows ``offset .. offset + n`` of this rank's sequence (a sequence-parallel chunk
    has an offset); ``weight``: [D, out, in].  Documents are contiguous runs, so this is one small matmul per
    run.  Every document contributes a (possibly empty) matmul, so the result is part of the autograd graph
    of ``weight`` on every rank even where this rank's chunk holds only padding: the collectives on the
    LoRA path then run on all ranks of the group alike.
    """
    n = x.shape[0]
    pieces, cursor, seen = [], 0, set()
    for s, e, d in segments.runs:
        lo = min(max(s - offset, cursor), n)
        hi = min(max(e - offset, lo), n)
        if lo > cursor:
            pieces.append(x.new_zeros(lo - cursor, *x.shape[1:-1], weight.shape[1]))
        pieces.append(torch.matmul(x[lo:hi], weight[d].to(x.dtype).t()))
        seen.add(d)
        cursor = hi
    if cursor < n:
        pieces.append(x.new_zeros(n - cursor, *x.shape[1:-1], weight.shape[1]))
    pieces += [torch.matmul(x[:0], weight[d].to(x.dtype).t()) for d in range(segments.num_documents) if d not in seen]
    return torch.cat(pieces, dim=0)


def kaiming_uniform_bound(fan_in: int) -> float:
    """``nn.init.kaiming_uniform_(a=sqrt(5))``'s bound, as LoRA (and the authors) draw A: 1/sqrt(fan_in)."""
    gain = math.sqrt(2.0 / (1 + 5))
    return gain * math.sqrt(3.0 / fan_in)


def draw_lora_a(seed_material: Sequence[int], rank: int, fan_in: int, device: torch.device) -> torch.Tensor:
    """The full (unsharded) A [r, fan_in] of one document, layer and target, reproducible from its keys.

    The draw depends only on ``seed_material`` (seed, iteration, document identity, layer, target), so
    every TP / CP rank, every parallel layout and the tests' oracle get the same numbers.
    """
    digest = hashlib.blake2b(repr(tuple(seed_material)).encode(), digest_size=8).digest()
    generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    bound = kaiming_uniform_bound(fan_in)
    u = torch.rand(rank, fan_in, generator=generator, device=device, dtype=torch.float32)
    return u * (2 * bound) - bound


TARGET_IDS = {"gate": 0, "up": 1, "down": 2}


class FastWeights:
    """The fast weights of one micro-batch (fp32, this rank's TP shards), keyed by (layer, target)."""

    def __init__(
        self, a: dict[Key, torch.Tensor], b: dict[Key, torch.Tensor], segments: DocumentSegments, scale: float
    ):
        self.a, self.b, self.segments, self.scale = a, b, segments, scale

    @classmethod
    def initial(
        cls,
        *,
        layers: Sequence[int],
        targets: Sequence[str],
        rank: int,
        scale: float,
        hidden_size: int,
        ffn_hidden_size: int,
        segments: DocumentSegments,
        document_keys: Sequence[Sequence[int]],
        device: torch.device,
    ) -> FastWeights:
        """B = 0 and A drawn with :func:`draw_lora_a` for every document (``document_keys[d]``)."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        ffn_local = ffn_hidden_size // tp
        a, b = {}, {}
        for layer in layers:
            for target in targets:
                fan_in = ffn_hidden_size if target == "down" else hidden_size
                draws = [
                    draw_lora_a((*keys, layer, TARGET_IDS[target]), rank, fan_in, device) for keys in document_keys
                ]
                full_a = torch.stack(draws) if draws else torch.zeros(0, rank, fan_in, device=device)
                if target == "down":  # A split along its input (ffn); B replicated [h, r]
                    a[layer, target] = full_a[:, :, tp_rank * ffn_local : (tp_rank + 1) * ffn_local].contiguous()
                    b[layer, target] = torch.zeros(len(segments), hidden_size, rank, device=device)
                else:  # A replicated [r, h]; B split along its output rows [ffn/tp, r]
                    a[layer, target] = full_a
                    b[layer, target] = torch.zeros(len(segments), ffn_local, rank, device=device)
        return cls(a, b, segments, scale)

    def tensors(self) -> list[tuple[Key, str, torch.Tensor]]:
        """Every tensor as ((layer, target), 'A' | 'B', tensor), in a fixed order."""
        return [(k, name, t) for k in sorted(self.a) for name, t in (("A", self.a[k]), ("B", self.b[k]))]

    def requires_grad_(self) -> FastWeights:
        for _, _, t in self.tensors():
            t.requires_grad_(True)
        return self

    def detached(self) -> FastWeights:
        return FastWeights(
            {k: v.detach() for k, v in self.a.items()},
            {k: v.detach() for k, v in self.b.items()},
            self.segments,
            self.scale,
        )

    @staticmethod
    def is_sharded(target: str, name: str) -> bool:
        """Whether this tensor is split over TP ranks (fc1's B, fc2's A) rather than replicated."""
        return (target == "down") == (name == "A")


class FastWeightSlot:
    """Where the model's fast-weight linears find the fast weights of the running pass (None: plain SFT).

    One slot is shared by every fast layer of a model; the bilevel step sets :attr:`active` around each pass.
    """

    def __init__(self) -> None:
        self.active: FastWeights | None = None

    @contextmanager
    def holding(self, fast: FastWeights | None) -> Iterator[None]:
        """``fast`` in place for the duration (the previous ones back after): a recomputed layer runs with
        the fast weights of its own forward."""
        previous, self.active = self.active, fast
        try:
            yield
        finally:
            self.active = previous


def _sequence_offset(x: torch.Tensor, config: object) -> int:
    """Row offset of this rank's sequence chunk under sequence parallelism (0 otherwise)."""
    if not getattr(config, "sequence_parallel", False):
        return 0
    return parallel_state.get_tensor_model_parallel_rank() * x.shape[0]


class FastWeightColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ``linear_fc1`` (output ``[gate_i; up_i]``) plus per-document LoRA on gate and up."""

    def __init__(self, *args: object, slot: FastWeightSlot, layer: int, targets: Sequence[str], **kwargs: object):
        super().__init__(*args, **kwargs)
        self.slot, self.layer, self.targets = slot, layer, tuple(t for t in targets if t in ("gate", "up"))

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ):
        output, bias = super().forward(input_, weight, runtime_gather_output)
        fw = self.slot.active
        if fw is None or not self.targets:
            return output, bias
        offset = _sequence_offset(input_, self.config)
        half = output.shape[-1] // 2
        deltas = []
        for target in ("gate", "up"):
            if target not in self.targets:
                deltas.append(output.new_zeros(*output.shape[:-1], half))
                continue
            p = segment_linear(input_, fw.a[self.layer, target], fw.segments, offset)  # [s(_local), b, r]
            if self.config.sequence_parallel:
                p = gather_from_sequence_parallel_region(p, tensor_parallel_output_grad=True)
            else:
                p = copy_to_tensor_model_parallel_region(p)
            deltas.append(segment_linear(p, fw.b[self.layer, target], fw.segments) * fw.scale)
        return output + torch.cat(deltas, dim=-1), bias


class FastWeightRowParallelLinear(RowParallelLinear):
    """Megatron's ``linear_fc2`` plus per-document LoRA on down (A split along ffn, B replicated)."""

    def __init__(self, *args: object, slot: FastWeightSlot, layer: int, targets: Sequence[str], **kwargs: object):
        super().__init__(*args, **kwargs)
        self.slot, self.layer, self.enabled = slot, layer, "down" in targets

    def forward(self, input_: torch.Tensor):
        output, bias = super().forward(input_)
        fw = self.slot.active
        if fw is None or not self.enabled:
            return output, bias
        q = segment_linear(input_, fw.a[self.layer, "down"], fw.segments)  # partial over ffn shards
        if self.config.sequence_parallel:
            q = reduce_scatter_to_sequence_parallel_region(q)
        else:
            q = reduce_from_tensor_model_parallel_region(q)
        offset = _sequence_offset(q, self.config)
        return output + segment_linear(q, fw.b[self.layer, "down"], fw.segments, offset) * fw.scale, bias


def fast_weight_linears(
    slot: FastWeightSlot, fast_layers: Sequence[int], targets: Sequence[str]
) -> Callable[[int], tuple[type | ModuleSpec, type | ModuleSpec]]:
    """For ``qwen2.build_model(mlp_linears_for_layer=...)``: fast-weight linears on ``fast_layers``."""
    fast = set(fast_layers)

    def linears(i: int) -> tuple[type | ModuleSpec, type | ModuleSpec]:
        if i not in fast:
            return ColumnParallelLinear, RowParallelLinear
        params = {"slot": slot, "layer": i, "targets": tuple(targets)}
        return (
            ModuleSpec(module=FastWeightColumnParallelLinear, params=params),
            ModuleSpec(module=FastWeightRowParallelLinear, params=params),
        )

    return linears
