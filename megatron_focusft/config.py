"""FocuSFT's own settings (the bilevel step, the mask, the attention backend), checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_focusft.masks import MASK_MODES

TARGETS = ("gate", "up", "down")
LOSS_REDUCTIONS = ("sample", "token")
RECOMPUTE_GRANULARITIES = ("full", "selective")  # None: no recompute


class FocuSFTConfigError(ValueError):
    """A FocuSFT setting that cannot work; the message names the flag."""


@dataclass(frozen=True)
class FocuSFTConfig:
    """Paper defaults (appendix A and the authors' code): K=2, inner lr 1.0, per-tensor clip 1.0, LoRA rank
    32 / alpha 64 on gate, up and down of the top 35% of layers, the GLM mask, loss averaged per sample."""

    bilevel: bool = True
    inner_steps: int = 2
    inner_lr: float = 1.0
    inner_grad_clip: float = 1.0
    lora_rank: int = 32
    lora_alpha: float = 64.0
    layer_fraction: float = 0.35
    targets: tuple[str, ...] = TARGETS
    attention_mask: Literal["causal", "glm"] = "glm"
    attention_backend: Literal["flex", "dense", "te"] = "flex"
    loss_reduction: Literal["sample", "token"] = "sample"
    seed: int = 1234
    # Activation recompute (our own, non-reentrant: Megatron's reentrant checkpoint refuses the inner loop's
    # autograd.grad): 'selective' recomputes core attention in backward, 'full' whole layers.
    recompute: Literal["selective", "full"] | None = None
    # The output layer and cross entropy run on at most this many response positions at a time, each chunk
    # recomputed in backward, so [positions, vocab / TP] fp32 logits never exist whole.
    loss_chunk_tokens: int = 4096

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def uses_fast_weights(self) -> bool:
        """Whether the inner loop runs at all (K=0 or --no-bilevel is plain SFT with the chosen mask)."""
        return self.bilevel and self.inner_steps > 0

    def fast_layers(self, num_layers: int) -> range:
        """Layers carrying fast weights: ``int(L * (1 - fraction)) .. L-1`` (18..27 of 28 at 0.35)."""
        return range(int(num_layers * (1 - self.layer_fraction)), num_layers)

    def validate(self, *, hidden_size: int, ffn_hidden_size: int) -> None:
        """Raise :class:`FocuSFTConfigError` naming the flag of the first bad setting."""
        if self.inner_steps < 0:
            raise FocuSFTConfigError(f"--focusft-inner-steps must be >= 0, got {self.inner_steps}")
        if not 0.0 < self.layer_fraction <= 1.0:
            raise FocuSFTConfigError(f"--focusft-layer-fraction must be in (0, 1], got {self.layer_fraction}")
        if self.lora_rank < 1:
            raise FocuSFTConfigError(f"--focusft-lora-rank must be >= 1, got {self.lora_rank}")
        width = min(hidden_size, ffn_hidden_size)
        if self.lora_rank > width:
            raise FocuSFTConfigError(
                f"--focusft-lora-rank {self.lora_rank} is larger than the FFN's width "
                f"(min(hidden {hidden_size}, ffn {ffn_hidden_size}) = {width})"
            )
        if self.lora_alpha <= 0:
            raise FocuSFTConfigError(
                f"--focusft-lora-alpha must be > 0 (the fast weights' scale alpha/r), got {self.lora_alpha}"
            )
        if self.inner_lr <= 0 or self.inner_grad_clip <= 0:
            raise FocuSFTConfigError("--focusft-inner-lr and --focusft-inner-grad-clip must be > 0")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise FocuSFTConfigError(f"fast-weight targets {self.targets} must be a non-empty subset of {TARGETS}")
        if self.attention_mask not in MASK_MODES:
            raise FocuSFTConfigError(f"--attention-mask must be one of {MASK_MODES}, got {self.attention_mask!r}")
        if self.recompute is not None and self.recompute not in RECOMPUTE_GRANULARITIES:
            raise FocuSFTConfigError(f"--recompute-granularity must be selective or full, got {self.recompute!r}")
        if self.loss_chunk_tokens < 1:
            raise FocuSFTConfigError("the loss chunk must hold at least one token")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise FocuSFTConfigError(f"--loss-reduction must be one of {LOSS_REDUCTIONS}")
        if self.attention_backend == "te" and self.attention_mask == "glm":
            raise FocuSFTConfigError(
                "--attention-backend te cannot run --attention-mask glm: TransformerEngine has no fused "
                "kernel for an arbitrary mask (the unfused path needs ~57 GB/layer at 32K for 7B); use flex"
            )
        if self.attention_backend == "te" and self.recompute == "selective":
            raise FocuSFTConfigError(
                "--recompute-granularity selective recomputes our own core attention (dense, flex); with "
                "--attention-backend te use --recompute-granularity full"
            )
