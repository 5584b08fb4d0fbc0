"""k2mini.lab.stability: per-run summaries, optimizer groups, best runs, tokens to a loss and rounding,
on synthetic RunResults whose numbers are known."""

import math

import numpy as np
import pandas as pd
import pytest

from k2mini.lab.experiments import RunResult, RunSpec
from k2mini.lab.stability import (best_runs, clips_per_part, format_summary, long_specs, optimizer_group, significant,
                                  summarize, sweep_specs, tokens_to_reach)


def fake_run(optimizer="adamw", lr=1e-3, tau=100.0, steps=40, val=(3.0, 2.5, 2.2, 2.0), peak=None,
             clips=(), post=None, diverge_at=None):
    """A run of `steps` steps, evaluated every steps // len(val) steps; max logit 5 except `peak` (step,
    value) if given; MuonClip clips 2 heads at the steps in `clips`, with post-clip logit `post`."""
    n = steps if diverge_at is None else diverge_at + 1
    step = np.arange(n)
    every = steps // len(val)
    v = np.full(n, np.nan)
    for i, x in enumerate(val):
        if (i + 1) * every - 1 < n:
            v[(i + 1) * every - 1] = x
    ml = np.full(n, 5.0)
    if peak is not None:
        ml[peak[0]] = peak[1]
    h = pd.DataFrame({"step": step, "tokens": (step + 1) * 100, "train_loss": np.linspace(3.0, 2.0, n),
                      "val_loss": v, "max_logit": ml})  # fmt: skip
    if diverge_at is not None:
        h.loc[n - 1, ["train_loss", "max_logit"]] = [np.nan, np.inf]
    if optimizer == "muonclip":
        clipped = np.isin(step, clips) * 2.0
        h["qk_clip/heads_clipped"] = clipped
        h["qk_clip/frac_heads_ever_clipped"] = np.maximum.accumulate(clipped) / 8
        h["post_clip_max_logit"] = np.where(clipped > 0, tau if post is None else post, np.nan)
        h["post_clip_max_logit_clipped"] = h["post_clip_max_logit"]
    return RunResult(spec=RunSpec(optimizer=optimizer, lr=lr, tau=tau, steps=steps), history=h,
                     diverged=diverge_at is not None, stop_reason="completed" if diverge_at is None else "nan",
                     total_heads=8, wall_s=1.0)  # fmt: skip


def test_optimizer_group():
    assert optimizer_group(RunSpec(optimizer="adamw", tau=30.0)) == "adamw"
    assert optimizer_group(RunSpec(optimizer="muon")) == "muon"
    assert optimizer_group(RunSpec(optimizer="muonclip", tau=30.0)) == "muonclip tau=30"
    assert optimizer_group(RunSpec(optimizer="muonclip", tau=2.5)) == "muonclip tau=2.5"


def test_summarize():
    runs = [fake_run("adamw", peak=(10, 30.0)),
            fake_run("muonclip", tau=20.0, peak=(12, 25.0), clips=[12, 17], post=22.0),
            fake_run("muonclip", tau=100.0, clips=[]),
            fake_run("muon", lr=1e-1, diverge_at=25)]  # fmt: skip
    t = summarize(runs, tail=10)
    assert t["run"].tolist() == [r.name for r in runs]
    assert t["group"].tolist() == ["adamw", "muonclip tau=20", "muonclip tau=100", "muon"]
    assert t["peak_max_logit"].tolist()[:3] == [30.0, 25.0, 5.0]
    assert t.loc[3, "peak_max_logit"] == 5.0  # the inf of the diverged step is not a peak
    h = runs[0].history
    assert t.loc[0, "final_max_logit"] == pytest.approx(h["max_logit"].tail(10).mean())
    assert t.loc[0, "final_train_loss"] == pytest.approx(h["train_loss"].tail(10).mean())
    assert t.loc[0, "final_val_loss"] == 2.0 and not t.loc[0, "diverged"]
    assert math.isnan(t.loc[0, "tau"]) and t.loc[1, "tau"] == 20.0
    # MuonClip columns
    assert (t.loc[1, "clip_steps"], t.loc[1, "last_clip_step"]) == (2, 17)
    assert t.loc[1, "frac_heads_ever_clipped"] == 0.25
    assert t.loc[1, "worst_post_clip_over_tau"] == pytest.approx(22.0 / 20.0)
    assert (t.loc[2, "clip_steps"], t.loc[2, "last_clip_step"], t.loc[2, "frac_heads_ever_clipped"]) == (0, -1, 0.0)
    assert math.isnan(t.loc[2, "worst_post_clip_over_tau"])
    assert math.isnan(t.loc[0, "clip_steps"])  # not a MuonClip run
    # the diverged run: its final figures are over its finite steps, its val loss is NaN
    assert t.loc[3, "diverged"] and math.isnan(t.loc[3, "final_val_loss"])
    finite = runs[3].history.iloc[:-1]
    assert t.loc[3, "final_train_loss"] == pytest.approx(finite["train_loss"].tail(10).mean())


