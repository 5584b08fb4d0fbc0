"""Notebook 06's checked claim about dispatch: what balancing does to the slowest rank's wait.

What notebook 06 also checks but does not claim as results: expert-parallel logits equal one
process's (parity), every all-to-all byte equals the formula (exact counts), and the straggler factor's
bounds (1 at one rank, 1 + MaxVio at one expert per rank, never above it, never falling as the degree
doubles): identities of `straggler_factor`, true of any loads, trained or not.
"""

from __future__ import annotations

import math

from . import Verdict, claim

__all__ = ["balancing_cuts_stragglers"]


@claim("06", control="every arm the same router (identical arms: an untrained one in the test), or the labels swapped")
def balancing_cuts_stragglers(table, *, degree: int, methods=("loss_free", "aux_loss"), baseline: str = "none",
                              by: float = 0.25) -> Verdict:
    """At expert-parallel degree `degree`, every balancing method in `methods` leaves the slowest rank waiting
    less than `baseline` (no balancing) does, by more than `by` in straggler factor (the slowest rank's
    expert work over the mean rank's), in every seed of `table` (`expert_parallel.straggler_table`).

    Margin: the smallest gap to the baseline over methods and seeds, minus `by` (straggler-factor units).
    """
    gaps, detail = [], []
    for seed, rows in table.groupby("seed", sort=True):
        f = rows.set_index("balancing")[degree]
        missing = [m for m in (*methods, baseline) if m not in f.index]
        if missing:
            raise ValueError(f"straggler table, seed {seed}: no run for {missing}")
        gaps += [float(f[baseline] - f[m]) for m in methods]
        detail.append(f"seed {seed}: {baseline} {f[baseline]:.3f}, " + ", ".join(f"{m} {f[m]:.3f}" for m in methods))
    margin = min(gaps) - by if gaps else float("nan")
    holds = bool(math.isfinite(margin) and margin > 0)
    return Verdict(f"at EP degree {degree} the slowest rank waits less with {' and with '.join(methods)} than with "
                   f"{baseline}, by more than {by:g} of the mean rank's work, in every seed", holds, margin,
                   "; ".join(detail))
