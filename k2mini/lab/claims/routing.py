"""The claims of notebook 02 (routing and load balancing), each with the control that makes it False.

They take what the notebook's study produced (`routing_study.summarize_runs` tables, the bias-effect
table, rebuilt and recorded expert choices) and do no training. Seeds pair runs: with the same seed
every method starts from the same weights and sees the same batches, so the per-seed gap is the
comparison; the *seed noise* a gap must clear is how far the baseline's own figure moves from one seed
to the next (its standard deviation over the seeds).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from . import Verdict, claim

__all__ = [
    "more_balanced_every_seed",
    "speed_sweep_optimum",
    "slow_bias_like_no_balancing",
    "collapse_beyond_untrained",
    "no_loss_penalty_visible",
    "bias_does_the_balancing",
    "routing_rebuilt_from_hidden_states",
    "balancing_verdicts",
]


def _per_seed(table: pd.DataFrame, by: str, metric: str, seed: str) -> pd.DataFrame:
    if metric not in table or by not in table or seed not in table:
        raise ValueError(f"the table needs columns {by!r}, {metric!r} and {seed!r}; it has {list(table.columns)}")
    return table.pivot_table(index=seed, columns=by, values=metric, aggfunc="mean")


@claim("02", control="the two arms swapped or made identical; no balancing in place of the arm")
def more_balanced_every_seed(table: pd.DataFrame, arm: str | Sequence[str], baseline: str, metric: str = "maxvio_all",
                             *, by: str = "balancing", seed: str = "seed") -> Verdict:  # fmt: skip
    """`arm` has a lower MaxVio than `baseline` in every seed, by more than the baseline's seed noise.

    `arm` may be several arms (each must hold). The seed noise is the standard deviation of the
    baseline's figure over the seeds. table: one row per run with columns `by`, `seed` and `metric` (e.g. `summarize_runs`). The margin is
    the smallest per-seed gap minus that noise, in MaxVio units."""
    arms = [arm] if isinstance(arm, str) else list(arm)
    wide = _per_seed(table, by, metric, seed)
    missing = [a for a in [*arms, baseline] if a not in wide]
    if missing:
        raise ValueError(f"no runs of {missing} in the table's {by!r} column")
    if wide[baseline].notna().sum() < 2:
        raise ValueError("more_balanced_every_seed needs at least 2 seeds (the noise is their spread)")
    noise = float(wide[baseline].std(ddof=1))
    gaps = {a: (wide[baseline] - wide[a]).dropna() for a in arms}  # positive: the arm is lower
    worst = min(gaps, key=lambda a: gaps[a].min())
    margin = float(gaps[worst].min()) - noise
    names = " and ".join(arms)
    detail = "; ".join(f"{a}: per-seed gaps {', '.join(f'{g:+.2f}' for g in gaps[a])}" for a in arms)
    return Verdict(f"{names} below {baseline} in {metric} in every seed, by more than the seed noise",
                   margin > 0, margin, f"{detail}; seed noise (sd of {baseline} over {len(wide)} seeds) {noise:.2f}")


@claim("02", control="the speeds made identical (a flat sweep), or no balancing at every speed")
def speed_sweep_optimum(maxvio_by_speed: Mapping[float, float], best: float, *, factor: float = 2.0) -> Verdict:
    """`best` has the lowest whole-run MaxVio of the bias speeds; the slowest and fastest are >= `factor` x it.

    The margin is the smaller of the two ratios minus
    `factor`."""
    speeds = sorted(maxvio_by_speed)
    if best not in maxvio_by_speed or len(speeds) < 3:
        raise ValueError(f"need >= 3 speeds including best={best}, got {speeds}")
    v = {u: float(maxvio_by_speed[u]) for u in speeds}
    lowest = all(v[best] < v[u] for u in speeds if u != best)
    slow, fast = v[speeds[0]] / v[best], v[speeds[-1]] / v[best]
    margin = min(slow, fast) - factor
    return Verdict(f"u = {best:g} lowest over the run; u = {speeds[0]:g} and u = {speeds[-1]:g} both >= {factor:g}x as "
                   f"imbalanced", lowest and margin >= 0, margin,
                   f"MaxVio over the run {', '.join(f'{u:g}: {x:.2f}' for u, x in v.items())}; ratios {slow:.2f}x, "
                   f"{fast:.2f}x")  # fmt: skip


@claim("02", control="the arms swapped: u = 1e-2's figure in place of the slow speed's")
def slow_bias_like_no_balancing(slow: float, none: float, best: float) -> Verdict:
    """A too-slow bias ends with its worse MoE layer closer to no balancing than to the best speed.

    Arguments: the worse layer's MaxVio over the last steps, for the slow speed, no balancing and the
    best speed. The margin is |slow - best| - |slow - none|."""
    margin = abs(slow - best) - abs(slow - none)
    return Verdict("the slow bias ends closer to no balancing than to the best speed", margin > 0, margin,
                   f"worse layer at the end: slow {slow:.2f}, none {none:.2f}, best {best:.2f}")


@claim("02", control="the untrained router (each run's initialization) in place of the trained one, or a balanced run")
def collapse_beyond_untrained(trained: pd.DataFrame, untrained: pd.DataFrame) -> Verdict:
    """Without balancing, training concentrates routing beyond the untrained router's on the same tokens.

    In every seed the trained router's MaxVio is higher by more than the seed noise (the untrained
    router's standard deviation over seeds, at least 0.1), and it leaves more experts without a token.
    trained, untrained: one row per seed (index) with columns `maxvio` and `dead` (share of
    (layer, expert) pairs with no token), measured on the same batches. Margin in MaxVio units."""
    for name, t in (("trained", trained), ("untrained", untrained)):
        if not {"maxvio", "dead"} <= set(t.columns):
            raise ValueError(f"{name} needs columns 'maxvio' and 'dead', has {list(t.columns)}")
    seeds = trained.index.intersection(untrained.index)
    if len(seeds) < 2:
        raise ValueError("collapse_beyond_untrained needs at least 2 seeds present in both tables")
    tr, un = trained.loc[seeds], untrained.loc[seeds]
    noise = max(float(un["maxvio"].std(ddof=1)), 0.1)
    gap = tr["maxvio"] - un["maxvio"]
    more_dead = bool((tr["dead"] > un["dead"]).all())
    margin = float(gap.min()) - noise
    return Verdict("without balancing, training concentrates routing beyond the untrained router's on the same tokens",
                   margin > 0 and more_dead, margin,
                   f"MaxVio trained {', '.join(f'{x:.2f}' for x in tr['maxvio'])} vs untrained "
                   f"{', '.join(f'{x:.2f}' for x in un['maxvio'])} (noise {noise:.2f}); dead experts trained "
                   f"{', '.join(f'{x:.0%}' for x in tr['dead'])} vs untrained {', '.join(f'{x:.0%}' for x in un['dead'])}")  # fmt: skip


@claim("02", control="a method whose validation loss is worse by the baseline's own seed spread")
def no_loss_penalty_visible(table: pd.DataFrame, baseline: str = "aux_loss", metric: str = "val_loss", *,
                            by: str = "balancing", seed: str = "seed") -> Verdict:  # fmt: skip
    """Seed by seed, every method's validation loss is closer to the baseline's than its seeds are to each other.

    That is, any loss difference between the methods is below the seed noise (the baseline's max - min
    over seeds). The margin is that spread minus the largest per-seed gap, in nats."""
    wide = _per_seed(table, by, metric, seed)
    if baseline not in wide or wide[baseline].notna().sum() < 2:
        raise ValueError(f"need >= 2 seeds of {baseline!r}")
    spread = float(wide[baseline].max() - wide[baseline].min())
    gaps = wide.drop(columns=baseline).sub(wide[baseline], axis=0).abs()
    largest = float(gaps.max().max())
    margin = spread - largest
    return Verdict(f"every method within the seed spread of {baseline} in {metric}", margin > 0, margin,
                   f"largest per-seed gap {largest:.3f} ({gaps.max().idxmax()}), {baseline}'s seed spread {spread:.3f}")


@claim("02", control="an untrained model (bias zero: no token redirected, raw routing = routed), or a run without the bias")
def bias_does_the_balancing(effect: pd.DataFrame, *, min_share: float = 0.5, min_ratio: float = 1.5) -> Verdict:
    """The bias redirects most tokens, and routing by raw scores alone would be far more imbalanced.

    In every loss-free model and MoE layer the bias changes the experts of more than `min_share` of the
    tokens, and routing by the raw scores alone would be at least `min_ratio` x as imbalanced (MaxVio)
    as the routing the bias produces. effect: one row per (model, layer) with columns `changed` (share of tokens), `maxvio_raw` and
    `maxvio_routed`. The margin is the smaller of (share - min_share) and (ratio / min_ratio - 1)."""
    need = {"changed", "maxvio_raw", "maxvio_routed"}
    if not need <= set(effect.columns) or effect.empty:
        raise ValueError(f"effect needs rows with columns {sorted(need)}, has {list(effect.columns)}")
    ratio = effect["maxvio_raw"] / effect["maxvio_routed"].clip(lower=1e-9)
    margin = float(min(effect["changed"].min() - min_share, ratio.min() / min_ratio - 1))
    return Verdict(f"the bias redirects > {min_share:.0%} of tokens and routed MaxVio is >= {min_ratio:g}x lower than by "
                   f"raw scores", margin > 0, margin,
                   f"tokens redirected {effect['changed'].min():.0%} to {effect['changed'].max():.0%}; raw / routed "
                   f"MaxVio {ratio.min():.2f}x to {ratio.max():.2f}x")  # fmt: skip


@claim("02", control="the same rebuild on hidden states permuted across tokens")
def routing_rebuilt_from_hidden_states(rebuilt: torch.Tensor, recorded: torch.Tensor, *, min_agreement: float = 0.99
                                       ) -> Verdict:  # fmt: skip
    """The experts rebuilt from each token's hidden state and the router's weights are the model's choice.

    For at least `min_agreement` of the tokens (a near-tie may flip under other float kernels). rebuilt, recorded: (N, k) expert indices. The margin is the agreeing share minus
    `min_agreement`."""
    if rebuilt.shape != recorded.shape or rebuilt.dim() != 2:
        raise ValueError(f"rebuilt {tuple(rebuilt.shape)} and recorded {tuple(recorded.shape)} must both be (N, k)")
    same = (rebuilt.sort(-1).values == recorded.sort(-1).values).all(-1)
    share = float(same.float().mean())
    margin = share - min_agreement
    return Verdict(f"the routing rebuilt from the hidden states picks the model's experts for >= {min_agreement:.0%} of "
                   f"tokens", margin >= 0, margin, f"{int(same.sum())} of {len(same)} tokens agree ({share:.1%})")


def balancing_verdicts(sweep: pd.DataFrame, table: pd.DataFrame, untrained: pd.DataFrame, effect: pd.DataFrame,
                       u: float) -> dict[str, Verdict]:  # fmt: skip
    """Every claim of notebook 02 on one set of results (the notebook's own runs, or a record of the same
    runs under other float kernels). sweep, table: `summarize_runs` of the speed sweep and of the
    methods; untrained: per seed (index) the untrained router's `maxvio` and `dead` on the batches of the
    runs' last steps; effect: per loss-free model and layer `changed`, `maxvio_raw`, `maxvio_routed`."""
    lf = sweep[sweep["balancing"] == "loss_free"].set_index("bias_update_speed")
    none_worst = float(sweep.loc[sweep["balancing"] == "none", "maxvio_max_layer"].iloc[0])
    slowest = min(lf.index)
    balanced = [m for m in dict.fromkeys(table["balancing"]) if m != "none"]
    none_runs = table[table["balancing"] == "none"].set_index("seed")[["maxvio", "dead"]]
    return {
        "speed": speed_sweep_optimum(lf["maxvio_all"].to_dict(), u),
        "slow": slow_bias_like_no_balancing(float(lf.loc[slowest, "maxvio_max_layer"]), none_worst,
                                            float(lf.loc[u, "maxvio_max_layer"])),
        "loss_free": more_balanced_every_seed(table, "loss_free", "aux_loss", "maxvio_all"),
        "loss_free+seq_aux": more_balanced_every_seed(table, "loss_free+seq_aux", "aux_loss", "maxvio_all"),
        "none": more_balanced_every_seed(table, balanced, "none", "maxvio"),
        "collapse": collapse_beyond_untrained(none_runs, untrained),
        "val_loss": no_loss_penalty_visible(table),
        "bias": bias_does_the_balancing(effect),
    }
