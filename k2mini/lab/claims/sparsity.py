"""The claims of notebook 05 (sparsity at fixed active parameters), each with the control that makes it False.

They take what `k2mini.lab.sparsity_study` produced from finished runs (per-seed paired gaps, the
same-E control's gaps, compute-to-match tables) and do no training. A *gap* is the validation loss of
the arm with more experts minus that of the arm with fewer, for one seed (same batches, same order):
negative when more experts are ahead. The *same-E control* is the fewer-experts arm again from another
initialization on the same batches: its gap to the original is what seed noise alone gives a pair.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from . import Verdict, claim

__all__ = ["more_experts_ahead", "gap_narrows_with_training", "less_compute_for_the_same_loss"]


def _values(x, name: str) -> np.ndarray:
    v = np.asarray(pd.Series(x).dropna(), dtype=float) if not isinstance(x, np.ndarray) else x[np.isfinite(x)]
    if len(v) < 2:
        raise ValueError(f"{name}: need at least 2 seeds, got {len(v)}")
    return v


def _t_bound(d: np.ndarray, alpha: float) -> float:
    """Half-width of the one-sided (1 - alpha) confidence bound of the mean of `d`: t * sd / sqrt(n)."""
    from scipy import stats

    return float(stats.t.ppf(1 - alpha, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


@claim("05", control="all arms the same E: the fewer-experts model again from another initialization, "
                     "or the arms swapped")
def more_experts_ahead(gaps, control_gaps=None, *, alpha: float = 0.05) -> Verdict:
    """More experts end ahead of fewer in every seed, and their mean lead exceeds both the paired test's
    bound (one-sided t at `alpha`) and the largest gap the same-E control shows in any seed.

    gaps: per-seed final gaps (more - fewer, negative = more experts ahead); control_gaps: the same for
    the same-E control (fewer again, another initialization, minus fewer), or None where no control was
    run (the paired test alone). The margin, in nats, is the mean lead minus the larger noise bound."""
    d = _values(gaps, "gaps")
    c = np.zeros(0) if control_gaps is None else _values(control_gaps, "control_gaps")
    lead = -float(d.mean())
    bound = max([_t_bound(d, alpha)] + ([float(np.abs(c).max())] if len(c) else []))
    margin = lead - bound
    every = bool((d < 0).all())
    said = "the paired test's bound and the same-E control's largest gap" if len(c) else "the paired test's bound"
    return Verdict(f"more experts end below fewer in every seed, by more than {said}", every and margin > 0, margin,
                   f"per-seed gaps {', '.join(f'{g:+.3f}' for g in d)} (mean {-lead:+.3f}); t bound {_t_bound(d, alpha):.3f}; "
                   + (f"same-E control gaps {', '.join(f'{g:+.3f}' for g in c)}" if len(c) else "no same-E control"))  # fmt: skip


@claim("05", control="all arms the same E (the same-E control's gap curves in place of the arm's), or the "
                     "evaluations reversed in time")
def gap_narrows_with_training(gaps: pd.DataFrame, control_gaps: pd.DataFrame, *, start: int | None = None) -> Verdict:
    """The gap of more to fewer experts falls as training goes on, in every seed, by more than any
    seed's same-E control gap moves over the same steps.

    gaps, control_gaps: (seed x step) frames of paired gaps (`sparsity_study.paired_gaps`); the change is
    from evaluation `start` (default: the first) to the last. The margin, in nats, is the smallest fall
    over the seeds minus the largest movement of the control (either direction)."""
    if gaps.shape[1] < 2:
        raise ValueError("gap_narrows_with_training needs at least 2 evaluations")
    first = gaps.columns[0] if start is None else start
    last = gaps.columns[-1]
    if first not in gaps.columns or first not in control_gaps.columns or last not in control_gaps.columns:
        raise ValueError(f"evaluations {first} and {last} must be in both frames: {list(gaps.columns)}, "
                         f"{list(control_gaps.columns)}")
    fall = _values(gaps[first] - gaps[last], "gaps")
    moved = _values(control_gaps[first] - control_gaps[last], "control_gaps")
    margin = float(fall.min()) - float(np.abs(moved).max())
    return Verdict(f"the gap of more to fewer experts falls from step {first} to {last} in every seed, by more than "
                   f"the same-E control moves", margin > 0, margin,
                   f"fall per seed {', '.join(f'{x:+.3f}' for x in fall)}; same-E control moved "
                   f"{', '.join(f'{x:+.3f}' for x in moved)}")  # fmt: skip


@claim("05", control="all arms the same E (identical curves), or the arms swapped")
def less_compute_for_the_same_loss(table: pd.DataFrame, arm, baseline=8) -> Verdict:
    """`arm` reaches `baseline`'s final validation loss with less compute (K2's sparsity law in form):
    `compute_ratio` > 1 in a `sparsity_study.compute_to_match` table. The margin is the ratio minus 1; an
    arm that never reaches the loss fails with margin -1."""
    if arm not in table.index or baseline not in table.index:
        raise ValueError(f"less_compute_for_the_same_loss: arms {arm!r} and {baseline!r} must be in {list(table.index)}")
    ratio = float(table.loc[arm, "compute_ratio"])
    margin = ratio - 1 if np.isfinite(ratio) else -1.0
    target = table.attrs.get("target", float(table.loc[baseline, "final_val_loss"]))
    return Verdict(f"E = {arm} reaches E = {baseline}'s final loss with less compute than E = {baseline}", margin > 0,
                   margin, f"target {target:.3f}: steps {table.loc[arm, 'steps_to_target']:.0f} against "
                   f"{table.loc[baseline, 'steps_to_target']:.0f}, ratio {ratio:.2f}x")  # fmt: skip
