"""tools/analyze_attention.py's figures, looked at: titles, labels naming model, iteration and mask, integer
layer ticks, legends outside the axes, the context-engagement bars split into system/user and tool as the
JSON is, and the PNGs' sizes."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from megatron_focusft.analysis.attention_stats import CATEGORIES, SYSTEM_USER, TOOL, AttentionStats

pytest.importorskip("matplotlib")

from megatron_focusft.analysis import plots  # noqa: E402 - after the skip: it needs matplotlib


def _stats(layers: int, mask: str, seed: int) -> AttentionStats:
    rng = np.random.default_rng(seed)
    category = rng.dirichlet(np.ones(len(CATEGORIES)), size=layers)
    profile = rng.dirichlet(np.ones(16), size=layers)
    heatmap = np.tril(rng.random((32, 32)))
    return AttentionStats(category, profile, 4, heatmap / heatmap.sum(1, keepdims=True), layers // 2, mask)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(params=[1, 2], ids=["one run", "two runs"])
def runs(request) -> list[plots.PlotRun]:
    pair = [
        plots.PlotRun("qwen-sft", 1200, _stats(28, "causal", 0)),
        plots.PlotRun("qwen-focusft", 1200, _stats(28, "glm", 1)),
    ]
    return pair[: request.param]


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_every_figure_has_a_title_labels_and_a_legend_that_covers_nothing(runs):
    figures = plots.attention_figures(runs)
    assert list(figures) == [plots.HEATMAP, plots.SINK_MASS, plots.CONTEXT, plots.PROFILE]
    for name, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert all(ax.get_title() for ax in axes), name
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes), name
        if name == plots.HEATMAP:
            assert fig.get_suptitle() == "Attention map of one layer, first sample" and not fig.legends
            for ax, run in zip(axes, runs):
                assert ax.get_title().splitlines() == [run.label, f"layer {run.stats.heatmap_layer} (0-based)"]
            continue
        [legend] = fig.legends
        assert all(ax.get_legend() is None for ax in axes)  # none inside an axes
        box, figure_box = legend.get_window_extent(renderer), fig.bbox
        assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in fig.axes), name
        inside = figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0  # not cut off
        assert inside and box.y1 <= min(ax.get_window_extent(renderer).y0 for ax in axes), name  # below the axes
        texts = [t.get_text() for t in legend.get_texts()]
        for run in runs:
            assert any(run.label in t for t in texts), (name, texts)
            assert f"{run.model} (iteration 1200, {run.stats.mask_mode} mask)" == run.label


def test_layer_axes_have_integer_ticks_at_the_layers(runs):
    figures = plots.attention_figures(runs)
    for name in (plots.SINK_MASS, plots.CONTEXT):
        fig = figures[name]
        fig.canvas.draw()
        [ax] = fig.axes
        ticks = ax.get_xticks()
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert list(ticks) == list(range(0, 28, 2)) and labels == [str(i) for i in range(0, 28, 2)]
        assert ax.get_xlabel() == "layer (0-based)"
        per_run = ax.containers[:: 2 if name == plots.CONTEXT else 1]
        centres = np.mean([[b.get_x() + b.get_width() / 2 for b in bars] for bars in per_run], axis=0)
        assert list(centres) == pytest.approx(list(range(28)))  # each layer's bars around its tick
    small = plots.attention_figures([plots.PlotRun("tiny", 3, _stats(3, "glm", 2))])[plots.SINK_MASS]
    assert [t.get_text() for t in small.axes[0].get_xticklabels()] == ["0", "1", "2"]


def test_context_engagement_is_split_into_system_user_and_tool_as_the_json_is(runs):
    fig = plots.attention_figures(runs)[plots.CONTEXT]
    [ax] = fig.axes
    assert len(ax.containers) == 2 * len(runs)
    for run, system_user, tool in zip(runs, ax.containers[::2], ax.containers[1::2]):
        layers = run.stats.to_json()["layers"]
        assert system_user.get_label() == f"{run.label}: system/user" and tool.get_label() == f"{run.label}: tool"
        assert [b.get_height() for b in system_user] == pytest.approx([layer["system_user"] for layer in layers])
        assert [b.get_height() for b in tool] == pytest.approx([layer["tool"] for layer in layers])
        assert [b.get_y() for b in tool] == pytest.approx(list(run.stats.category[:, SYSTEM_USER]))  # stacked
        tops = [b.get_y() + b.get_height() for b in tool]
        assert tops == pytest.approx([layer["context_engagement"] for layer in layers])
        assert tops == pytest.approx(list(run.stats.category[:, SYSTEM_USER] + run.stats.category[:, TOOL]))
    assert "system/user and tool" in ax.get_title()


def test_the_pngs_have_the_figures_sizes(runs, tmp_path):
    sizes = {name: fig.get_size_inches() * plots.DPI for name, fig in plots.attention_figures(runs).items()}
    written = plots.write_plots(runs, tmp_path / "plots")
    assert [p.name for p in written] == list(sizes)
    for path in written:
        png = path.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 15_000, path.name
        assert struct.unpack(">II", png[16:24]) == tuple(int(round(v)) for v in sizes[path.name]), path.name


def test_the_tool_labels_each_checkpoint_by_name_iteration_and_mask():
    import argparse
    import importlib

    tool = importlib.import_module("tools.analyze_attention")
    a, b = _stats(3, "causal", 0), _stats(3, "glm", 1)

    def labels(ckpt, compare, stats):
        args = argparse.Namespace(ckpt=ckpt, compare=compare)
        return [r.label for r in tool._plot_runs(args, stats, {"a": 10, "b": 20})]

    assert labels("runs/sft", None, {"a": a}) == ["sft (iteration 10, causal mask)"]
    assert labels("runs/sft", "runs/focusft", {"a": a, "b": b}) == [
        "sft (iteration 10, causal mask)",
        "focusft (iteration 20, glm mask)",
    ]
    assert labels("sft/ckpt", "focusft/ckpt", {"a": a, "b": b})[1] == "focusft/ckpt (iteration 20, glm mask)"
    # the same checkpoint twice under the same mask: only a / b tells them apart
    tool_runs = tool._plot_runs(argparse.Namespace(ckpt="runs/x", compare="runs/x"), {"a": a, "b": a}, {"a": 1, "b": 1})
    assert [r.label for r in tool_runs] == [
        "a: runs/x (iteration 1, causal mask)",
        "b: runs/x (iteration 1, causal mask)",
    ]
