"""Where response tokens put their attention: sink mass, context engagement, positional profile.

Definitions (FocuSFT paper, Section 4.4 and Appendix C), per layer:

- the *queries* are the response tokens of a conversation (``loss_mask == 1``);
- every *key* falls in exactly one category (:data:`CATEGORIES`):

  ``sink``         positions ``0 .. SINK_TOKENS - 1`` (the first 5 tokens, whatever their role);
  ``system_user``  the other tokens of system and user turns (context);
  ``tool``         the other tokens of tool-result turns (context; Qwen2.5 renders them as ``user`` turns
                   holding ``<tool_response>``);
  ``assistant``    the other tokens of assistant turns (headers and responses);

- ``mass[c]`` = attention probability a query puts on the keys of category ``c``, averaged over the heads
  and the response queries of a sample, then over the samples.  The categories partition the keys, so the
  four masses sum to 1 (up to rounding).
- ``sink_mass = mass["sink"]`` (Appendix C: "sums attention weight on positions [0:5] from all
  response-query positions"); ``context_engagement = mass["system_user"] + mass["tool"]`` -- the context
  blocks *excluding* the sink positions, so that sink and context never count the same probability
  (the paper's Figure 2 reports them side by side: 30.1 % sink vs 13.5 % context).
- ``profile[j]``: mass on keys whose relative position ``k / S`` falls in bin ``j`` of ``bins`` equal bins
  (``S`` = the sample's length); sums to 1.

Turn roles are read from the token ids alone (:func:`token_roles`), so statistics can be computed for
JSONL conversations and for packed datasets alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SINK_TOKENS = 5
CATEGORIES: tuple[str, ...] = ("sink", "system_user", "tool", "assistant")
SINK, SYSTEM_USER, TOOL, ASSISTANT = range(len(CATEGORIES))

# Per-token turn roles (what :func:`token_roles` returns).
ROLE_SYSTEM_USER, ROLE_TOOL, ROLE_ASSISTANT = 0, 1, 2
ROLE_NAMES = ("system_user", "tool", "assistant")


def token_roles(input_ids, tokenizer) -> np.ndarray:
    """Role of every token of one ChatML conversation: system/user, tool or assistant (int8 [s]).

    A turn starts at each ``<|im_start|>``; its role is the word after it.  A ``user`` turn whose text holds
    ``<tool_response>`` is a tool turn (Qwen2.5's rendering of tool results); ``tool`` turns of other
    templates are tool turns too.  Tokens before the first ``<|im_start|>`` count as system/user.
    """
    ids = np.asarray(input_ids).reshape(-1)
    start_id = tokenizer.single_id("<|im_start|>")
    roles = np.full(ids.shape[0], ROLE_SYSTEM_USER, dtype=np.int8)
    starts = list(np.flatnonzero(ids == start_id)) + [ids.shape[0]]
    for a, b in zip(starts[:-1], starts[1:]):
        head = tokenizer.decode(ids[a + 1 : min(b, a + 4)])
        role = head.split("\n", 1)[0].strip()
        if role == "assistant":
            roles[a:b] = ROLE_ASSISTANT
        elif role == "tool" or (role == "user" and "<tool_response>" in tokenizer.decode(ids[a:b])):
            roles[a:b] = ROLE_TOOL
    return roles


def key_categories(roles: torch.Tensor, sink_tokens: int = SINK_TOKENS) -> torch.Tensor:
    """Category index (:data:`CATEGORIES`) of every key [..., s] from per-token roles [..., s]."""
    roles = torch.as_tensor(roles).long()
    cat = torch.empty_like(roles)
    cat[roles == ROLE_SYSTEM_USER] = SYSTEM_USER
    cat[roles == ROLE_TOOL] = TOOL
    cat[roles == ROLE_ASSISTANT] = ASSISTANT
    cat[..., :sink_tokens] = SINK
    return cat


def position_bins(seq_len: int, bins: int) -> torch.Tensor:
    """Bin index of every key position: ``floor(k * bins / seq_len)`` (long [seq_len])."""
    return torch.div(torch.arange(seq_len) * bins, seq_len, rounding_mode="floor")


@dataclass
class LayerSums:
    """Per-layer sums over (heads, response queries) of one sample; divided at the end."""

    category: torch.Tensor  # float64 [n_categories]
    profile: torch.Tensor  # float64 [bins]
    heatmap: torch.Tensor | None = None  # float64 [grid, grid] (summed over heads)


def sample_stats(
    probs: torch.Tensor, query_mask: torch.Tensor, categories: torch.Tensor, bins: torch.Tensor, n_bins: int
) -> LayerSums:
    """Sums of one layer's probabilities ``probs`` [heads, q, s] over heads and the selected queries.

    ``query_mask`` [q] selects the response queries; ``categories``/``bins`` [s] label the keys.  Works on a
    chunk of query rows (the caller adds the chunks).
    """
    p = probs[:, query_mask.to(probs.device)].to(torch.float64).sum(dim=(0, 1)).cpu()  # [s]: mass per key
    cat = torch.zeros(len(CATEGORIES), dtype=torch.float64).index_add_(0, categories, p)
    prof = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, p)
    return LayerSums(cat, prof)


@dataclass
class AttentionStats:
    """Per-layer averages over samples; what ``tools/analyze_attention.py`` writes."""

    category: np.ndarray  # [layers, n_categories]
    profile: np.ndarray  # [layers, bins]
    num_samples: int
    heatmap: np.ndarray | None = None  # [grid, grid], of ``heatmap_layer`` on the first sample
    heatmap_layer: int | None = None
    mask_mode: str = "causal"

    @property
    def sink_mass(self) -> np.ndarray:
        return self.category[:, SINK]

    @property
    def context_engagement(self) -> np.ndarray:
        return self.category[:, SYSTEM_USER] + self.category[:, TOOL]

    def to_json(self) -> dict:
        layers = []
        for i, row in enumerate(self.category):
            layers.append(
                {
                    "layer": i,
                    "sink_mass": float(row[SINK]),
                    "context_engagement": float(row[SYSTEM_USER] + row[TOOL]),
                    "system_user": float(row[SYSTEM_USER]),
                    "tool": float(row[TOOL]),
                    "assistant": float(row[ASSISTANT]),
                    "profile": [float(x) for x in self.profile[i]],
                }
            )
        avg = self.category.mean(0)
        return {
            "definition": {
                "queries": "response tokens (loss_mask == 1)",
                "sink_mass": f"mass on key positions 0..{SINK_TOKENS - 1}",
                "context_engagement": (
                    "mass on system/user + tool turn tokens, excluding positions "
                    f"0..{SINK_TOKENS - 1}; averaged over heads, response queries, then samples"
                ),
                "profile": "mass by relative key position k / S, equal bins",
            },
            "attention_mask": self.mask_mode,
            "num_samples": self.num_samples,
            "num_layers": int(self.category.shape[0]),
            "layers": layers,
            "average": {
                "sink_mass": float(avg[SINK]),
                "context_engagement": float(avg[SYSTEM_USER] + avg[TOOL]),
                "system_user": float(avg[SYSTEM_USER]),
                "tool": float(avg[TOOL]),
                "assistant": float(avg[ASSISTANT]),
            },
            "profile_average": [float(x) for x in self.profile.mean(0)],
            "heatmap_layer": self.heatmap_layer,
        }
