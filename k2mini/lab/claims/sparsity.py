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

__all__ = ["more_experts_ahead", "lead_grows_with_what_there_is_to_know", "less_compute_for_the_same_loss"]


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


@claim("05", control="the same corpus in both places (as much to know), or the two corpora swapped")
def lead_grows_with_what_there_is_to_know(gaps_much, gaps_little, control_gaps) -> Verdict:
    """More experts' lead over fewer is larger, in every seed, on a corpus with much to know than on one
    with little, by more than the largest gap the same-E control shows: the extra experts pay where
    there is more to store.

    gaps_much, gaps_little: per-seed final gaps (more - fewer, negative = more experts ahead) on the two
    corpora, indexed by seed; control_gaps: the same-E control's per-seed gaps (on the corpus with much to
    know). The margin, in nats, is the smallest growth of the lead over the seeds minus that noise."""
    much, little = pd.Series(gaps_much).dropna(), pd.Series(gaps_little).dropna()
    seeds = much.index.intersection(little.index)
    if len(seeds) < 2:
        raise ValueError(f"lead_grows_with_what_there_is_to_know: need at least 2 seeds run on both corpora, got "
                         f"{list(seeds)}")
    growth = _values(little[seeds] - much[seeds], "gaps")
    noise = float(np.abs(_values(control_gaps, "control_gaps")).max())
    margin = float(growth.min()) - noise
    return Verdict("more experts' lead is larger where there is more to know, in every seed, by more than the "
                   "same-E control's largest gap", margin > 0, margin,
                   f"lead much - lead little per seed {', '.join(f'{g:+.3f}' for g in growth)}; same-E control's "
                   f"largest gap {noise:.3f}")  # fmt: skip


@claim("05", control="all arms the same E (identical curves, or the same-E control as the arm), or the arms swapped")
def less_compute_for_the_same_loss(table: pd.DataFrame, arm, baseline=8, control=None) -> Verdict:
    """`arm` reaches `baseline`'s final validation loss with less compute (K2's sparsity law in form):
    `compute_ratio` > 1 in a `sparsity_study.compute_to_match` table, and above the same-E `control`
    arm's ratio where one was run (another initialization of the baseline can reach its final loss early
    by luck alone). The margin is the ratio minus the larger of 1 and the control's ratio; an arm that
    never reaches the loss fails with margin -1."""
    for a in (arm, baseline) + (() if control is None else (control,)):
        if a not in table.index:
            raise ValueError(f"less_compute_for_the_same_loss: no arm {a!r} in {list(table.index)}")
    ratio = float(table.loc[arm, "compute_ratio"])
    noise = float(table.loc[control, "compute_ratio"]) if control is not None else float("nan")
    bound = max(1.0, noise) if np.isfinite(noise) else 1.0
    margin = ratio - bound if np.isfinite(ratio) else -1.0
    target = table.attrs.get("target", float(table.loc[baseline, "final_val_loss"]))
    said = f" and than the same-E control {control}" if control is not None else ""
    return Verdict(f"E = {arm} reaches E = {baseline}'s final loss with less compute than E = {baseline}{said}", margin > 0,
                   margin, f"target {target:.3f}: steps {table.loc[arm, 'steps_to_target']:.0f} against "
                   f"{table.loc[baseline, 'steps_to_target']:.0f}, ratio {ratio:.2f}x"
                   + ("" if control is None else f"; the control's ratio {noise:.2f}x" if np.isfinite(noise)
                      else "; the control never reaches it"))  # fmt: skip
