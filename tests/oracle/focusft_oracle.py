"""Plain-PyTorch reference ("oracle") for one FocuSFT bilevel step on a Hugging Face Qwen2ForCausalLM.

The algorithm (FocuSFT paper, Sec. 3; hyperparameters from App. A, Table 5), for ONE sample:
  1. Mask (Eq. 5): blocks are maximal runs of equal loss-mask value; a query sees every earlier block, the
     whole of its own block if it is a context token (bidirectional), and only k <= q inside a response
     block. mode="causal" is the plain k <= q mask. The same mask is used in both loops (Sec. 3.5).
  2. Fast weights (Sec. 3.2): LoRA y = W x + (alpha/r) B (A x) on gate/up/down_proj of the top
     `layer_fraction` of layers (int(L * (1 - layer_fraction)) .. L-1); A = A0 (given), B = 0.
  3. Inner loop (Eq. 3), K steps: L_in = mean next-token CE over the response tokens; gradients w.r.t. the
     fast weights only; each tensor's gradient clipped to norm `inner_grad_clip` on its own
     (`clip_per_tensor`); SGD phi -= inner_lr * g. A non-finite L_in skips the step. Base weights never move.
  4. Outer step (Eqs. 2, 4): L_out = the same loss with the adapted fast weights held constant; backward
     into the base weights only (first-order: no gradient flows through the inner updates).
Loss convention: logits at position t predict token t+1; position t counts iff loss_mask[t+1] == 1;
the per-sample loss is the mean over the counted positions (0 if there are none).
This module must not import megatron_focusft: it is the independent reference the Megatron code is tested
against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")
CLIP_EPS = 1e-12  # the authors' code: g * (clip / (norm + 1e-12)) when norm > clip

FastKey = tuple[int, str]  # (layer index, target module name)


# ----------------------------------------------------------------------------------------------- mask


def block_ids(loss_mask: torch.Tensor) -> torch.Tensor:
    """turn_id[t] = number of loss-mask value changes in positions 1..t (so block 0 is the first run)."""
    lm = loss_mask.long()
    changes = torch.zeros_like(lm)
    changes[1:] = (lm[1:] != lm[:-1]).long()
    return torch.cumsum(changes, dim=0)


def allowed_attention(loss_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Boolean [S, S] matrix, allowed[q, k] = query q may attend to key k."""
    S = loss_mask.shape[0]
    pos = torch.arange(S, device=loss_mask.device)
    causal = pos[None, :] <= pos[:, None]
    if mode == "causal":
        return causal
    if mode != "glm":
        raise ValueError(f"unknown mode {mode!r}")
    block = block_ids(loss_mask)
    bq, bk = block[:, None], block[None, :]
    q_is_context = (loss_mask == 0)[:, None]
    return (bk < bq) | ((bk == bq) & (q_is_context | causal))


def additive_mask(loss_mask: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, S, S] float mask for eager attention: 0 where allowed, finfo(dtype).min where not.

    transformers 5.x passes a 4D mask through unchanged and eager attention adds it to the scores."""
    allowed = allowed_attention(loss_mask, mode)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=loss_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


# ----------------------------------------------------------------------------------------------- loss


def response_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """(mean CE over counted positions, number of counted positions); logits [S, V]."""
    ce = F.cross_entropy(logits[:-1], input_ids[1:], reduction="none")
    weight = loss_mask[1:].to(ce.dtype)
    count = weight.sum()
    return (ce * weight).sum() / count.clamp_min(1), int(count.item())


# ---------------------------------------------------------------------------------------- fast weights


def fast_layer_indices(num_layers: int, layer_fraction: float = 0.35) -> list[int]:
    """The authors' selection: layers int(L * (1 - layer_fraction)) .. L-1 (18..27 of 28 at 0.35)."""
    return list(range(int(num_layers * (1.0 - layer_fraction)), num_layers))


def kaiming_uniform_A(shape, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """A draw of torch.nn.init.kaiming_uniform_(a=sqrt(5)): uniform(-b, b), b = 1/sqrt(in_features)."""
    A = torch.empty(shape, dtype=dtype)
    return torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)


def draw_A0(
    model, rank: int, layer_fraction: float = 0.35, targets: Sequence[str] = DEFAULT_TARGETS, generator=None
) -> dict[FastKey, torch.Tensor]:
    """Initial A matrices, drawn layer by layer and, within a layer, in `targets` order."""
    layers = model.model.layers
    dtype = next(model.parameters()).dtype
    return {
        (i, t): kaiming_uniform_A((rank, getattr(layers[i].mlp, t).in_features), generator, dtype)
        for i in fast_layer_indices(len(layers), layer_fraction)
        for t in targets
    }


