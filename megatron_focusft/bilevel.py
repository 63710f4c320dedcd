"""One FocuSFT step on one packed micro-batch: bottom layers once, K inner steps, the outer loss, backward.

The paper's step (section 3, eq. 2-4), per document d of the pack:

1. fast weights phi_d <- (A_d random, B_d = 0) on the FFN of the top layers;
2. K times: phi_d <- phi_d - lr * clip(grad_phi L_d(theta, phi_d)), each tensor clipped on its own;
3. outer loss L_d(theta, phi_d) with phi_d fixed (first order), backward into theta only.

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch.utils.checkpoint import checkpoint

from megatron_focusft.attention import build_attention_mask, packed_seq_params
from megatron_focusft.attention.context_parallel import load_balanced_chunks, load_balanced_index
from megatron_focusft.config import FocuSFTConfig
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.fast_weights import DocumentSegments, FastWeights, FastWeightSlot


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
    """Runs :meth:`__call__` on packed micro-batches of ``model`` (built with fast-weight linears on the
    layers of ``config.fast_layers`` sharing ``slot``)."""

    def __init__(self, model: GPTModel, config: FocuSFTConfig, slot: FastWeightSlot, vocab_size: int) -> None:
        self.model, self.config, self.slot, self.vocab_size = model, config, slot, vocab_size
        tc = model.config
        config.validate(hidden_size=tc.hidden_size, ffn_hidden_size=tc.ffn_hidden_size)
        self.fast_layers = list(config.fast_layers(tc.num_layers))
        self.split = self.fast_layers[0] if config.uses_fast_weights else tc.num_layers
        layers = list(model.decoder.layers)
        self.bottom, self.top = layers[: self.split], layers[self.split :]
        self.sequence_parallel = tc.sequence_parallel
        if tc.recompute_granularity is not None:
            raise ValueError(
                "Megatron's own recompute (reentrant) cannot run the inner loop; use FocuSFTConfig.recompute"
            )
        for layer in layers:  # selective recompute: core attention is recomputed in backward
            layer.self_attention.core_attention.recompute = config.recompute == "selective"

    # ---- model pieces -------------------------------------------------------------------------------

    def _run(self, hidden: torch.Tensor, layers: Sequence[torch.nn.Module], ctx: dict) -> torch.Tensor:
        for layer in layers:
            if self.config.recompute == "full" and torch.is_grad_enabled():
                hidden = checkpoint(
                    lambda h, layer=layer: layer(hidden_states=h, **ctx)[0], hidden, use_reentrant=False
                )
            else:
                hidden, _ = layer(hidden_states=hidden, **ctx)
        return hidden

    def _output_weight(self) -> torch.Tensor:
        m = self.model
        return m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else m.output_layer.weight

    def token_losses(self, hidden: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy (fp32, vocab parallel) at ``positions`` only; ``hidden`` is the top's output.

        Positions go through the output layer ``loss_chunk_tokens`` at a time, each chunk recomputed in
        backward, so the fp32 logits of all response positions never exist at once.
        """
        hidden = self.model.decoder.final_layernorm(hidden)
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        selected = hidden[positions, 0]
        if not self.sequence_parallel:
            selected = copy_to_tensor_model_parallel_region(selected)
        weight = self._output_weight()
        chunk = self.config.loss_chunk_tokens
        if selected.shape[0] <= chunk or not torch.is_grad_enabled():
            return self._cross_entropy(selected, weight, labels)
        return torch.cat(
            [
                checkpoint(self._cross_entropy, h, weight, y, use_reentrant=False)
                for h, y in zip(selected.split(chunk), labels.split(chunk))
            ]
        )

    def _cross_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, weight).float()
        # Rows past the real vocabulary (Megatron's padding) are not tokens: they get no probability.
        start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        if start + logits.shape[-1] > self.vocab_size:
            padded = torch.arange(start, start + logits.shape[-1], device=logits.device) >= self.vocab_size
            logits = logits.masked_fill(padded, float("-inf"))
        return vocab_parallel_cross_entropy(logits, labels)

    @contextmanager
    def _top_weights_frozen(self) -> Iterator[None]:
        """Inner passes need no base-weight gradients: Megatron's linears then skip the weight GEMMs."""
        weights = [
            p for layer in self.top for n, p in layer.named_parameters() if n.endswith("weight") and p.requires_grad
        ]
        for p in weights:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in weights:
                p.requires_grad_(True)

    # ---- the step -------------------------------------------------------------------------------------

    def evaluate(self, inp: PackedInput) -> StepStats:
        """The outer loss of ``inp`` with the base weights alone: the standard forward with the run's attention
        mask, no fast weights (no inner loop), no gradient."""
        with torch.no_grad():
            return self(inp, loss_scale=0.0, inner=False, backward=False)

    def __call__(
        self, inp: PackedInput, loss_scale: float, iteration: int = 0, *, inner: bool = True, backward: bool = True
    ) -> StepStats:
        """Forward, inner loop and outer backward (``loss_scale`` * outer loss sum) for one micro-batch.

        Under context parallelism every CP rank runs this on its load-balanced share of the pack; the
        per-document losses are this rank's contributions (summed over CP for statistics and the finite
        check), and each rank backpropagates its own contribution: the all-gathered K/V route the gradient
        between ranks, DDP sums base-weight gradients over DP x CP, and the inner update sums fast-weight
        gradients over CP.
        """
        cfg = self.config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        cp = parallel_state.get_context_parallel_world_size()
        local = chunks = None  # this CP rank's token positions in the pack (None: the whole pack)
        if cp > 1:
            cp_rank = parallel_state.get_context_parallel_rank()
            chunks = load_balanced_chunks(inp.length, cp, cp_rank)
            local = load_balanced_index(inp.length, cp, cp_rank, inp.tokens.device)
        local_length = inp.length // cp
        if self.sequence_parallel and local_length % tp:
            raise ValueError(
                f"pack length {inp.length} / context-parallel size {cp} is not a multiple of the TP size {tp} "
                "(sequence parallel)"
            )

        def mine(t: torch.Tensor) -> torch.Tensor:
            return t if local is None else t[:, local]

        mask = build_attention_mask(
            cfg.attention_backend, inp.document_ids, inp.loss_mask, cfg.attention_mask, query_index=local
        )
        position_ids = mine(inp.position_ids)
        if cfg.attention_backend == "te":  # TE reads document boundaries from Megatron's THD parameters
            if cp > 1:
                raise ValueError("--attention-backend te with context parallelism is not supported; use flex")
            psp = packed_seq_params(inp.cu_seqlens)
            rotary = self.model.rotary_pos_emb(psp.max_seqlen_q, packed_seq=True)
            ctx = {"attention_mask": mask, "rotary_pos_emb": rotary, "packed_seq_params": psp}
        else:
            # RoPE angles gathered at each token's own position (restarting in every document): one
            # elementwise rotation per layer, where Megatron's THD path loops over the pack's documents.
            table = self.model.rotary_pos_emb.get_emb(int(inp.position_ids.max()) + 1)  # [max_pos, 1, 1, d]
            ctx = {"attention_mask": mask, "rotary_pos_emb": table[position_ids[0]]}

        # Loss positions (t predicts token t+1): counted over the whole pack, evaluated where this rank is.
        num_docs = inp.num_documents
        all_positions = inp.label_mask[0].nonzero().reshape(-1)
        tokens_per_doc = torch.bincount(inp.document_ids[0, all_positions], minlength=num_docs).to(torch.float32)
        if bool((tokens_per_doc == 0).any()):
            raise ValueError("a document of the pack has no response token (the data pipeline drops those)")
        positions = mine(inp.label_mask)[0].nonzero().reshape(-1)
        labels = mine(inp.labels)[0, positions]
        doc_of_position = mine(inp.document_ids)[0, positions]

        def per_document(losses: torch.Tensor) -> torch.Tensor:
            """This rank's share of each document's mean response loss [D]."""
            sums = torch.zeros(num_docs, dtype=losses.dtype, device=losses.device).index_add(0, doc_of_position, losses)
            return sums / tokens_per_doc.to(losses.device)

        hidden = self.model.embedding(input_ids=mine(inp.tokens), position_ids=position_ids)
        hidden = self._run(hidden, self.bottom, ctx)

        stats = StepStats(torch.zeros(()))
        if cfg.uses_fast_weights and inner:
            tc = self.model.config
            fast = FastWeights.initial(
                layers=self.fast_layers,
                targets=cfg.targets,
                rank=cfg.lora_rank,
                scale=cfg.lora_scale,
                hidden_size=tc.hidden_size,
                ffn_hidden_size=tc.ffn_hidden_size,
                segments=DocumentSegments.from_bounds(inp.cu_seqlens, inp.segment_documents(), num_docs, chunks),
                document_keys=[(cfg.seed, iteration, *key) for key in inp.document_keys],
                device=hidden.device,
            )
            inner_input = hidden.detach()
            with self._top_weights_frozen():
                for _ in range(cfg.inner_steps):
                    self.slot.active = fast.requires_grad_()
                    doc_losses = per_document(
                        self.token_losses(self._run(inner_input, self.top, ctx), positions, labels)
                    )
                    whole = _sum_over_context_parallel(doc_losses.detach())
                    stats.inner_losses.append(whole)
                    fast = self._inner_update(fast, doc_losses, torch.isfinite(whole))
                    # autograd.grad frees only the graph it ran through: drop the rest of this pass's
                    # graph now, so no inner-pass activation lives on into the outer pass.
                    del doc_losses
            stats.adapted = fast.detached()
            self.slot.active = stats.adapted
        try:  # the fast weights stay in place through the backward: recomputed layers read them again
            token_losses = self.token_losses(self._run(hidden, self.top, ctx), positions, labels)
            document_losses = per_document(token_losses)
            outer = document_losses.sum() if cfg.loss_reduction == "sample" else token_losses.sum()
            if backward:
                (outer * loss_scale).backward()
        finally:
            self.slot.active = None
        stats.outer_loss_sum = _sum_over_context_parallel(outer.detach())
        stats.document_losses = _sum_over_context_parallel(document_losses.detach())
        return stats

    def _inner_update(self, fast: FastWeights, doc_losses: torch.Tensor, finite: torch.Tensor) -> FastWeights:
        """One SGD step per document on its fast weights, each tensor's gradient clipped on its own.

        ``doc_losses``: this rank's contributions; ``finite``: per document, whether its whole loss is.
        """
        cfg = self.config
        entries = fast.tensors()
        grads = torch.autograd.grad(
            doc_losses[finite].sum(), [t for _, _, t in entries], allow_unused=True, materialize_grads=True
        )
        # A document whose loss is not finite skips its step (its gradient is zeroed, NaNs included).
        grads = [torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, 0.0) for g in grads]
        if parallel_state.get_context_parallel_world_size() > 1:
            # Fast weights are the same on every CP rank; each rank saw only its share of the tokens.
            _all_reduce_flat(grads, parallel_state.get_context_parallel_group())
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if self.sequence_parallel and tp > 1:
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
