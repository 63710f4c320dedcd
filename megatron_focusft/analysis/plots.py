"""PNG figures of attention statistics (matplotlib, the ``analysis`` extra): a heatmap of one layer, per-layer
bar charts of sink mass and of context engagement (system/user and tool turns, as the JSON splits them), and
the positional profile; one checkpoint or several side by side.

Every figure has a title, axis labels and, for each checkpoint, a label naming the model, its iteration and
the attention mask of the pass; legends sit outside the axes (below them), so they cover no data; layer axes
have integer ticks (0-based, as the JSON's ``layer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megatron_focusft.analysis.attention_stats import SINK_TOKENS, SYSTEM_USER, TOOL, AttentionStats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEATMAP, SINK_MASS, CONTEXT, PROFILE = (
    "heatmap.png",
    "sink_mass_per_layer.png",
    "context_engagement_per_layer.png",
    "positional_profile.png",
)
DPI = 100


@dataclass(frozen=True)
class PlotRun:
    """One analysed checkpoint: the model's name, the checkpoint's iteration and the pass's statistics (which
    hold its mask)."""

    model: str
    iteration: int
    stats: AttentionStats

    @property
    def label(self) -> str:
        return f"{self.model} (iteration {self.iteration}, {self.stats.mask_mode} mask)"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plots needs matplotlib: pip install 'megatron-focusft[analysis]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_figures(runs: list[PlotRun]) -> dict[str, Figure]:
    """``{file name: figure}`` of the runs (the caller saves and closes them)."""
    plt = _pyplot()
    return {
        HEATMAP: _heatmap(plt, runs),
        SINK_MASS: _sink_mass(plt, runs),
        CONTEXT: _context(plt, runs),
        PROFILE: _profile(plt, runs),
    }


def write_plots(runs: list[PlotRun], out_dir: str | Path) -> list[Path]:
    """Write :func:`attention_figures` as PNGs into ``out_dir``; returns the written paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in attention_figures(runs).items():
        written.append(out / name)
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    return written


def _heatmap(plt, runs: list[PlotRun]) -> Figure:
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 5), squeeze=False, layout="constrained")
    for ax, run in zip(axes[0], runs):
        st = run.stats
        ax.set_title(f"{run.label}\nlayer {st.heatmap_layer} (0-based)", fontsize=10)
        if st.heatmap is None:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no heatmap", ha="center", transform=ax.transAxes)
            continue
        grid = st.heatmap.shape[0]
        im = ax.imshow(np.log10(st.heatmap + 1e-6), cmap="viridis", vmin=-4, vmax=0, aspect="auto")
        ax.set_xlabel(f"key position (bin of {grid})")
        ax.set_ylabel(f"query position (bin of {grid})")
        fig.colorbar(im, ax=ax, label="log10 attention (mean over heads)")
    fig.suptitle("Attention map of one layer, first sample")
    return fig


def _layer_axes(plt, runs: list[PlotRun]):
    """A figure wide enough for the layers, and the bar offsets of each run around the integer layer ticks."""
    layers = runs[0].stats.category.shape[0]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * layers * len(runs) + 3), 4.2), layout="constrained")
    width = 0.8 / len(runs)
    offsets = [(j - (len(runs) - 1) / 2) * width for j in range(len(runs))]
    step = max(1, math.ceil(layers / 24))
    ax.set_xticks(range(0, layers, step))
    ax.set_xlim(-0.6, layers - 0.4)
    ax.set_xlabel("layer (0-based)")
    ax.grid(axis="y", alpha=0.3)
    return fig, ax, width, offsets


def _legend_below(fig: Figure, ax, columns: int) -> None:
    """The legend outside the axes, below them (constrained layout keeps it inside the figure)."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=columns, fontsize=9)


def _sink_mass(plt, runs: list[PlotRun]) -> Figure:
    fig, ax, width, offsets = _layer_axes(plt, runs)
    for j, (run, dx) in enumerate(zip(runs, offsets)):
        vals = run.stats.sink_mass
        ax.bar(np.arange(len(vals)) + dx, vals, width, color=f"C{j}", label=run.label)
    ax.set_ylabel("share of attention")
    ax.set_title(f"Sink mass per layer: attention of response tokens on positions 0-{SINK_TOKENS - 1}")
    _legend_below(fig, ax, min(len(runs), 2))
    return fig


def _context(plt, runs: list[PlotRun]) -> Figure:
    fig, ax, width, offsets = _layer_axes(plt, runs)
    for j, (run, dx) in enumerate(zip(runs, offsets)):
        system_user, tool = run.stats.category[:, SYSTEM_USER], run.stats.category[:, TOOL]
        x = np.arange(len(system_user)) + dx
        ax.bar(x, system_user, width, color=f"C{j}", label=f"{run.label}: system/user")
        ax.bar(x, tool, width, bottom=system_user, color=f"C{j}", alpha=0.45, hatch="//", label=f"{run.label}: tool")
    ax.set_ylabel("share of attention")
    ax.set_title(
        f"Context engagement per layer: system/user and tool turns (stacked; positions 0-{SINK_TOKENS - 1} excluded)"
    )
    _legend_below(fig, ax, 2)
    return fig


def _profile(plt, runs: list[PlotRun]) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    for j, run in enumerate(runs):
        prof = run.stats.profile.mean(0)
        ax.plot((np.arange(len(prof)) + 0.5) / len(prof), prof, marker="o", color=f"C{j}", label=run.label)
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative key position k / S (bin centres)")
    ax.set_ylabel("share of attention (mean over layers)")
    ax.set_title("Where response tokens look: attention by relative key position")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, min(len(runs), 2))
    return fig
