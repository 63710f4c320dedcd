"""PNG figures of attention statistics (matplotlib, the ``analysis`` extra): a heatmap of one layer,
per-layer bar charts of sink mass and context engagement, and the positional profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_focusft.analysis.attention_stats import AttentionStats


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plots needs matplotlib: pip install 'megatron-focusft[analysis]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(runs: dict[str, AttentionStats], out_dir: str | Path) -> list[Path]:
    """Figures for one run or several side by side (``{"name": stats}``); returns the written paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    names = list(runs)

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        st = runs[name]
        if st.heatmap is None:
            ax.set_axis_off()
            continue
        im = ax.imshow(np.log10(st.heatmap + 1e-6), cmap="viridis", vmin=-4, vmax=0, aspect="auto")
        ax.set_title(f"{name}: layer {st.heatmap_layer} (log10, mean over heads)")
        ax.set_xlabel("key position bin")
        ax.set_ylabel("query position bin")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(out / "heatmap.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    for metric in ("sink_mass", "context_engagement"):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            vals = getattr(runs[name], metric)
            ax.bar(np.arange(len(vals)) + j * width, vals, width, label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend()
        fig.tight_layout()
        written.append(out / f"{metric}_per_layer.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in names:
        prof = runs[name].profile.mean(0)
        ax.plot((np.arange(len(prof)) + 0.5) / len(prof), prof, marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("relative key position")
    ax.set_ylabel("attention mass (response queries)")
    ax.legend()
    fig.tight_layout()
    written.append(out / "positional_profile.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
