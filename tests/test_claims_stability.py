"""Notebook 04's claims: each is False on data where the phenomenon is absent, True where it is present.

The negative controls come from real (tiny) runs where cheap: a MuonClip run whose tau sits above every
logit is Muon's run bit for bit, so every claim comparing the clip with Muon must fail on it; a
constant-lr MuonClip run with a low tau keeps clipping to its last step, so it cannot pass for a run
whose clip fades. The positive controls are small hand-made tables with the notebook's shape.
"""

import math

import pandas as pd
import pytest
import torch

from k2mini.lab.claims import stability as c
from k2mini.lab.experiments import RunSpec, run_sweep
from k2mini.lab.stability import clips_per_part, summarize

LR, TAU = 0.1, 30.0


def table(rows):
    """A summary table with the columns the claims read: (group, lr, peak_max_logit, final_val_loss)."""
    return pd.DataFrame([dict(group=g, lr=lr, peak_max_logit=p, final_val_loss=v) for g, lr, p, v in rows])


SWEEP = table([
    ("adamw", 0.01, 47, 2.71), ("adamw", 0.03, 100, 2.70), ("adamw", 0.1, 1600, 3.04),
    ("muon", 0.01, 5.5, 2.39), ("muon", 0.03, 22, 2.31), ("muon", 0.1, 120, 2.41),
    ("muonclip tau=30", 0.01, 5.5, 2.39), ("muonclip tau=30", 0.03, 22, 2.31), ("muonclip tau=30", 0.1, 37, 2.40),
])


@pytest.fixture(scope="module")
def tiny_runs():
    """Real 42-step runs of k2-micro at lr 0.1 (a few seconds): Muon; MuonClip with tau above every logit
    (never fires); MuonClip at a constant lr with a tau low enough to fire on every step."""
    torch.set_num_threads(1)
    base = RunSpec(preset="k2-micro", lr=LR, steps=42, batch_size=2, seq_len=32, eval_every=20, eval_batches=1,
                   train={"schedule": "cosine", "warmup_steps": 4})
    specs = [base.replace(optimizer="muon"), base.replace(optimizer="muonclip", tau=1e6),
             base.replace(optimizer="muonclip", tau=0.5, train={"schedule": "constant"})]
    return run_sweep(specs, cache=False, progress=False)


def test_claim_clip_caps_fresh_logits_holds_where_muon_passes_the_cap_and_the_clip_holds_it():
    v = c.clip_caps_fresh_logits(SWEEP, lr=LR, tau=TAU)
    assert v and v.margin == pytest.approx(1.5 - 37 / 30)


def test_claim_clip_caps_fresh_logits_fails_when_the_clip_never_fires(tiny_runs):
    muon, never, _ = tiny_runs
    assert never.history["train_loss"].equals(muon.history["train_loss"])  # tau above every logit: Muon's run
    t = summarize([muon, never])
    assert not c.clip_caps_fresh_logits(t, lr=LR, tau=1e6)


def test_claim_clip_caps_fresh_logits_fails_on_muons_run_in_the_clip_arm():
    swapped = SWEEP.copy()
    swapped.loc[(swapped.group == "muonclip tau=30") & (swapped.lr == LR), "peak_max_logit"] = 120
    assert not c.clip_caps_fresh_logits(swapped, lr=LR, tau=TAU)


def test_claim_clip_cuts_peak_cheaply_holds_and_fails_on_identical_or_swapped_arms(tiny_runs):
    assert c.clip_cuts_peak_cheaply(SWEEP, lr=LR, tau=TAU)
    muon, never, _ = tiny_runs
    identical = c.clip_cuts_peak_cheaply(summarize([muon, never]), lr=LR, tau=1e6)
    assert not identical and identical.margin == pytest.approx(-0.5)  # ratio exactly 1
    swapped = SWEEP.copy()
    clip, mu = (swapped.group == "muonclip tau=30"), (swapped.group == "muon")
    swapped.loc[clip, "group"], swapped.loc[mu, "group"] = "muon", "muonclip tau=30"
    assert not c.clip_cuts_peak_cheaply(swapped, lr=LR, tau=TAU)


def test_claim_clip_cuts_peak_cheaply_fails_when_the_clip_costs_loss():
    costly = SWEEP.copy()
    costly.loc[(costly.group == "muonclip tau=30") & (costly.lr == 0.03), "final_val_loss"] = 2.40
    assert not c.clip_cuts_peak_cheaply(costly, lr=LR, tau=TAU)


def test_claim_clip_fades_as_lr_decays_holds_when_only_the_decayed_run_fades():
    assert c.clip_fades_as_lr_decays([0, 28, 42, 33, 10, 5], [0, 30, 40, 38, 35, 37])
    assert c.clip_fades_as_lr_decays([0, 42, 50, 43, 34, 18], [0, 42, 49, 48, 49, 46])  # seed 1: fades less, still half


def test_claim_clip_fades_as_lr_decays_fails_on_a_run_that_keeps_clipping_or_never_clips(tiny_runs):
    muon, never, constant = tiny_runs
    keeps = clips_per_part(constant.history, constant.spec.steps)
    assert keeps[-1] == max(keeps) > 0  # tau 0.5 at a constant lr: a clip on every step
    assert not c.clip_fades_as_lr_decays(keeps, keeps)
    assert not c.clip_fades_as_lr_decays([0, 28, 42, 33, 10, 5], [0, 28, 42, 33, 10, 5])  # constant lr fading too
    silent = clips_per_part(never.history, never.spec.steps)
    assert sum(silent) == 0 and not c.clip_fades_as_lr_decays(silent, keeps)


def test_claim_adamw_logits_exceed_muon_holds_and_fails_on_swapped_or_identical_arms():
    assert c.adamw_logits_exceed_muon(SWEEP)
    swapped = SWEEP.replace({"group": {"adamw": "muon", "muon": "adamw"}})
    assert not c.adamw_logits_exceed_muon(swapped)
    same = SWEEP.copy()
    same.loc[same.group == "adamw", "peak_max_logit"] = same.loc[same.group == "muon", "peak_max_logit"].to_numpy()
    v = c.adamw_logits_exceed_muon(same)
    assert not v and v.margin == pytest.approx(-0.5)


class Curve:
    """A run as the claim reads it: validation loss against tokens."""

    def __init__(self, losses, tokens_per_eval=1000):
        self.history = pd.DataFrame({"tokens": [tokens_per_eval * (i + 1) for i in range(len(losses))],
                                     "val_loss": losses})

    def final_val_loss(self):
        return float(self.history["val_loss"].iloc[-1])


def test_claim_muon_beats_adamw_holds_and_fails_on_swapped_or_identical_arms():
    muon, adamw = Curve([3.0, 2.6, 2.4, 2.3]), Curve([3.1, 2.9, 2.8, 2.7])
    assert c.muon_beats_adamw(muon, adamw)
    assert not c.muon_beats_adamw(adamw, muon)
    same = c.muon_beats_adamw(muon, muon)
    assert not same and math.isfinite(same.margin)
    late = Curve([3.1, 2.95, 2.85, 2.6])  # ends lower, but reaches AdamW's final loss only in the last quarter
    assert not c.muon_beats_adamw(late, adamw)
