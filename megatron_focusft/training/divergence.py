"""Divergence checks after every optimizer step (as Megatron-LM's ``--check-for-nan-in-loss-and-grad`` and
its spiky-loss / large-grad checks): a run that has blown up stops instead of saving useless checkpoints.

- A non-finite loss or gradient norm skips the update (the optimizer does); ``max_nonfinite_steps`` such
  steps *in a row* stop the run with an error.  The loop then saves nothing: the last checkpoint written is
  the last good one.
- A loss spike (more than ``spike_factor`` times the mean of the last ``window`` finite losses) and a zero
  gradient norm on a non-empty batch (every weight receives gradient in SFT, so a zero norm means the model
  has collapsed, e.g. to the uniform distribution) are reported; with ``stop_on_anomaly`` they
  stop the run too.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class DivergenceConfig:
    max_nonfinite_steps: int = 3  # non-finite loss or grad norm this many steps in a row: stop (0: never)
    spike_factor: float = 10.0  # a loss above this many times the running mean is a spike
    window: int = 20  # the last finite losses the running mean is over (judged from the second step on)
    stop_on_anomaly: bool = False  # a spike or a zero gradient norm stops the run too (--check-for-spiky-loss)


@dataclass(frozen=True)
class Verdict:
    """What one step's figures say: ``report`` for the log, ``stop`` (an error message) to end the run."""

    report: str | None = None
    stop: str | None = None


class DivergenceMonitor:
    """Judges each step's loss and gradient norm against the run so far (the same on every rank: the figures
    are global-batch reductions)."""

    def __init__(self, config: DivergenceConfig) -> None:
        self.config = config
        self.recent: deque[float] = deque(maxlen=max(1, config.window))
        self.nonfinite_in_a_row = 0

    def observe(self, iteration: int, loss: float, grad_norm: float | None, tokens: float) -> Verdict:
        """``grad_norm``: None where the optimizer did not measure it (Megatron's, with --clip-grad 0)."""
        cfg = self.config
        if not (math.isfinite(loss) and math.isfinite(grad_norm if grad_norm is not None else 0.0)):
            self.nonfinite_in_a_row += 1
            what = f"iteration {iteration}: non-finite loss {loss} or gradient norm {grad_norm}: update skipped"
            if cfg.max_nonfinite_steps and self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                return Verdict(
                    stop=f"{what}; {self.nonfinite_in_a_row} steps in a row, training stopped (nothing saved "
                    "after the last good checkpoint; resume from it with a lower --lr or --focusft-inner-lr)"
                )
            return Verdict(report=f"warning: {what} ({self.nonfinite_in_a_row} in a row)")
        self.nonfinite_in_a_row = 0
        anomaly = None
        if self.recent:
            mean = sum(self.recent) / len(self.recent)
            if loss > cfg.spike_factor * mean:
                anomaly = (
                    f"loss spike at iteration {iteration}: {loss:.4g} is over {cfg.spike_factor:g}x the running "
                    f"mean {mean:.4g}"
                )
        if grad_norm == 0.0 and tokens > 0:
            anomaly = f"zero gradient norm at iteration {iteration} on a batch of {tokens:.0f} tokens"
        self.recent.append(loss)
        if anomaly is None:
            return Verdict()
        if cfg.stop_on_anomaly:
            return Verdict(stop=f"{anomaly}; training stopped (--check-for-spiky-loss), nothing saved")
        return Verdict(report=f"warning: {anomaly}")
