"""Attention analysis of a checkpoint on conversations: samples in, :class:`AttentionStats` out.

model = load_probe_model(ckpt_dir)                    # collective under TP
samples = load_samples(data, tokenizer, limit=8)      # JSONL conversations or a packed PREFIX
stats = analyze(model, samples, mode="glm")
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_focusft.analysis.attention_stats import AttentionStats, token_roles
from megatron_focusft.analysis.capture import AttentionProbe, ProbeAttention, decoder_hidden_states
from megatron_focusft.analysis.prompts import check_token_ids


@dataclass
class Sample:
    """One conversation: token ids, loss mask (1 = response), per-token roles (:func:`token_roles`)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    roles: np.ndarray
    source: str = ""


def load_probe_model(ckpt: str | Path, dtype: torch.dtype | None = None, checksums: bool = True):
    """The checkpoint's model built with :class:`ProbeAttention` (eval mode; collective under TP);
    ``checksums``: hash its files against its ``checksums.json`` first."""
    from megatron_focusft.convert.megatron_io import load_checkpoint_model

    model, meta, _ = load_checkpoint_model(ckpt, ProbeAttention, checksums)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), meta.arch


def load_samples(data: str, tokenizer, limit: int | None = None, max_length: int | None = None) -> list[Sample]:
    """Conversations from a JSONL file (rendered with the checkpoint's tokenizer / chat template) or from
    a packed dataset ``PREFIX`` (``PREFIX.json`` exists): every document of the packs is one sample.

    Samples without a response token are skipped; ``limit`` keeps the first N.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    samples: list[Sample] = []
    if os.path.exists(data + ".json") and not data.endswith((".jsonl", ".json")):
        from megatron_focusft.data import PackedDataset

        ds = PackedDataset(data)
        for i in range(len(ds)):
            for j, (ids, lm) in enumerate(ds.documents(i)):
                ids, lm = np.array(ids), np.array(lm)  # copies: the memory map closes with the dataset
                if lm.any():
                    samples.append(Sample(ids, lm, token_roles(ids, tokenizer), f"pack {i} doc {j}"))
                if limit is not None and len(samples) >= limit:
                    return samples
        return samples
    from megatron_focusft.data import ChatEncoder, DataError, iter_records, parse_record

    encoder = ChatEncoder(tokenizer, max_length=max_length, overlong="truncate")
    for rec in iter_records([data]):
        try:
            doc = encoder.encode(parse_record(rec), getattr(rec, "location", ""))
        except DataError as e:
            warnings.warn(f"skipped: {e}", stacklevel=2)
            continue
        samples.append(Sample(doc.input_ids, doc.loss_mask, token_roles(doc.input_ids, tokenizer), doc.source))
        if limit is not None and len(samples) >= limit:
            break
    return samples


def fold_tokens(ids: np.ndarray, vocab_size: int, *, fold: bool = False, source: str = "") -> torch.Tensor:
    """Token ids as a [1, s] tensor, checked by :func:`check_token_ids` (folded only with ``fold``)."""
    ids = check_token_ids(np.asarray(ids, dtype=np.int64), vocab_size, fold=fold, source=source)
    return torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]


@torch.no_grad()
def analyze(
    model,
    samples: list[Sample],
    mode: str = "causal",
    *,
    vocab_size: int | None = None,
    bins: int = 32,
    heatmap_layer: int | None = None,
    grid: int = 128,
    chunk_elements: int | None = None,
    progress: bool = False,
    fold_vocab: bool = False,
    source: str = "",
) -> AttentionStats:
    """Per-layer sink mass / context engagement / positional profile, averaged over ``samples``.

    ``heatmap_layer`` (0-based, default the middle layer): its pooled attention map on the first sample.
    Token ids beyond the vocabulary are a ValueError naming ``source`` (see :func:`check_token_ids`;
    ``fold_vocab`` folds them instead, for tiny test models).
    Collective under tensor parallelism (every rank passes the same samples).
    """
    num_layers = len(model.decoder.layers)
    if heatmap_layer is None:
        heatmap_layer = num_layers // 2
    if not 0 <= heatmap_layer < num_layers:
        raise ValueError(f"heatmap_layer {heatmap_layer} is out of range: the model has {num_layers} layers")
    vocab_size = vocab_size or model.embedding.word_embeddings.num_embeddings
    category, profile, heat = [], [], None
    for n, sample in enumerate(tqdm(samples, desc="attention", disable=not progress, unit="sample")):
        kwargs = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
        probe = AttentionProbe(
            torch.as_tensor(sample.roles),
            torch.as_tensor(sample.loss_mask),
            mode,
            bins=bins,
            heatmap_layer=heatmap_layer if n == 0 else None,
            grid=grid,
            **kwargs,
        )
        tokens = fold_tokens(sample.input_ids, vocab_size, fold=fold_vocab, source=source).to(
            next(model.parameters()).device
        )
        decoder_hidden_states(model, tokens, probe)
        c, p, h = probe.finish()
        category.append(c)
        profile.append(p)
        if h is not None:
            heat = h
    if not category:
        raise ValueError("no sample to analyse")
    return AttentionStats(
        category=torch.stack(category).mean(0).numpy(),
        profile=torch.stack(profile).mean(0).numpy(),
        num_samples=len(category),
        heatmap=None if heat is None else heat.numpy(),
        heatmap_layer=heatmap_layer,
        mask_mode=mode,
    )
