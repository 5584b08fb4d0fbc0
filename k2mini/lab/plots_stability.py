"""Plots of training-run histories for the optimizer-stability experiments (AdamW vs Muon vs MuonClip).

Every function takes `RunResult`s (from `k2mini.lab.experiments.run_sweep` or `read_record`) or the
`summarize(...)` table, draws on the axes it is given (or a new figure) and returns the figure.
Runs are grouped by optimizer ("adamw", "muon", "muonclip tau=..."): one colour family per group,
darker for larger learning rates.
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors

from .palette import colors
from .stability import optimizer_group

__all__ = [
    "group_color",
    "run_color",
    "plot_max_logits",
    "plot_losses",
    "plot_lr_sensitivity",
    "plot_clip_share",
    "plot_loss_at_tokens",
]

def _groups(results) -> list[str]:
    seen = []
    for r in results:
        g = optimizer_group(r.spec)
        if g not in seen:
            seen.append(g)
    return seen


def group_color(group: str, all_groups: Sequence[str] = ()) -> tuple:
    """The palette's colour of an optimizer group, among `all_groups` (a second muonclip tau differs)."""
    return colors(list(all_groups) + [group])[group]


def run_color(result, results) -> tuple:
    """The group's colour, lighter for the smaller learning rates of that group."""
    group = optimizer_group(result.spec)
    lrs = sorted({r.spec.lr for r in results if optimizer_group(r.spec) == group})
    base = np.array(mcolors.to_rgb(group_color(group, _groups(results))))
    t = 1.0 if len(lrs) < 2 else 0.35 + 0.65 * lrs.index(result.spec.lr) / (len(lrs) - 1)
    return tuple(1 - t * (1 - base))  # t=1: the base colour; smaller t: towards white


def _axes(axes, n, ncols=None, size=(4.2, 3.2), sharey=False):
    if axes is not None:
        axes = np.atleast_1d(axes).ravel()
        if len(axes) < n:
            raise ValueError(f"need {n} axes, got {len(axes)}")
        return axes[0].figure, axes
    ncols = ncols or n
    nrows = math.ceil(n / ncols)
    fig, ax = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), sharey=sharey,
                           squeeze=False, layout="constrained")
    return fig, ax.ravel()


def _finite(h, col):
    if col not in h:
        return h.iloc[:0]
    v = h[col]
    return h[np.isfinite(v.to_numpy(dtype=float))]


def plot_max_logits(results, *, axes=None, logy: bool = True, ncols: int | None = None, ylim=None):
    """Max attention logit over steps, one panel per optimizer group, one line per learning rate;
    the tau line on MuonClip panels, an 'x' where a run diverged (K2 report, Figure 2, in miniature)."""
    groups = _groups(results)
    fig, axs = _axes(axes, len(groups), ncols, sharey=True)
    for ax, group in zip(axs, groups):
        runs = [r for r in results if optimizer_group(r.spec) == group]
        for r in sorted(runs, key=lambda r: r.spec.lr):
            h = _finite(r.history, "max_logit")
            ax.plot(h["step"], h["max_logit"], color=run_color(r, results), lw=1.3, label=f"lr {r.spec.lr:g}")
            if r.diverged and len(h):
                ax.plot(h["step"].iloc[-1], h["max_logit"].iloc[-1], "x", color="black", ms=7, mew=2)
        if group.startswith("muonclip"):
            tau = runs[0].spec.tau
            ax.axhline(tau, color="black", ls="--", lw=1, label=f"tau = {tau:g}")
        ax.set_title(group)
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    axs[0].set_ylabel("max attention logit (all layers, heads)")
    for ax in axs[len(groups):]:
        ax.set_visible(False)
    return fig


def plot_losses(results, *, axes=None, smooth: int = 10, ylim=None):
    """Training loss (rolling mean over `smooth` steps) and validation loss over steps, per run."""
    fig, axs = _axes(axes, 2)
    ax_tr, ax_val = axs[:2]
    for r in results:
        h = _finite(r.history, "train_loss")
        c, name = run_color(r, results), f"{optimizer_group(r.spec)}, lr {r.spec.lr:g}"
        ax_tr.plot(h["step"], h["train_loss"].rolling(smooth, min_periods=1).mean(), color=c, lw=1.2, label=name)
        v = _finite(r.history, "val_loss")
        ax_val.plot(v["step"], v["val_loss"], "o-", color=c, lw=1.2, ms=3, label=name)
    for ax, title in ((ax_tr, f"training loss (mean of {smooth} steps)"), (ax_val, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.grid(alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
    ax_val.legend(fontsize=7, ncol=1 if len(results) < 8 else 2)
    return fig


def plot_lr_sensitivity(summary, *, ax=None, metric: str = "final_val_loss", diverged_at: float | None = None):
    """Final validation loss against learning rate per optimizer group (log x); a diverged run is an
    'x' drawn at the top of the axes (or at `diverged_at`)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.6), layout="constrained")
    fig = ax.figure
    groups = list(dict.fromkeys(summary["group"]))
    ok = summary[~summary["diverged"].astype(bool)]
    top = diverged_at if diverged_at is not None else (float(np.nanmax(ok[metric])) + 0.1 if len(ok) else 1.0)
    for group in groups:
        rows = summary[summary["group"] == group].sort_values("lr")
        color = group_color(group, groups)
        good = rows[~rows["diverged"].astype(bool)]
        ax.plot(good["lr"], good[metric], "o-", color=color, label=group)
        bad = rows[rows["diverged"].astype(bool)]
        if len(bad):
            ax.plot(bad["lr"], [top] * len(bad), "x", color=color, ms=9, mew=2)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("learning-rate sensitivity (x: diverged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_clip_share(results, *, ax=None, smooth: int = 10):
    """Share of heads QK-Clip rescaled at each step (rolling mean over `smooth` steps, solid) and the
    share clipped at least once so far (dashed), per MuonClip run."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.6), layout="constrained")
    clip_runs = [r for r in results if r.spec.optimizer == "muonclip" and "qk_clip/heads_clipped" in r.history
                 and (r.history["qk_clip/heads_clipped"] > 0).any()]  # runs that never clipped: a flat 0
    for r in clip_runs:
        h = r.history
        if "qk_clip/heads_clipped" not in h:
            continue
        c = run_color(r, results)
        share = h["qk_clip/heads_clipped"] / r.total_heads
        name = f"tau {r.spec.tau:g}, lr {r.spec.lr:g}"
        ax.plot(h["step"], share.rolling(smooth, min_periods=1).mean(), color=c, lw=1.4, label=name)
        if "qk_clip/frac_heads_ever_clipped" in h:
            ax.plot(h["step"], h["qk_clip/frac_heads_ever_clipped"], color=c, lw=1, ls="--")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("share of heads")
    ax.set_title(f"heads clipped (solid: per step, mean of {smooth}; dashed: ever)", fontsize=10)
    ax.grid(alpha=0.3)
    if clip_runs:
        ax.legend(fontsize=7)
    return ax.figure


def plot_loss_at_tokens(results, *, ax=None, logx: bool = False):
    """Validation loss against tokens seen, one line per run (pass e.g. each optimizer's best lr)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.6), layout="constrained")
    groups = _groups(results)
    for r in results:
        v = _finite(r.history, "val_loss")
        ax.plot(v["tokens"], v["val_loss"], "o-", ms=3, color=group_color(optimizer_group(r.spec), groups),
                label=f"{optimizer_group(r.spec)}, lr {r.spec.lr:g}")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("loss at equal tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure
