"""The FocuSFT model: Qwen2 as a Megatron ``GPTModel`` with fast-weight linears on the top layers, and the
pieces a training stage runs (embed, a range of layers, token losses).

Everything that differs from Megatron's GPT is chosen when the model is built, through the layer specs:
the core attention (``config.attention_backend``, with ``recompute=True`` as a spec parameter under
selective recompute), the fast-weight linears on ``config.fast_layers`` sharing one
:class:`~megatron_focusft.fast_weights.FastWeightSlot`, and whole-layer recompute (``full``).  Nothing is
switched on live modules afterwards.

One micro-batch on this rank::

    x = model.layer_inputs(inp, mode)           # mask, RoPE, this CP rank's tokens and loss positions: once
    hidden = model.run_layers(model.embed(x), x, 0, split)
    losses = model.token_losses(model.run_layers(hidden, x, split), x)   # [loss positions of this rank]

The bilevel step (:mod:`megatron_focusft.bilevel`) is the algorithm on top of these pieces; a pipeline stage
runs the same pieces on its own layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from torch.utils.checkpoint import checkpoint

from megatron_focusft.attention import build_attention_mask, core_attention_class, packed_seq_params
from megatron_focusft.attention.context_parallel import load_balanced_chunks, load_balanced_index
from megatron_focusft.config import FocuSFTConfig
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.fast_weights import DocumentSegments, FastWeightSlot, fast_weight_linears
from megatron_focusft.masks import MaskMode
from megatron_focusft.models.qwen2 import Qwen2Arch, build_model


@dataclass
class LayerInputs:
    """One micro-batch as this rank's layers read it, built once by :meth:`FocuSFTModel.layer_inputs`.

    Under context parallelism a rank holds two load-balanced chunks of the pack: ``tokens``/``position_ids``
    are its [1, t] tokens, ``loss_positions`` index them, and ``segments`` are its document runs.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    layer_kwargs: dict[str, Any]  # attention_mask, rotary_pos_emb (+ packed_seq_params for te)
    loss_positions: torch.Tensor  # [n] where the loss counts (t predicts token t+1), in this rank's order
    labels: torch.Tensor  # [n]
    loss_documents: torch.Tensor  # [n] the document of each loss position
    segments: DocumentSegments