@contextmanager
def lora_hooks(model, fast: dict[FastKey, tuple[torch.Tensor, torch.Tensor]], scale: float):
    """Adds scale * B (A x) to the output of model.model.layers[i].mlp.<target> for every fast weight."""

    def make_hook(A, B):
        return lambda module, args, out: out + scale * F.linear(F.linear(args[0], A), B)

    handles = [
        getattr(model.model.layers[i].mlp, t).register_forward_hook(make_hook(A, B)) for (i, t), (A, B) in fast.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def clip_per_tensor(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """One tensor's gradient clipped to L2 norm `max_norm` on its own (the authors' formula):

        g * (max_norm / (||g|| + 1e-12))  if ||g|| > max_norm,  else g unchanged.

    (torch.nn.utils.clip_grad_norm_ on the single tensor uses min(1, max_norm / (||g|| + 1e-6)); the two
    differ by ~1e-6 relative.)  max_norm <= 0 disables clipping, as in the authors' code."""
    if max_norm <= 0:
        return grad
    norm = float(torch.linalg.vector_norm(grad))
    return grad * (max_norm / (norm + CLIP_EPS)) if norm > max_norm else grad


# ------------------------------------------------------------------------------------------- the step


@dataclass
class OracleResult:
    outer_loss: torch.Tensor  # 0-dim, detached
    inner_losses: list[float]  # loss at fast weights after 0..K steps (nan for a skipped step)
    grads: dict[str, torch.Tensor]  # hf parameter name -> d outer_loss / d parameter
    fast_weights: dict[FastKey, tuple[torch.Tensor, torch.Tensor]]  # adapted (A, B)
    num_tokens: int  # counted (response) positions


def _sample_loss(model, input_ids, loss_mask, mask4d, fast, scale):
    positions = torch.arange(input_ids.shape[0], device=input_ids.device)[None]
    with lora_hooks(model, fast, scale):
        out = model(input_ids=input_ids[None], attention_mask=mask4d, position_ids=positions, use_cache=False)
    return response_loss(out.logits[0], input_ids, loss_mask)


def oracle_step(
    model,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    A0: dict[FastKey, torch.Tensor],
    *,
    mode: str = "glm",
    inner_steps: int = 2,
    inner_lr: float = 1.0,
    inner_grad_clip: float = 1.0,
    rank: int = 32,
    alpha: float = 64.0,
    layer_fraction: float = 0.35,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> OracleResult:
    """One FocuSFT bilevel step on one sample (input_ids [S] long, loss_mask [S] 0/1).

    Leaves the base weights unchanged and their .grad = the returned grads."""
    layers = model.model.layers
    dtype = next(model.parameters()).dtype
    expected = {(i, t) for i in fast_layer_indices(len(layers), layer_fraction) for t in targets}
    if set(A0) != expected:
        raise ValueError(f"A0 keys {sorted(A0)} != fast weights {sorted(expected)}")
    fast = {}
    for (i, t), A in A0.items():
        linear = getattr(layers[i].mlp, t)
        if tuple(A.shape) != (rank, linear.in_features):
            raise ValueError(f"A0[{i, t}] has shape {tuple(A.shape)}, want {(rank, linear.in_features)}")
        B0 = torch.zeros(linear.out_features, rank, dtype=dtype, device=A.device)
        fast[(i, t)] = (A.detach().to(dtype).clone(), B0)
    scale = alpha / rank
    mask4d = additive_mask(loss_mask, mode, dtype)

    inner_losses = []
    for _ in range(inner_steps):
        leaves = {k: (A.detach().requires_grad_(), B.detach().requires_grad_()) for k, (A, B) in fast.items()}
        loss, _ = _sample_loss(model, input_ids, loss_mask, mask4d, leaves, scale)
        inner_losses.append(loss.item())
        if not torch.isfinite(loss):
            continue  # skipped step: fast weights unchanged
        flat = [p for pair in leaves.values() for p in pair]
        grads = iter(torch.autograd.grad(loss, flat))  # w.r.t. fast weights only; base .grad untouched
        with torch.no_grad():
            fast = {
                k: tuple(p - inner_lr * clip_per_tensor(next(grads), inner_grad_clip) for p in pair)
                for k, pair in leaves.items()
            }

    fast = {k: (A.detach(), B.detach()) for k, (A, B) in fast.items()}
    model.zero_grad(set_to_none=True)
    loss, count = _sample_loss(model, input_ids, loss_mask, mask4d, fast, scale)
    loss.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()
    }
    return OracleResult(loss.detach(), inner_losses + [loss.item()], grads, fast, count)


@dataclass
class ManyResult:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    per_sample: list[OracleResult] = field(default_factory=list)


def oracle_step_many(model, samples: Sequence[dict], reduction: str = "sample", **step_kwargs) -> ManyResult:
    """Runs `oracle_step` on each sample (a dict with input_ids, loss_mask, A0) and combines them.

    reduction="sample": mean over samples of each sample's mean loss (grads averaged over samples).
    reduction="token":  sum of all response-token losses / total response tokens
                        (sample i weighted by num_tokens_i / total)."""
    results = [oracle_step(model, **s, **step_kwargs) for s in samples]  # each zeroes the grads first
    if reduction == "sample":
        weights = [1.0 / len(results)] * len(results)
    elif reduction == "token":
        total = max(sum(r.num_tokens for r in results), 1)
        weights = [r.num_tokens / total for r in results]
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    loss = sum(w * r.outer_loss for w, r in zip(weights, results))
    grads = {n: sum(w * r.grads[n] for w, r in zip(weights, results)) for n in results[0].grads}
    model.zero_grad(set_to_none=True)
    return ManyResult(loss, grads, results)
