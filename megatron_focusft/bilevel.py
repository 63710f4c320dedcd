"""One FocuSFT step on one packed micro-batch: bottom layers once, K inner steps, the outer loss, backward.

The paper's step (section 3, eq. 2-4), per document d of the pack:

1. fast weights phi_d <- (A_d random, B_d = 0) on the FFN of the top layers;
2. K times: phi_d <- phi_d - lr * clip(grad_phi L_d(theta, phi_d)), each tensor clipped on its own;
3. outer loss L_d(theta, phi_d) with phi_d fixed (first order), backward into theta only.

The model pieces (embedding, layers, token losses, the mask and RoPE of a micro-batch) are the model's own
(:class:`megatron_focusft.models.focusft.FocuSFTModel`); this module is the algorithm only.

What is not done, because it need not be:

- the bottom layers (no fast weights) run once: their output keeps its graph for the outer backward and
  is detached for the inner steps;
- inner backward passes reach only the top layers and compute no base-weight gradients (the top layers'
  Megatron linears run as frozen for the inner passes, so no weight-gradient GEMMs);
- the output layer and the cross entropy run only at response positions (vocab parallel, fp32).

``sum_d L_d`` is differentiated once per inner step: document d's fast weights only touch document d's
tokens and the mask never crosses documents, so every document gets exactly its own gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_focusft.config import FocuSFTConfig, FocuSFTConfigError
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.fast_weights import FastWeights
from megatron_focusft.models.focusft import FocuSFTModel, LayerInputs


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The authors' per-tensor clip factor: ``max_norm / (norm + 1e-12)`` where ``norm > max_norm``, else 1.

    (``torch.nn.utils.clip_grad_norm_`` would use ``min(1, max_norm / (norm + 1e-6))``: ~1e-6 apart.)
    """
    return torch.where(norm > max_norm, max_norm / (norm + 1e-12), torch.ones_like(norm))


@dataclass
class StepStats:
    """What one micro-batch step measured (sums and counts, so the loop can reduce over micro-batches/DP)."""

    outer_loss_sum: torch.Tensor  # sum of per-document mean losses ('sample') or of token losses ('token')
    document_losses: torch.Tensor | None = None  # [D] outer (adapted) mean response loss per document
    inner_losses: list[torch.Tensor] = field(default_factory=list)  # [D] per inner step, before its update
    adapted: FastWeights | None = None  # the fast weights after the inner loop (this rank's TP shards)


def _all_reduce_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Sum ``tensors`` in place over ``group`` with one collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for t, chunk in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def _sum_over_context_parallel(t: torch.Tensor) -> torch.Tensor:
    """Statistics of the whole pack from each CP rank's share (no gradient)."""
    if parallel_state.get_context_parallel_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, group=parallel_state.get_context_parallel_group())
    return t


