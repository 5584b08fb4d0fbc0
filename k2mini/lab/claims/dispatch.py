"""Notebook 06's checked claim about dispatch: how the balancing methods rank by straggler time.

What notebook 06 also checks but does not claim as results: expert-parallel logits equal one
process's (parity), every all-to-all byte equals the formula (exact counts), and the straggler factor's
bounds (1 at one rank, 1 + MaxVio at one expert per rank, never above it, never falling as the degree
doubles): identities of `straggler_factor`, true of any loads, trained or not.
"""

from __future__ import annotations

import math

from . import Verdict, claim

__all__ = ["balancing_ranks_stragglers"]

ORDER = ("loss_free", "aux_loss", "none")


@claim("06", control="every arm the same balancing (identical arms), or the methods' labels swapped")
def balancing_ranks_stragglers(table, *, degree: int, order=ORDER) -> Verdict:
    """At expert-parallel degree `degree`, trained routers rank by straggler factor (slowest rank's expert
    work over the mean rank's) as `order` says, from least to most waiting (loss-free bias < aux
    loss < no balancing), in every seed of `table` (`expert_parallel.straggler_table`).

    Margin: the smallest gap between neighbours in the order over all seeds (straggler-factor units).
    """
    gaps, detail = [], []
    for seed, rows in table.groupby("seed", sort=True):
        by = rows.set_index("balancing")[degree]
        missing = [m for m in order if m not in by.index]
        if missing:
            raise ValueError(f"straggler table, seed {seed}: no run for {missing}")
        vals = [float(by[m]) for m in order]
        gaps += [b - a for a, b in zip(vals, vals[1:])]
        detail.append(f"seed {seed}: " + " < ".join(f"{m} {v:.3f}" for m, v in zip(order, vals)))
    margin = min(gaps) if gaps else float("nan")
    holds = bool(math.isfinite(margin) and margin > 0)
    return Verdict(f"at EP degree {degree} the slowest rank waits least with {order[0]}, then "
                   + ", then ".join(order[1:]) + ", in every seed", holds, margin, "; ".join(detail))
