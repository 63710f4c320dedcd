"""The FocuSFT step of one global batch through Megatron-Core's pipeline schedules, at any pipeline size.

Megatron's ``get_forward_backward_func`` runs the micro-batches (no pipelining at PP=1; non-interleaved
1F1B above), calling :meth:`PipelineStep._forward_step` for each micro-batch on each stage, sending the
activations forward and their gradients back point to point, and running every backward itself.  The stage
forward is :meth:`BilevelStep.forward <megatron_focusft.bilevel.BilevelStep.forward>`.

Where the fast layers are (``F`` = first stage holding one; ``P`` stages, ``m`` micro-batches):

**Local** (``F = P - 1``: every fast layer on the last stage; always so at PP <= 2 with the paper's 35%):
the inner loop is part of the last stage's forward of each micro-batch, from the detached output of its
non-fast layers, exactly as at PP=1.  1F1B, per micro-batch ``i``::

    stage 0 .. P-2:  F(i) ........................ B(i)            (standard SFT work)
    stage P-1:       F_bottom(i), K x [F_fast(i), B_fast(i)], F_fast(i), B(i)

**Spanning** (``F < P - 1``): the inner passes need activations forward and gradients back across the
fast stages, which 1F1B's fixed order cannot interleave, so an *inner phase* runs first, micro-batch by
micro-batch (:meth:`PipelineStep._inner_phase`)::

    stages < F:      no-grad F(i), send on                    (never wait for anything back)
    stage F:         receive (or embed), no-grad F_bottom(i), then K x:
    stages F .. P-1:     F_fast(i) forward along the stages, d/d(fast weights) backward along them,
                         each stage's SGD update (per-tensor clip) on its own fast weights
    then 1F1B as standard SFT with micro-batch i's adapted fast weights in place on stages F .. P-1.

Each stage keeps the adapted fast weights of the ``m`` micro-batches (LoRA-sized) until 1F1B has used
them.  The cost: stages below ``F`` run one extra no-grad forward per micro-batch; the inner passes
of a micro-batch are serialised along stages ``F .. P-1``.  ``megatron_focusft.pipeline.cost`` predicts
each stage's time from the FLOP model; the training loop prints it before the first step.

Per-document fast weights, their draws (keyed by the global layer), the per-tensor clip and the update are
:class:`~megatron_focusft.bilevel.BilevelStep`'s own, so every layout computes what PP=1 computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_focusft.bilevel import BilevelStep, StepStats, _sum_over_context_parallel
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.fast_weights import FastWeights
from megatron_focusft.models.focusft import LayerInputs


@dataclass
class _Stage:
    """This rank's place in the pipeline (global ranks of its neighbours)."""

    rank: int
    size: int
    prev: int | None
    next: int | None

    @classmethod
    def current(cls) -> _Stage:
        rank = parallel_state.get_pipeline_model_parallel_rank()
        size = parallel_state.get_pipeline_model_parallel_world_size()
        prev = parallel_state.get_pipeline_model_parallel_prev_rank() if rank > 0 else None
        nxt = parallel_state.get_pipeline_model_parallel_next_rank() if rank < size - 1 else None
        return cls(rank, size, prev, nxt)