class BilevelStep:
    """One FocuSFT step (:meth:`__call__`) and the validation forward (:meth:`evaluate`) of ``model`` under
    ``config``'s algorithm settings (mask, inner loop, loss reduction).

    The model fixes what is built into it (attention backend, recompute, fast layers and targets); a config
    that disagrees is refused.  One model serves every ablation mode (bilevel or not, causal or glm).
    """

    def __init__(self, model: FocuSFTModel, config: FocuSFTConfig) -> None:
        tc = model.config
        config.validate(hidden_size=tc.hidden_size, ffn_hidden_size=tc.ffn_hidden_size)
        built = {"attention_backend": model.attention_backend, "recompute": model.recompute}
        if config.uses_fast_weights:
            built.update(fast_layers=model.fast_layers, targets=model.targets)
        wanted = {
            "attention_backend": config.attention_backend,
            "recompute": config.recompute,
            "fast_layers": tuple(config.fast_layers(tc.num_layers)),
            "targets": tuple(config.targets),
        }
        for key, value in built.items():
            if wanted[key] != value:
                raise FocuSFTConfigError(f"the model was built with {key}={value!r}, the step asks for {wanted[key]!r}")
        self.model, self.config = model, config
        self.split = model.fast_layers[0] if config.uses_fast_weights else tc.num_layers

    def _tokens_per_document(self, inp: PackedInput) -> torch.Tensor:
        """Loss positions of each document of the whole pack [D] (the per-document means' denominators)."""
        documents = inp.document_ids[0][inp.label_mask[0] > 0]
        counts = torch.bincount(documents, minlength=inp.num_documents).to(torch.float32)
        if bool((counts == 0).any()):
            raise ValueError("a document of the pack has no response token (the data pipeline drops those)")
        return counts

    def _outer(
        self, losses: torch.Tensor, x: LayerInputs, per_token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to differentiate, this rank's share of each document's mean loss [D]) from its token losses."""
        sums = torch.zeros(per_token.numel(), dtype=losses.dtype, device=losses.device)
        documents = sums.index_add(0, x.loss_documents, losses) / per_token.to(losses.device)
        outer = documents.sum() if self.config.loss_reduction == "sample" else losses.sum()
        return outer, documents

    @torch.no_grad()
    def evaluate(self, inp: PackedInput) -> StepStats:
        """The outer loss of ``inp`` with the base weights alone: the standard forward with the run's attention
        mask, no fast weights (no inner loop), no gradient (a model with every layer)."""
        return self.base_forward(inp)[1]

    def base_forward(self, inp: PackedInput, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, StepStats]:
        """This stage's standard forward (no fast weights): as :meth:`forward`, without the inner loop."""
        model = self.model
        x = model.layer_inputs(inp, self.config.attention_mask)
        hidden = model.run_layers(model.embed(x) if hidden is None else hidden, x)
        if not model.post_process:
            return hidden, StepStats(torch.zeros(()))
        outer, documents = self._outer(model.token_losses(hidden, x), x, self._tokens_per_document(inp))
        return outer, StepStats(_sum_over_context_parallel(outer.detach()), _sum_over_context_parallel(documents))

    def __call__(self, inp: PackedInput, loss_scale: float, iteration: int = 0) -> StepStats:
        """Forward, inner loop and outer backward (``loss_scale`` * outer loss sum) of one micro-batch on a
        model with every layer (no pipeline; the training loop runs :meth:`forward` through Megatron's
        schedules instead)."""
        outer, stats = self.forward(inp, iteration)
        (outer * loss_scale).backward()
        return stats

    def forward(
        self,
        inp: PackedInput,
        iteration: int = 0,
        hidden: torch.Tensor | None = None,
        adapted: FastWeights | None = None,
    ) -> tuple[torch.Tensor, StepStats]:
        """This stage's forward of one micro-batch: (outer loss sum with its graph, stats) on the last
        pipeline stage, (output hidden states, empty stats) on the others.

        ``hidden``: the previous stage's output (None on the first stage: the embedding).  The inner loop runs
        here when every fast layer is on this stage; where the fast layers span stages it has run before
        (:mod:`megatron_focusft.schedule`) and ``adapted`` holds this stage's fast weights.

        Under context parallelism every CP rank runs this on its load-balanced share of the pack; the
        per-document losses are this rank's contributions (summed over CP for statistics and the finite
        check), and each rank backpropagates its own contribution: the all-gathered K/V route the gradient
        between ranks, DDP sums base-weight gradients over DP x CP, and the inner update sums fast-weight
        gradients over CP.
        """
        model = self.model
        x = model.layer_inputs(inp, self.config.attention_mask)
        if hidden is None:
            hidden = model.embed(x)
        stats, start = StepStats(torch.zeros(())), 0
        if self.inner_loop_here:
            hidden = model.run_layers(hidden, x, 0, self.split)
            per_token = self._tokens_per_document(inp)
            adapted = self._inner_loop(inp, x, hidden.detach(), per_token, iteration, stats.inner_losses)
            start = self.split
        stats.adapted = adapted
        with model.slot.holding(adapted):  # full recompute keeps each layer's own (run_layers)
            hidden = model.run_layers(hidden, x, start)
        if not model.post_process:
            return hidden, stats
        outer, documents = self._outer(model.token_losses(hidden, x), x, self._tokens_per_document(inp))
        stats.outer_loss_sum = _sum_over_context_parallel(outer.detach())
        stats.document_losses = _sum_over_context_parallel(documents.detach())
        return outer, stats

    @property
    def inner_loop_here(self) -> bool:
        """Whether the whole inner loop runs on this stage: every fast layer is here (always without PP)."""
        layers = self.model.stage_layers
        return self.config.uses_fast_weights and self.split in layers and self.model.fast_layers[-1] in layers

    def initial_fast_weights(self, inp: PackedInput, x: LayerInputs, iteration: int) -> FastWeights:
        """Fresh fast weights (B = 0, A drawn per document) of this stage's fast layers."""
        cfg, model = self.config, self.model
        tc = model.config
        return FastWeights.initial(
            layers=tuple(i for i in model.fast_layers if i in model.stage_layers),
            targets=cfg.targets,
            rank=cfg.lora_rank,
            scale=cfg.lora_scale,
            hidden_size=tc.hidden_size,
            ffn_hidden_size=tc.ffn_hidden_size,
            segments=x.segments,
            document_keys=[(cfg.seed, iteration, *key) for key in inp.document_keys],
            device=x.tokens.device,
        )

    def _inner_loop(
        self,
        inp: PackedInput,
        x: LayerInputs,
        inner_input: torch.Tensor,
        per_token: torch.Tensor,
        iteration: int,
        inner_losses: list[torch.Tensor],
    ) -> FastWeights:
        """K SGD steps on fresh fast weights from the bottom's detached output (every fast layer on this
        stage); appends each step's whole-pack per-document loss (before its update) to ``inner_losses``."""
        model = self.model
        fast = self.initial_fast_weights(inp, x, iteration)
        with model.weights_frozen(self.split):
            for _ in range(self.config.inner_steps):
                with model.slot.holding(fast.requires_grad_()):
                    losses = model.token_losses(model.run_layers(inner_input, x, self.split), x)
                _, documents = self._outer(losses, x, per_token)
                whole = _sum_over_context_parallel(documents.detach())
                inner_losses.append(whole)
                finite = torch.isfinite(whole)
                grads = self.fast_weight_grads(fast, documents[finite].sum())
                fast = self.inner_update(fast, grads, finite)
                # autograd.grad frees only the graph it ran through: drop the rest of this pass's
                # graph now, so no inner-pass activation lives on into the outer pass.
                del losses, documents
        return fast.detached()

    @staticmethod
    def fast_weight_grads(
        fast: FastWeights, output: torch.Tensor, grad_output: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """d ``output`` / d (every tensor of ``fast``), in :meth:`FastWeights.tensors` order (zeros where unused)."""
        return list(
            torch.autograd.grad(
                output,
                [t for _, _, t in fast.tensors()],
                grad_outputs=grad_output,
                allow_unused=True,
                materialize_grads=True,
            )
        )

    def inner_update(self, fast: FastWeights, grads: list[torch.Tensor], finite: torch.Tensor) -> FastWeights:
        """One SGD step per document on its fast weights, each tensor's gradient clipped on its own.

        ``grads``: this rank's contributions to the gradients of the finite documents' loss
        (:meth:`fast_weight_grads`); ``finite``: per document, whether its whole loss is.
        """
        cfg = self.config
        entries = fast.tensors()
        # A document whose loss is not finite skips its step (its gradient is zeroed, NaNs included).
        grads = [torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, 0.0) for g in grads]
        if parallel_state.get_context_parallel_world_size() > 1:
            # Fast weights are the same on every CP rank; each rank saw only its share of the tokens.
            _all_reduce_flat(grads, parallel_state.get_context_parallel_group())
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if self.model.config.sequence_parallel and tp > 1:
            # Replicated tensors saw only this rank's sequence chunk: sum their gradients over TP.
            _all_reduce_flat(
                [g for (key, name, _), g in zip(entries, grads) if not FastWeights.is_sharded(key[1], name)], tp_group
            )
        # Per document and per tensor: squared norms [num_tensors, D]; shards' squares summed over TP.
        squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads])
        sharded = torch.tensor([FastWeights.is_sharded(k[1], n) for k, n, _ in entries], device=squares.device)
        if tp > 1 and bool(sharded.any()):
            shard_sq = squares[sharded]
            dist.all_reduce(shard_sq, group=tp_group)
            squares[sharded] = shard_sq
        coef = clip_coefficient(squares.sqrt(), cfg.inner_grad_clip)
        new_a, new_b = {}, {}
        for i, ((key, name, tensor), g) in enumerate(zip(entries, grads)):
            step = cfg.inner_lr * coef[i].view(-1, *([1] * (g.dim() - 1))) * g
            (new_a if name == "A" else new_b)[key] = (tensor.detach() - step.to(tensor.dtype)).detach()
        return FastWeights(new_a, new_b, fast.segments, fast.scale)
