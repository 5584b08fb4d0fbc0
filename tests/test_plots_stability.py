"""Plots of run histories: built from synthetic RunResults, checked for what they draw."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from k2mini.lab import plots_stability as ps
from k2mini.lab.experiments import RunResult, RunSpec
from k2mini.lab.stability import summarize


def fake_run(optimizer, lr, tau=100.0, steps=60, diverge_at=None, growth=1.0):
    n = steps if diverge_at is None else diverge_at + 1
    step = np.arange(n)
    val = np.full(n, np.nan)
    val[19::20] = 3.0 - lr * 10 - np.arange(len(val[19::20])) * 0.1
    h = pd.DataFrame({
        "step": step, "tokens": (step + 1) * 64, "lr": lr,
        "train_loss": np.linspace(3.0, 2.0, n), "val_loss": val,
        "max_logit": 5.0 * np.exp(growth * step / steps),
    })  # fmt: skip
    if diverge_at is not None:
        h.loc[n - 1, "train_loss"] = np.nan
    if optimizer == "muonclip":
        clipped = (h["max_logit"] > tau).astype(float) * 2
        h["qk_clip/heads_clipped"] = clipped
        h["qk_clip/frac_heads_ever_clipped"] = np.maximum.accumulate(clipped) / 8
        h["post_clip_max_logit"] = np.where(clipped > 0, tau, np.nan)
        h["post_clip_max_logit_clipped"] = h["post_clip_max_logit"]
    spec = RunSpec(optimizer=optimizer, lr=lr, tau=tau, steps=steps)
    return RunResult(spec=spec, history=h, diverged=diverge_at is not None,
                     stop_reason="completed" if diverge_at is None else "nan", total_heads=8, wall_s=1.0)


@pytest.fixture
def runs():
    out = []
    for lr in (1e-3, 1e-2):
        out.append(fake_run("adamw", lr))
        out.append(fake_run("muon", lr, growth=4.0))
        out.append(fake_run("muonclip", lr, tau=30.0, growth=4.0))
        out.append(fake_run("muonclip", lr, tau=100.0, growth=4.0))
    out.append(fake_run("muon", 1e-1, diverge_at=30))
    yield out
    plt.close("all")


def test_colors(runs):
    groups = ["adamw", "muon", "muonclip tau=30", "muonclip tau=100"]
    colors = {ps.group_color(g, groups) for g in groups}
    assert len(colors) == 4
    small, large = (ps.run_color(r, runs) for r in runs if r.spec.optimizer == "adamw")
    assert sum(small) > sum(large)  # lighter for the smaller lr


def test_plot_max_logits_panels_and_tau(runs):
    fig = ps.plot_max_logits(runs, ncols=2)
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["adamw", "muon", "muonclip tau=30", "muonclip tau=100"]
    assert axes[0].get_yscale() == "log"
    tau_lines = [l for l in axes[2].get_lines() if l.get_linestyle() == "--"]
    assert len(tau_lines) == 1 and tau_lines[0].get_ydata()[0] == 30.0
    # the diverged muon run has its end marked
    assert any(l.get_marker() == "x" for l in axes[1].get_lines())
    assert len([l for l in axes[1].get_lines() if l.get_marker() != "x"]) == 3


def test_plot_losses(runs):
    fig = ps.plot_losses(runs[:4], smooth=5)
    ax_tr, ax_val = fig.axes[:2]
    assert len(ax_tr.get_lines()) == 4 and len(ax_val.get_lines()) == 4
    assert np.isfinite(ax_val.get_lines()[0].get_ydata()).all()


def test_plot_lr_sensitivity_marks_divergence(runs):
    table = summarize(runs)
    fig = ps.plot_lr_sensitivity(table)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [l.get_label() for l in ax.get_lines() if not l.get_label().startswith("_")]
    assert labels == ["adamw", "muon", "muonclip tau=30", "muonclip tau=100"]
    crosses = [l for l in ax.get_lines() if l.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_xdata()[0] == 1e-1


def test_plot_clip_share(runs):
    never = fake_run("muonclip", 1e-3, tau=1e4)  # never clips: left out of the plot
    fig = ps.plot_clip_share(runs + [never])
    ax = fig.axes[0]
    clip_runs = [r for r in runs if r.spec.optimizer == "muonclip"]
    assert all((r.history["qk_clip/heads_clipped"] > 0).any() for r in clip_runs)
    assert not (never.history["qk_clip/heads_clipped"] > 0).any()
    assert len(ax.get_lines()) == 2 * len(clip_runs)
    ys = np.concatenate([l.get_ydata() for l in ax.get_lines()])
    assert ys.min() >= 0 and ys.max() <= 1


def test_plots_on_given_axes_return_their_figure(runs):
    fig, axs = plt.subplots(1, 3)
    assert ps.plot_clip_share(runs, ax=axs[0]) is fig
    assert ps.plot_lr_sensitivity(summarize(runs), ax=axs[1]) is fig
    assert ps.plot_losses(runs[:2], axes=axs[1:]) is fig


def test_plot_loss_at_tokens_on_given_axes(runs):
    fig, ax = plt.subplots()
    out = ps.plot_loss_at_tokens(runs[:3], ax=ax)
    assert out is fig and len(ax.get_lines()) == 3
    assert ax.get_lines()[0].get_xdata()[0] == 20 * 64


def test_axes_count_checked(runs):
    fig, ax = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="need 4 axes"):
        ps.plot_max_logits(runs, axes=ax)