class FocuSFTModel(GPTModel):
    """Megatron's ``GPTModel`` plus the pieces of a FocuSFT step; built by :func:`build_focusft_model`."""

    def __init__(
        self,
        *args: Any,
        slot: FastWeightSlot,
        fast_layers: tuple[int, ...],
        targets: tuple[str, ...],
        real_vocab_size: int,
        attention_backend: str,
        recompute: str | None,
        loss_chunk_tokens: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.slot, self.fast_layers, self.targets = slot, fast_layers, targets
        self.real_vocab_size = real_vocab_size
        self.attention_backend, self.recompute = attention_backend, recompute
        self.loss_chunk_tokens = loss_chunk_tokens
        # The global indices of the decoder layers this pipeline stage holds (all of them without PP).
        first = self.decoder.layers[0].layer_number - 1 if len(self.decoder.layers) else 0
        self.stage_layers = range(first, first + len(self.decoder.layers))

    # ---- one micro-batch's inputs ----------------------------------------------------------------------

    def layer_inputs(self, inp: PackedInput, mode: MaskMode) -> LayerInputs:
        """The mask (``mode``), RoPE angles and loss positions of ``inp`` on this rank (once per micro-batch)."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        cp = parallel_state.get_context_parallel_world_size()
        if self.config.sequence_parallel and (inp.length // cp) % tp:
            raise ValueError(
                f"pack length {inp.length} / context-parallel size {cp} is not a multiple of the TP size {tp} "
                "(sequence parallel)"
            )
        chunks = local = None  # this CP rank's token positions in the pack (None: the whole pack)
        if cp > 1:
            cp_rank = parallel_state.get_context_parallel_rank()
            chunks = load_balanced_chunks(inp.length, cp, cp_rank)
            local = load_balanced_index(inp.length, cp, cp_rank, inp.tokens.device)

        def mine(t: torch.Tensor) -> torch.Tensor:
            return t if local is None else t[:, local]

        mask = build_attention_mask(self.attention_backend, inp.document_ids, inp.loss_mask, mode, query_index=local)
        position_ids = mine(inp.position_ids)
        if self.attention_backend == "te":  # TE reads document boundaries from Megatron's THD parameters
            if cp > 1:
                raise ValueError("--attention-backend te with context parallelism is not supported; use flex")
            psp = packed_seq_params(inp.cu_seqlens)
            rotary = self.rotary_pos_emb(psp.max_seqlen_q, packed_seq=True)
            kwargs = {"attention_mask": mask, "rotary_pos_emb": rotary, "packed_seq_params": psp}
        else:
            # RoPE angles gathered at each token's own position (restarting in every document): one
            # elementwise rotation per layer, where Megatron's THD path loops over the pack's documents.
            table = self.rotary_pos_emb.get_emb(int(inp.position_ids.max()) + 1)  # [max_pos, 1, 1, d]
            kwargs = {"attention_mask": mask, "rotary_pos_emb": table[position_ids[0]]}
        positions = mine(inp.label_mask)[0].nonzero().reshape(-1)
        return LayerInputs(
            tokens=mine(inp.tokens),
            position_ids=position_ids,
            layer_kwargs=kwargs,
            loss_positions=positions,
            labels=mine(inp.labels)[0, positions],
            loss_documents=mine(inp.document_ids)[0, positions],
            segments=DocumentSegments.from_bounds(inp.cu_seqlens, inp.segment_documents(), inp.num_documents, chunks),
        )

    # ---- the pieces of a stage ---------------------------------------------------------------------------

    def embed(self, x: LayerInputs) -> torch.Tensor:
        """Token embeddings [t(/TP under SP), 1, h] (Megatron's embedding scatters the sequence under SP)."""
        return self.embedding(input_ids=x.tokens, position_ids=x.position_ids)

    def local_layers(self, start: int = 0, stop: int | None = None) -> range:
        """The layers of ``start .. stop - 1`` (global indices) that this pipeline stage holds."""
        here = self.stage_layers
        stop = here.stop if stop is None else stop
        return range(max(start, here.start), max(min(stop, here.stop), max(start, here.start)))

    def run_layers(self, hidden: torch.Tensor, x: LayerInputs, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Decoder layers ``start .. stop - 1`` (global indices; those this stage holds) on ``hidden``.

        Under ``full`` recompute each layer's activations are recomputed in backward (non-reentrant: the
        inner loop's ``autograd.grad`` runs through it), with the fast weights that were in place for its
        forward: under a pipeline schedule another micro-batch's may be in place by then."""
        offset = self.stage_layers.start
        for i in self.local_layers(start, stop):
            layer = self.decoder.layers[i - offset]
            if self.recompute == "full" and torch.is_grad_enabled():
                hidden = checkpoint(self._recomputed_layer, layer, self.slot.active, hidden, x, use_reentrant=False)
            else:
                hidden, _ = layer(hidden_states=hidden, **x.layer_kwargs)
        return hidden

    def _recomputed_layer(
        self, layer: torch.nn.Module, fast: Any, hidden: torch.Tensor, x: LayerInputs
    ) -> torch.Tensor:
        with self.slot.holding(fast):
            return layer(hidden_states=hidden, **x.layer_kwargs)[0]

    def token_losses(self, hidden: torch.Tensor, x: LayerInputs) -> torch.Tensor:
        """Cross entropy (fp32, vocab parallel) at ``x.loss_positions`` only; ``hidden`` is the last layer's output.

        Positions go through the output layer ``loss_chunk_tokens`` at a time, each chunk recomputed in
        backward, so the fp32 logits of all response positions never exist at once.
        """
        hidden = self.decoder.final_layernorm(hidden)
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        selected = hidden[x.loss_positions, 0]
        if not self.config.sequence_parallel:
            selected = copy_to_tensor_model_parallel_region(selected)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        chunk = self.loss_chunk_tokens
        if selected.shape[0] <= chunk or not torch.is_grad_enabled():
            return self._cross_entropy(selected, weight, x.labels)
        return torch.cat(
            [
                checkpoint(self._cross_entropy, h, weight, y, use_reentrant=False)
                for h, y in zip(selected.split(chunk), x.labels.split(chunk))
            ]
        )

    def _cross_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, weight).float()
        # Rows past the real vocabulary (Megatron's padding) are not tokens: they get no probability.
        start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        if start + logits.shape[-1] > self.real_vocab_size:
            padded = torch.arange(start, start + logits.shape[-1], device=logits.device) >= self.real_vocab_size
            logits = logits.masked_fill(padded, float("-inf"))
        return vocab_parallel_cross_entropy(logits, labels)

    @contextmanager
    def weights_frozen(self, start: int, stop: int | None = None) -> Iterator[None]:
        """Layers ``start .. stop - 1`` compute no weight gradients inside (their Megatron linears then skip
        the weight-gradient GEMMs): for passes that differentiate only the fast weights."""
        offset = self.stage_layers.start
        weights = [
            p
            for i in self.local_layers(start, stop)
            for n, p in self.decoder.layers[i - offset].named_parameters()
            if n.endswith("weight") and p.requires_grad
        ]
        for p in weights:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in weights:
                p.requires_grad_(True)


def build_focusft_model(
    arch: Qwen2Arch,
    config: FocuSFTConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    perform_initialization: bool = True,
    **config_overrides: Any,
) -> FocuSFTModel:
    """The FocuSFT model of ``arch`` for the parallel state Megatron holds: ``config``'s attention backend
    and recompute in the layer specs, fast-weight linears on ``config.fast_layers`` (plain linears while no
    fast weights are active, so one model serves SFT and every ablation mode with the same layers)."""
    if config_overrides.get("recompute_granularity") is not None:
        raise ValueError("Megatron's own recompute (reentrant) cannot run the inner loop; use FocuSFTConfig.recompute")
    slot = FastWeightSlot()
    fast_layers = tuple(config.fast_layers(arch.num_layers))
    attention: type | ModuleSpec = core_attention_class(config.attention_backend)
    if config.recompute == "selective":
        attention = ModuleSpec(module=attention, params={"recompute": True})
    return build_model(
        arch,
        attention,
        params_dtype=params_dtype,
        sequence_parallel=sequence_parallel,
        perform_initialization=perform_initialization,
        mlp_linears_for_layer=fast_weight_linears(slot, fast_layers, config.targets),
        model_class=FocuSFTModel,
        model_kwargs={
            "slot": slot,
            "fast_layers": fast_layers,
            "targets": tuple(config.targets),
            "real_vocab_size": arch.vocab_size,
            "attention_backend": config.attention_backend,
            "recompute": config.recompute,
            "loss_chunk_tokens": config.loss_chunk_tokens,
        },
        **config_overrides,
    )
