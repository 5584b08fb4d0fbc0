"""Notebook 05's claims: each with a negative control (all arms the same E, arms swapped) that makes it
False and a positive control that makes it True. The same-E controls include real runs: the arm
trained again as itself, and the same E from another initialization on the same batches."""

import pandas as pd
import pytest

from k2mini.data import Corpus, make_dataset
from k2mini.lab.claims.sparsity import lead_grows_with_what_there_is_to_know, less_compute_for_the_same_loss, more_experts_ahead
from k2mini.lab.experiments import RunSpec, run_sweep
from k2mini.lab.sparsity_study import compute_to_match, paired_gaps, paired_specs, val_curves

from lab_runs import TEXT


@pytest.fixture(scope="module")
def same_e_curves():
    """Real tiny runs: E = 4 twice per seed (the arm itself, and "4'" from another initialization on the
    same batches), and E = 4 again under the label of the 'more experts' arm: all arms the same E."""
    data = make_dataset(Corpus("text", [TEXT], ["text.txt"]), block_size=512)
    base = RunSpec(steps=6, batch_size=2, seq_len=16, eval_every=3, eval_batches=1,
                   config={"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
                           "num_hidden_layers": 1, "first_k_dense_replace": 0, "n_routed_experts": 4})
    specs = paired_specs(base, [4], seeds=[0, 1, 2], control=4)
    runs = run_sweep(specs, cache=False, data=data, progress=False)
    return val_curves(runs)


def test_claim_more_experts_ahead_fails_when_all_arms_are_the_same_e(same_e_curves):
    final = same_e_curves.step.max()
    noise = paired_gaps(same_e_curves, "4'", 4)[final]
    # the arm trained again as itself: gaps exactly zero
    itself = paired_gaps(pd.concat([same_e_curves, same_e_curves[same_e_curves.arm == 4].assign(arm=64)]), 64, 4)[final]
    assert (itself == 0).all()
    v = more_experts_ahead(itself, noise)
    assert not v and v.margin < 0
    # the same E from another initialization, as the 'more experts' arm, against itself as the control
    assert not more_experts_ahead(noise, noise)


def test_claim_more_experts_ahead_fails_on_swapped_arms_and_holds_on_a_clear_lead():
    control = pd.Series([0.01, -0.012, 0.008, -0.005])
    lead = pd.Series([-0.06, -0.05, -0.07, -0.055])
    v = more_experts_ahead(lead, control)
    assert v and 0 < v.margin < 0.06 and "every seed" in str(v) and str(v).endswith("holds")
    assert not more_experts_ahead(-lead, control)  # swapped arms: fewer experts ahead
    # a lead in the mean that one seed contradicts is not a lead in every seed
    assert not more_experts_ahead(pd.Series([-0.1, -0.09, -0.11, 0.002]), control)
    # a lead smaller than what the same-E control shows is noise
    assert not more_experts_ahead(lead, pd.Series([0.07, -0.01, 0.0, 0.02]))
    with pytest.raises(ValueError, match="2 seeds"):
        more_experts_ahead(pd.Series([-0.1]), control)


def test_claim_lead_grows_with_what_there_is_to_know_fails_on_one_corpus_twice(same_e_curves):
    """The same runs in both places (as much to know): the lead cannot grow, whatever the runs did."""
    final = same_e_curves.step.max()
    noise = paired_gaps(same_e_curves, "4'", 4)[final]
    assert not lead_grows_with_what_there_is_to_know(noise, noise, noise)


def test_claim_lead_grows_with_what_there_is_to_know_holds_and_fails_swapped_or_inside_noise():
    much = pd.Series([-0.08, -0.085, -0.09])
    little = pd.Series([-0.002, 0.0, 0.001])
    control = pd.Series([0.014, 0.039, 0.012])
    v = lead_grows_with_what_there_is_to_know(much, little, control)
    assert v and v.margin == pytest.approx(0.078 - 0.039)
    assert not lead_grows_with_what_there_is_to_know(little, much, control)  # corpora swapped
    assert not lead_grows_with_what_there_is_to_know(much, much, control)  # the same corpus twice
    assert not lead_grows_with_what_there_is_to_know(much, little, pd.Series([0.0, 0.1, 0.0]))  # inside noise
    # one seed whose lead does not grow is not "every seed"
    assert not lead_grows_with_what_there_is_to_know(pd.Series([-0.08, -0.085, 0.0]), little, control)
    with pytest.raises(ValueError, match="2 seeds"):
        lead_grows_with_what_there_is_to_know(much, little.iloc[:1].set_axis([7]), control)


