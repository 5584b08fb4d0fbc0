"""Notebook 05's claims: each with a negative control (all arms the same E, arms swapped) that makes it
False and a positive control that makes it True. The same-E controls include real runs: the arm
trained again as itself, and the same E from another initialization on the same batches."""

import numpy as np
import pandas as pd
import pytest

from k2mini.data import Corpus, make_dataset
from k2mini.lab.claims.sparsity import gap_narrows_with_training, less_compute_for_the_same_loss, more_experts_ahead
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


def _curves(gap_by_seed, steps=(100, 200, 300), base=2.0, more=64, fewer=8):
    """Hand-made curves: `fewer` falls as 1/sqrt(step); `more` sits `gap_by_seed[s][i]` from it."""
    rows = []
    for s, gaps in gap_by_seed.items():
        for st, g in zip(steps, gaps):
            f = base + 1 / np.sqrt(st) + 0.01 * s
            rows += [{"arm": fewer, "seed": s, "step": st, "val_loss": f}, {"arm": more, "seed": s, "step": st, "val_loss": f + g}]
    return pd.DataFrame(rows)


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


def test_claim_gap_narrows_with_training_fails_on_the_same_e_control(same_e_curves):
    noise = paired_gaps(same_e_curves, "4'", 4)
    assert not gap_narrows_with_training(noise, noise)  # all arms the same E: it cannot beat its own movement


def test_claim_gap_narrows_with_training_holds_on_a_falling_gap_and_fails_reversed():
    curves = _curves({0: [0.05, 0.0, -0.04], 1: [0.06, 0.02, -0.02], 2: [0.03, -0.01, -0.05]})
    control = _curves({0: [0.01, 0.0, 0.012], 1: [-0.01, 0.0, -0.005], 2: [0.0, 0.01, 0.005]})
    gaps, noise = paired_gaps(curves, 64, 8), paired_gaps(control, 64, 8)
    v = gap_narrows_with_training(gaps, noise)
    assert v and v.margin == pytest.approx(0.08 - 0.005)
    reversed_in_time = gaps[gaps.columns[::-1]]
    reversed_in_time.columns = gaps.columns
    assert not gap_narrows_with_training(reversed_in_time, noise)
    assert not gap_narrows_with_training(noise, noise)  # the control in place of the arm


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
