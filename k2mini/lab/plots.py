"""Plots for the routing and sparsity notebooks: router scores, MaxVio curves, expert-load heatmaps,
validation loss, and seed-spread error bars.

Every helper draws on the Axes (or Figure) it is given, or on a new one, and returns it, so a notebook
cell is one call plus `plt.show()`. Inputs are plain arrays and DataFrames (train() histories, the
summaries of `k2mini.lab.routing_study`), never models. Seaborn draws the heatmaps; the rest is matplotlib.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from .palette import colors

_palette = colors  # the functions below take a `colors=` argument that shadows the name

__all__ = [
    "plot_router_scores",
    "plot_maxvio",
    "plot_val_loss",
    "plot_load_heatmaps",
    "plot_load_over_time",
    "plot_seed_errorbars",
    "plot_loss_vs_sparsity",
    "plot_param_counts",
    "colors",
]


def _ax(ax, figsize):
    return ax if ax is not None else plt.subplots(figsize=figsize)[1]


def _as_runs(runs) -> dict[str, list[pd.DataFrame]]:
    """{label: history} or {label: [history per seed]} -> {label: [histories]}."""
    return {k: [v] if isinstance(v, pd.DataFrame) else list(v) for k, v in runs.items()}


def plot_router_scores(scores, chosen, *, tokens: Sequence[str] | None = None, bias=None, ax=None, title=None):
    """Heatmap of sigmoid router scores (tokens x experts), the chosen experts boxed.

    scores: (N, E) array; chosen: (N, k) expert indices; tokens: row labels; bias: optional (E,)
    correction bias, written along the top axis (it shifts the choice, not the colour). Returns the Axes.
    """
    scores = np.asarray(scores, dtype=float)
    chosen = np.asarray(chosen)
    N, E = scores.shape
    ax = _ax(ax, (min(14, 1.2 + 0.42 * E), 0.9 + 0.42 * N))
    labels = list(tokens) if tokens is not None else [str(i) for i in range(N)]
    sns.heatmap(scores, ax=ax, cmap="viridis", annot=E <= 24, fmt=".2f", annot_kws={"size": 7},
                xticklabels=list(range(E)), yticklabels=labels, cbar_kws={"label": "sigmoid score $s_{i,t}$"})
    for t in range(N):
        for e in chosen[t]:
            ax.add_patch(Rectangle((int(e), t), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_xlabel("routed expert (red box: chosen)")
    ax.set_ylabel("token")
    ax.tick_params(axis="y", rotation=0)
    if bias is not None:
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        top.set_xticks(np.arange(E) + 0.5, [f"{b:+.2f}" for b in np.asarray(bias, dtype=float)], rotation=90, fontsize=7)
        top.set_xlabel("correction bias $b_i$")
    if title:
        ax.set_title(title, pad=40 if bias is not None else 6)
    return ax


def _band(ax, x, ys: np.ndarray, color, label, lw=1.6):
    """Mean line over rows of ys, shaded from the min to the max row (the seed spread)."""
    mean = np.nanmean(ys, axis=0)
    ax.plot(x, mean, color=color, lw=lw, label=label)
    if ys.shape[0] > 1:
        ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=color, alpha=0.2, lw=0)


def plot_maxvio(runs, *, column: str = "maxvio", smooth: int = 10, ax=None, logy: bool = True, colors=None, title=None):
    """MaxVio over training steps, one line per label (mean over seeds, band = seed min..max).

    runs: {label: history} or {label: [histories]}; histories need `step` and `column`.
    smooth: rolling-mean window in logged steps (1 = raw). Returns the Axes.
    """
    runs = _as_runs(runs)
    colors = colors or _palette(list(runs))
    ax = _ax(ax, (7, 3.6))
    for label, hs in runs.items():
        x = hs[0]["step"].to_numpy()
        ys = np.stack([h[column].rolling(smooth, min_periods=1).mean().to_numpy() for h in hs])
        _band(ax, x, ys, colors[label], label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"MaxVio ({column}, {smooth}-step mean)" if smooth > 1 else f"MaxVio ({column})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_val_loss(runs, *, ax=None, colors=None, title=None):
    """Validation loss at the evaluation steps, one line per label (mean over seeds, band = spread)."""
    runs = _as_runs(runs)
    colors = colors or _palette(list(runs))
    ax = _ax(ax, (6, 3.6))
    for label, hs in runs.items():
        evals = [h.dropna(subset=["val_loss"]) for h in hs]
        x = evals[0]["step"].to_numpy() + 1
        ys = np.stack([e["val_loss"].to_numpy() for e in evals])
        _band(ax, x, ys, colors[label], label)
        ax.scatter(x, ys.mean(0), color=colors[label], s=12)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_load_heatmaps(loads: Mapping[str, np.ndarray], *, layer_names: Sequence[str] | None = None,
                       sort: bool = True, vmax: float = 8.0, fig=None, title=None):  # fmt: skip
    """Expert load relative to uniform, one heatmap per MoE layer, one row per label.

    loads: {label: array (n_layers, E)} of token-slot counts (summed over some window of steps).
    Each cell is load_i / mean(load) on a log colour scale centred on 1 (uniform): red = overloaded,
    blue = starved, black = dead (no token at all). sort: experts ranked by load within each row, so
    rows with the same shape of imbalance look alike. Returns the Figure.
    """
    labels = list(loads)
    arrays = [np.asarray(loads[k], dtype=float) for k in labels]
    n_layers, E = arrays[0].shape
    names = list(layer_names) if layer_names is not None else [f"MoE layer {i}" for i in range(n_layers)]
    if fig is None:
        fig = plt.figure(figsize=(min(16, 2.5 + 0.28 * E * n_layers + 1.5), 0.9 + 0.45 * len(labels)))
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    floor = 1 / vmax
    cmap = sns.color_palette("vlag", as_cmap=True).with_extremes(under="black")
    for j, ax in enumerate(axes):
        rel = np.stack([a[j] / max(a[j].mean(), 1e-12) for a in arrays])  # (labels, E)
        if sort:
            rel = -np.sort(-rel, axis=1)
        shown = np.where(rel > 0, np.clip(rel, floor, vmax), floor / 2)  # zero -> below the scale: black
        last = j == n_layers - 1
        sns.heatmap(shown, ax=ax, cmap=cmap, norm=LogNorm(vmin=floor, vmax=vmax), cbar=last,
                    cbar_kws={"label": "load / uniform (black: none)", "extend": "min"} if last else None,
                    yticklabels=labels if j == 0 else False, xticklabels=False)  # fmt: skip
        if last:
            ticks = [2.0**p for p in range(int(np.floor(np.log2(floor))), int(np.ceil(np.log2(vmax))) + 1)]
            cbar = ax.collections[0].colorbar
            cbar.set_ticks(ticks, labels=[f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
            cbar.minorticks_off()
        ax.set_title(names[j], fontsize=10)
        ax.set_xlabel("experts, most to least loaded" if sort else "expert")
        ax.tick_params(axis="y", rotation=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_load_over_time(loads, layer: int = 0, *, bins: int = 30, ax=None, title=None):
    """Heatmap of one MoE layer's expert load over training (time bins x experts), relative to uniform.

    loads: a run's per-step loads, array (steps, moe_layers, E) (`RunResult.loads`), or a train()
    history with its `load` column (array [moe_layers, E] per row); layer indexes the MoE layers
    (0 = first MoE layer). Returns the Axes.
    """
    if isinstance(loads, pd.DataFrame):
        steps, loads = loads["step"].to_numpy(), np.stack(loads["load"].to_numpy())
    else:
        loads = np.asarray(loads)
        steps = np.arange(len(loads))
    loads = loads[:, layer].astype(float)  # (steps, E)
    edges = np.linspace(0, len(loads), min(bins, len(loads)) + 1).astype(int)
    binned = np.stack([loads[a:b].sum(0) for a, b in zip(edges[:-1], edges[1:])])
    rel = binned / binned.mean(1, keepdims=True)
    ax = _ax(ax, (8, 3.6))
    sns.heatmap(rel.T, ax=ax, cmap="vlag", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, rel.max())),
                cbar_kws={"label": "load / uniform"}, xticklabels=False, yticklabels=max(1, loads.shape[1] // 8))
    ticks = np.linspace(0, len(binned), 5)
    ax.set_xticks(ticks, [str(int(steps[min(int(t * len(loads) / len(binned)), len(steps) - 1)])) for t in ticks])
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    ax.tick_params(axis="y", rotation=0)
    if title:
        ax.set_title(title)
    return ax


def plot_seed_errorbars(table: pd.DataFrame, x: str, y: str, *, hue: str | None = None, ax=None, logx: float | None = None,
                        colors=None, xlabel=None, ylabel=None, title=None):  # fmt: skip
    """Mean of `y` per `x` (one line per `hue`) with error bars from the seed spread (min..max), and
    every seed as a dot. table: one row per run. logx: log base of the x axis (None = linear)."""
    ax = _ax(ax, (6, 3.6))
    groups = [(None, table)] if hue is None else list(table.groupby(hue, sort=False))
    colors = colors or _palette([str(g) for g, _ in groups])
    for g, df in groups:
        color = colors[str(g)]
        stats = df.groupby(x)[y].agg(["mean", "min", "max"]).sort_index()
        err = np.stack([stats["mean"] - stats["min"], stats["max"] - stats["mean"]])
        ax.errorbar(stats.index, stats["mean"], yerr=err, color=color, marker="o", capsize=4, lw=1.6,
                    label=None if g is None else str(g))
        ax.scatter(df[x], df[y], color=color, s=22, alpha=0.55, zorder=3, edgecolors="none")
    if logx:
        ax.set_xscale("log", base=logx)
        xs = np.sort(table[x].unique())
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(alpha=0.3)
    if hue is not None:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_loss_vs_sparsity(table: pd.DataFrame, *, y: str = "val_loss", ax=None, title=None):
    """Validation loss against sparsity (routed experts / active routed experts), log2 x axis, error
    bars over seeds, with the total routed experts written above each point. table: one row per run
    with columns `sparsity`, `n_experts`, `seed` and `y`."""
    ax = plot_seed_errorbars(table, "sparsity", y, ax=ax, logx=2, xlabel="sparsity (total / active routed experts)",
                             ylabel="validation loss (nats/byte)", title=title)  # fmt: skip
    stats = table.groupby("sparsity").agg(n=("n_experts", "first"), top=(y, "max"))
    for s, row in stats.iterrows():
        ax.annotate(f"E={int(row['n'])}", (s, row["top"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.margins(y=0.15)
    return ax


def plot_param_counts(table: pd.DataFrame, *, x: str = "n_experts", ax=None, title=None):
    """Grouped bars of total and active parameters per configuration (columns `total`, `active`)."""
    ax = _ax(ax, (6, 3.2))
    pos = np.arange(len(table))
    ax.bar(pos - 0.2, table["total"], width=0.4, label="total", color="tab:blue")
    ax.bar(pos + 0.2, table["active"], width=0.4, label="active per token", color="tab:orange")
    ax.set_xticks(pos, [str(v) for v in table[x]])
    ax.set_xlabel(x)
    ax.set_ylabel("parameters")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k"))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title)
    return ax