def test_claim_less_compute_for_the_same_loss_holds_ahead_and_fails_identical_or_swapped():
    steps = [100, 200, 400, 800]
    fewer = [2.4, 2.2, 2.05, 1.95]
    more = [2.35, 2.12, 1.97, 1.88]
    rows = [{"arm": a, "seed": 0, "step": s, "val_loss": v} for a, curve in ((8, fewer), (64, more)) for s, v in zip(steps, curve)]
    table = compute_to_match(pd.DataFrame(rows), baseline=8)
    v = less_compute_for_the_same_loss(table, 64)
    assert v and table.loc[8, "compute_ratio"] == 1 and table.loc[64, "compute_ratio"] > 1
    identical = compute_to_match(pd.DataFrame([{**r, "arm": 64} for r in rows if r["arm"] == 8] +
                                              [r for r in rows if r["arm"] == 8]), baseline=8)
    assert not less_compute_for_the_same_loss(identical, 64)
    swapped = compute_to_match(pd.DataFrame([{**r, "arm": {8: 64, 64: 8}[r["arm"]]} for r in rows]), baseline=8)
    v = less_compute_for_the_same_loss(swapped, 64)
    assert not v and v.margin == -1  # never reaches the other's final loss


def test_claim_more_experts_ahead_on_the_committed_record_holds_for_e64_and_fails_swapped_or_identical():
    """The full-scale record (no same-E control there: the paired test's bound alone)."""
    from pathlib import Path

    from k2mini.lab.records import read_record

    _, runs, _ = read_record(Path(__file__).resolve().parents[1] / "data" / "runs" / "05_sparsity_full.json")
    curves = val_curves(runs)
    final = curves.step.max()
    assert more_experts_ahead(paired_gaps(curves, 64, 8)[final])
    assert not more_experts_ahead(paired_gaps(curves, 8, 64)[final])  # arms swapped
    assert not more_experts_ahead(paired_gaps(curves, 8, 8)[final])  # all arms the same E: zero gaps
    law = compute_to_match(curves, baseline=8)
    assert less_compute_for_the_same_loss(law, 64) and not less_compute_for_the_same_loss(law, 8)


def test_claim_less_compute_for_the_same_loss_must_beat_the_same_e_control():
    """Another initialization of the baseline can reach its final loss early by luck: the arm's compute
    ratio must exceed the same-E control's, and the control in the arm's place fails."""
    steps = [100, 200, 300, 400]
    curves = {8: [1.30, 1.15, 1.08, 1.05], 64: [1.25, 1.08, 1.01, 0.97], "8'": [1.28, 1.10, 1.04, 1.02]}
    rows = [{"arm": a, "seed": 0, "step": s, "val_loss": v} for a, c in curves.items() for s, v in zip(steps, c)]
    table = compute_to_match(pd.DataFrame(rows), baseline=8)
    assert table.loc["8'", "compute_ratio"] > 1  # the lucky control reaches E = 8's final loss early
    v = less_compute_for_the_same_loss(table, 64, control="8'")
    assert v and v.margin == pytest.approx(table.loc[64, "compute_ratio"] - table.loc["8'", "compute_ratio"])
    assert not less_compute_for_the_same_loss(table, "8'", control="8'")  # the control as the arm
    slower = {**curves, 64: [1.29, 1.12, 1.06, 1.03]}  # ahead of E = 8, behind the lucky control
    rows = [{"arm": a, "seed": 0, "step": s, "val_loss": v} for a, c in slower.items() for s, v in zip(steps, c)]
    t2 = compute_to_match(pd.DataFrame(rows), baseline=8)
    assert less_compute_for_the_same_loss(t2, 64) and not less_compute_for_the_same_loss(t2, 64, control="8'")
    with pytest.raises(ValueError, match="no arm"):
        less_compute_for_the_same_loss(table, 64, control="16'")