class PipelineStep:
    """Micro-batches of one global batch through ``step`` on this stage, with Megatron's schedule.

    ``wrapped``: the model as the schedule sees it (Megatron's ``DistributedDataParallel``, whose
    ``no_sync`` keeps gradient reduction for after the last micro-batch's backward).
    """

    def __init__(self, step: BilevelStep, wrapped: torch.nn.Module) -> None:
        self.step, self.wrapped = step, wrapped
        self.model = step.model
        self.stage = _Stage.current()
        # Spanning: the fast layers' first stage is not the last (every stage of the pipeline agrees).
        self.spanning = step.config.uses_fast_weights and self._first_fast_stage() < self.stage.size - 1

    def _first_fast_stage(self) -> int:
        """The first stage holding a fast layer (all stages agree: every stage knows the split)."""
        flag = torch.tensor(
            [self.stage.rank if self.step.split in self.model.stage_layers else self.stage.size],
            device=self._device(),
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=parallel_state.get_pipeline_model_parallel_group())
        return int(flag.item())

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- training ------------------------------------------------------------------------------------

    def __call__(self, inputs: list[PackedInput], loss_scale: float, iteration: int) -> list[StepStats]:
        """Forward and backward of every micro-batch (gradients accumulated in the DDP buffers, not reduced);
        per micro-batch stats on the last stage (empty stats elsewhere)."""
        adapted: list[FastWeights | None] = [None] * len(inputs)
        inner: list[list[torch.Tensor]] = [[] for _ in inputs]
        if self.spanning:
            adapted, inner = self._inner_phase(inputs, iteration)
        stats: list[StepStats] = [StepStats(torch.zeros(())) for _ in inputs]

        def forward_step(data: Iterator[int], _model: torch.nn.Module):
            i = next(data)
            output, stats[i] = self.step.forward(inputs[i], iteration, self._received(), adapted[i])
            stats[i].inner_losses = stats[i].inner_losses or inner[i]
            if self.model.post_process:
                output = output * loss_scale
            return output, _loss_func

        self._schedule(inputs, forward_step, forward_only=False)
        return stats

    @torch.no_grad()
    def evaluate(self, inputs: list[PackedInput]) -> list[StepStats]:
        """The outer loss of each input with the base weights alone (no fast weights, no gradient)."""
        stats: list[StepStats] = [StepStats(torch.zeros(())) for _ in inputs]

        def forward_step(data: Iterator[int], _model: torch.nn.Module):
            i = next(data)
            output, stats[i] = self.step.base_forward(inputs[i], self._received())
            return output, _loss_func

        self._schedule(inputs, forward_step, forward_only=True)
        return stats

    def _received(self) -> torch.Tensor | None:
        """The previous stage's activations for this forward (Megatron's schedule set them)."""
        return None if self.model.pre_process else self.model.decoder.input_tensor

    def _schedule(self, inputs: list[PackedInput], forward_step, forward_only: bool) -> None:
        lengths = {inp.length for inp in inputs}
        if len(lengths) != 1:
            raise ValueError(f"the micro-batches of a pipelined step must have one length, got {sorted(lengths)}")
        config = self.model.config
        config.no_sync_func = getattr(self.wrapped, "no_sync", None)
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(range(len(inputs))),
            model=[self.wrapped],
            num_microbatches=len(inputs),
            seq_length=lengths.pop(),
            micro_batch_size=1,  # a micro-batch is one [1, T] row of packs back to back
            forward_only=forward_only,
        )

    # ---- the inner phase (fast layers spanning stages) --------------------------------------------------

    def _inner_phase(
        self, inputs: list[PackedInput], iteration: int
    ) -> tuple[list[FastWeights | None], list[list[torch.Tensor]]]:
        """The inner loop of every micro-batch across the fast stages, before 1F1B (module docstring):
        this stage's adapted fast weights per micro-batch (None below the fast layers) and, on the last
        stage, each inner step's per-document losses."""
        adapted: list[FastWeights | None] = [None] * len(inputs)
        inner: list[list[torch.Tensor]] = [[] for _ in inputs]
        pending: list[dist.Work] = []
        first_fast = self.step.split in self.model.stage_layers
        for i, inp in enumerate(inputs):
            x = self.model.layer_inputs(inp, self.step.config.attention_mask)
            if self._holds_fast_layers() and not first_fast:  # receives its input at every inner step
                adapted[i] = self._inner_steps(inp, x, None, iteration, inner[i])
                continue
            with torch.no_grad():
                if self.model.pre_process:
                    hidden = self.model.embed(x)
                else:
                    hidden = self._recv(self._shape(inp), self.stage.prev)
                hidden = self.model.run_layers(hidden, x, 0, self.step.split)
            if first_fast:
                adapted[i] = self._inner_steps(inp, x, hidden, iteration, inner[i])
            else:  # below the fast stages: send on, never wait for anything back
                pending.append(dist.isend(hidden.contiguous(), self.stage.next))
        for work in pending:
            work.wait()
        return adapted, inner

    def _holds_fast_layers(self) -> bool:
        return any(i in self.model.stage_layers for i in self.model.fast_layers)

    def _inner_steps(
        self, inp: PackedInput, x: LayerInputs, hidden: torch.Tensor | None, iteration: int, inner_losses: list
    ) -> FastWeights:
        """K inner steps of one micro-batch on this fast stage; ``hidden``: the detached input of this stage's
        fast layers on the first fast stage (the others receive theirs each step)."""
        step, model = self.step, self.model
        first_fast = step.split in model.stage_layers
        fast = step.initial_fast_weights(inp, x, iteration)
        per_token = step._tokens_per_document(inp) if model.post_process else None
        with model.weights_frozen(step.split):
            for _ in range(step.config.inner_steps):
                h_in = hidden if first_fast else self._recv(self._shape(inp), self.stage.prev).requires_grad_()
                with model.slot.holding(fast.requires_grad_()):
                    out = model.run_layers(h_in, x, step.split)
                wrt = [t for _, _, t in fast.tensors()] + ([] if first_fast else [h_in])
                if model.post_process:
                    _, documents = step._outer(model.token_losses(out, x), x, per_token)
                    whole = _sum_over_context_parallel(documents.detach())
                    inner_losses.append(whole)
                    finite = torch.isfinite(whole)
                    grads = _grads(documents[finite].sum(), wrt, None)
                else:
                    dist.send(out.detach().contiguous(), self.stage.next)
                    grad_out = self._recv(out.shape, self.stage.next)
                    finite = self._recv((inp.num_documents,), self.stage.next, torch.uint8).bool()
                    grads = _grads(out, wrt, grad_out)
                if not first_fast:
                    dist.send(grads.pop().contiguous(), self.stage.prev)
                    dist.send(finite.to(torch.uint8), self.stage.prev)
                fast = step.inner_update(fast, grads, finite)
                del out
        return fast.detached()

    def _shape(self, inp: PackedInput) -> tuple[int, int, int]:
        """The [t, 1, h] activations one stage sends the next for ``inp`` (t: this CP rank's share, split
        over TP under sequence parallelism)."""
        config = self.model.config
        t = inp.length // parallel_state.get_context_parallel_world_size()
        if config.sequence_parallel:
            t //= parallel_state.get_tensor_model_parallel_world_size()
        return (t, 1, config.hidden_size)

    def _recv(self, shape: tuple[int, ...], source: int | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor from global rank ``source`` (activations in the pipeline's dtype unless ``dtype``)."""
        buf = torch.empty(shape, dtype=dtype or self.model.config.pipeline_dtype, device=self._device())
        dist.recv(buf, source)
        return buf


def _grads(output: torch.Tensor, wrt: list[torch.Tensor], grad_output: torch.Tensor | None) -> list[torch.Tensor]:
    return list(torch.autograd.grad(output, wrt, grad_outputs=grad_output, allow_unused=True, materialize_grads=True))


def _loss_func(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Megatron's last-stage loss hook: the step already scaled the loss by the global batch's normaliser,
    and ``calculate_per_token_loss`` (set on the model) keeps the schedule from dividing it again."""
    return output, torch.ones((), dtype=torch.int, device=output.device), {}