def test_best_runs_picks_lowest_finished_val_loss():
    runs = [fake_run("adamw", lr=1e-3, val=(3.0, 2.5)), fake_run("muon", lr=1e-3, val=(3.0, 2.4)),
            fake_run("adamw", lr=1e-2, val=(3.0, 2.3)), fake_run("muon", lr=1e-1, diverge_at=30),
            fake_run("muonclip", lr=1e-2, tau=30.0, val=(3.0, 2.35)), fake_run("muon", lr=1e-2, val=(3.0, 2.6)),
            fake_run("muonclip", lr=1e-2, tau=100.0, diverge_at=5)]  # fmt: skip
    best = best_runs(runs)
    # in order of appearance, groups whose every run diverged left out
    assert [optimizer_group(r.spec) for r in best] == ["adamw", "muon", "muonclip tau=30"]
    assert [r.spec.lr for r in best] == [1e-2, 1e-3, 1e-2]
    assert best[0] is runs[2] and best[1] is runs[1]
    assert best_runs([]) == []


def test_tokens_to_reach():
    r = fake_run(steps=40, val=(3.0, 2.5, 2.2, 2.0))  # evaluations at tokens 1000, 2000, 3000, 4000
    assert tokens_to_reach(r, 2.5) == 2000.0
    assert tokens_to_reach(r, 2.75) == pytest.approx(1500.0)  # halfway between 3.0 and 2.5
    assert tokens_to_reach(r, 2.1) == pytest.approx(3500.0)
    assert tokens_to_reach(r, 3.5) == 1000.0  # already below at the first evaluation
    assert math.isnan(tokens_to_reach(r, 1.9))  # never
    assert math.isnan(tokens_to_reach(fake_run(steps=40, val=(3.0,), diverge_at=5), 2.0))  # no evaluation


def test_significant():
    assert significant(1234.5) == "1200"
    assert significant(0.012345) == "0.012"
    assert significant(9.96) == "10"  # rounding up a decade
    assert significant(-3.14159, 3) == "-3.14"
    assert significant(0.0) == "0" and significant(float("nan")) == "-" and significant(None) == "-"
    assert significant(5.0) == "5.0" and significant(123456789.0, 3) == "123000000"


def test_format_summary():
    runs = [fake_run("adamw", lr=3e-3, peak=(10, 12.345)), fake_run("muonclip", lr=1e-2, tau=20.0, clips=[12]),
            fake_run("muon", lr=1e-1, diverge_at=25)]  # fmt: skip
    out = format_summary(summarize(runs))
    assert list(out.columns) == ["group", "lr", "peak_max_logit", "final_max_logit", "final_val_loss", "diverged",
                                 "frac_heads_ever_clipped", "last_clip_step"]  # fmt: skip
    assert out["lr"].tolist() == ["0.003", "0.01", "0.1"]
    assert out.loc[0, "peak_max_logit"] == "12" and out.loc[0, "final_val_loss"] == "2.00"
    assert out.loc[2, "final_val_loss"] == "-" and out["diverged"].tolist() == ["False", "False", "True"]
    assert out["frac_heads_ever_clipped"].tolist() == ["-", "0.25", "-"]
    assert out["last_clip_step"].tolist() == ["-", "12", "-"]
    one = format_summary(summarize(runs[:2]), logit_digits=3, loss_decimals=3, columns=["peak_max_logit", "final_val_loss"])
    assert one.to_dict("list") == {"peak_max_logit": ["12.3", "5.00"], "final_val_loss": ["2.000", "2.000"]}


def test_sweep_specs_is_every_optimizer_at_every_lr_plus_k2s_tau_at_the_largest():
    specs = sweep_specs(preset="k2-micro", steps=60, lrs=[1e-2, 3e-2, 1e-1, 3e-1], tau=30.0, tau_k2=100.0,
                        weight_decay=0.1, batch_size=8, seq_len=128, seed=2)
    assert [optimizer_group(s) for s in specs] == ["adamw"] * 4 + ["muon"] * 4 + ["muonclip tau=30"] * 4 + ["muonclip tau=100"] * 3
    assert [s.lr for s in specs[-3:]] == [3e-2, 1e-1, 3e-1]
    assert all(s.seed == s.batch_seed == 2 and s.eval_every == 10 and s.get("warmup_steps") == 6 for s in specs)


def test_long_specs_scale_the_run_and_the_control_differs_only_in_its_schedule():
    spec = RunSpec(optimizer="muonclip", lr=0.1, tau=30.0, steps=150, eval_every=25,
                   train={"schedule": "cosine", "warmup_steps": 15})
    longer, constant = long_specs(spec)
    assert (longer.steps, longer.eval_every, longer.get("warmup_steps"), longer.get("schedule")) == (300, 50, 30, "cosine")
    assert constant.get("schedule") == "constant" and constant.replace(train={"schedule": "cosine"}) == longer


def test_clips_per_part_counts_steps_with_a_clipped_head():
    h = pd.DataFrame({"step": range(12), "qk_clip/heads_clipped": [0, 1, 2, 0, 0, 0, 3, 0, 1, 1, 1, 0]})
    assert clips_per_part(h, 12, parts=3) == [2, 1, 3]
    assert clips_per_part(h, 12, parts=6) == [1, 1, 0, 1, 2, 1]
