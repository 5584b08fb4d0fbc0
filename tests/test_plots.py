"""Smoke tests of k2mini.lab.plots on synthetic inputs (Agg backend): each helper returns a Figure/Axes
holding the artists it promises."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Rectangle

from k2mini.lab import plots


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def fake_history(steps=40, n_layers=2, E=8, vio=1.0, seed=0, eval_every=10):
    rng = np.random.default_rng(seed)
    step = np.arange(steps)
    val = np.full(steps, np.nan)
    val[eval_every - 1 :: eval_every] = 3.0 - 0.01 * step[eval_every - 1 :: eval_every]
    load = [rng.integers(0, 50, size=(n_layers, E)) for _ in step]
    return pd.DataFrame({
        "step": step, "train_loss": np.linspace(3, 2, steps), "val_loss": val,
        "maxvio": vio + rng.random(steps), **{f"maxvio_l{i + 1}": vio + rng.random(steps) for i in range(n_layers)},
        "load": load,
    })  # fmt: skip


def test_router_scores_boxes_the_chosen_experts():
    scores = np.random.default_rng(0).random((5, 16))
    chosen = np.argsort(-scores, axis=1)[:, :2]
    ax = plots.plot_router_scores(scores, chosen, tokens=list("hello"), bias=np.linspace(-0.1, 0.1, 16), title="t")
    assert any(isinstance(c, QuadMesh) for c in ax.collections)
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(boxes) == 10
    assert {(int(b.get_x()), int(b.get_y())) for b in boxes} == {(int(e), t) for t in range(5) for e in chosen[t]}
    assert [t.get_text() for t in ax.get_yticklabels()] == list("hello")
    assert len(ax.figure.axes) == 3  # heatmap, colour bar, bias axis on top


def test_maxvio_one_line_and_band_per_method():
    runs = {"none": [fake_history(vio=5, seed=s) for s in range(3)], "loss_free": fake_history(vio=0.2)}
    ax = plots.plot_maxvio(runs, smooth=5)
    assert [l.get_label() for l in ax.get_lines()] == ["none", "loss_free"]
    assert len(ax.collections) == 1  # seed band only where there are several seeds
    assert ax.get_yscale() == "log"
    assert len(ax.get_lines()[0].get_xdata()) == 40


def test_val_loss_uses_only_evaluation_steps():
    ax = plots.plot_val_loss({"a": [fake_history(seed=0), fake_history(seed=1)]})
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [10, 20, 30, 40]
    assert np.isfinite(line.get_ydata()).all()


def test_load_heatmaps_one_panel_per_layer_dead_is_below_scale():
    loads = {"none": np.array([[100, 0, 0, 4], [50, 30, 10, 10]]), "loss_free": np.full((2, 4), 26)}
    fig = plots.plot_load_heatmaps(loads)
    heat = [a for a in fig.axes if any(isinstance(c, QuadMesh) for c in a.collections) and a.get_title()]
    assert [a.get_title() for a in heat] == ["MoE layer 0", "MoE layer 1"]
    mesh = next(c for c in heat[0].collections if isinstance(c, QuadMesh))
    values = np.asarray(mesh.get_array()).reshape(2, 4)
    assert values[0, 0] == pytest.approx(100 / 26)  # most loaded first, relative to the mean
    assert values[0, -1] < 1 / 8  # dead expert: under the colour scale (drawn black)
    assert np.allclose(values[1], 1.0)


def test_load_over_time_bins_steps():
    ax = plots.plot_load_over_time(fake_history(steps=60, E=8), layer=1, bins=12)
    mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
    assert np.asarray(mesh.get_array()).reshape(8, 12).shape == (8, 12)
    assert ax.get_xlabel() == "step"


def test_seed_errorbars_and_sparsity():
    rows = [{"sparsity": s, "n_experts": 4 * s, "seed": seed, "val_loss": 2.5 - 0.02 * np.log2(s) + 0.005 * seed}
            for s in (2, 4, 8, 16) for seed in range(3)]  # fmt: skip
    table = pd.DataFrame(rows)
    ax = plots.plot_loss_vs_sparsity(table)
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    assert list(bars[0].lines[0].get_xdata()) == [2, 4, 8, 16]
    assert ax.get_xscale() == "log"
    assert len(ax.collections[-1].get_offsets()) == 12  # every seed drawn
    assert [t.get_text() for t in ax.texts] == ["E=8", "E=16", "E=32", "E=64"]

    two = pd.concat([table.assign(method="a"), table.assign(method="b", val_loss=table.val_loss + 0.1)])
    ax2 = plots.plot_seed_errorbars(two, "sparsity", "val_loss", hue="method", logx=2)
    assert len([c for c in ax2.containers if isinstance(c, ErrorbarContainer)]) == 2
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == ["a", "b"]


def test_param_counts_bars():
    table = pd.DataFrame({"n_experts": [8, 16], "total": [100, 200], "active": [50, 50]})
    ax = plots.plot_param_counts(table)
    heights = [p.get_height() for p in ax.patches]
    assert heights == [100, 200, 50, 50]


def test_methods_take_the_palettes_colours():
    from matplotlib.colors import to_rgb

    from k2mini.lab.palette import FIXED, colors

    assert plots.colors is colors and not hasattr(plots, "method_colors")
    runs = {"loss_free": fake_history(vio=0.2), "none": fake_history(vio=5), "E=8": fake_history(vio=1)}
    ax = plots.plot_maxvio(runs, smooth=5)
    drawn = {l.get_label(): to_rgb(l.get_color()) for l in ax.get_lines()}
    assert drawn == colors(list(runs))
    assert drawn["loss_free"] == to_rgb(FIXED["loss_free"]) and drawn["none"] == to_rgb(FIXED["none"])
    mine = {"loss_free": (0.0, 0.0, 0.0), "none": (1.0, 0.0, 0.0), "E=8": (0.0, 0.0, 1.0)}
    ax = plots.plot_maxvio(runs, smooth=5, colors=mine)  # a caller's colours win
    assert {l.get_label(): to_rgb(l.get_color()) for l in ax.get_lines()} == mine
