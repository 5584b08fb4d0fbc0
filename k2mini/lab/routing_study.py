"""Small studies of routing (notebooks 02 and 05): one router's decision laid out step by step, the
routing summaries of finished runs (MaxVio, dead experts), seed-paired comparisons, and the
configurations of a sparsity sweep. Runs come from `k2mini.lab.experiments.run_sweep`.

    base = RunSpec(preset="k2-micro", lr=3e-3, steps=300, batch_size=16, seq_len=64)
    runs = run_sweep([base.replace(seed=s, train={"balancing": m}) for m in METHODS for s in (0, 1)])
    table = summarize_runs(runs, last=100)       # one row per run: final val loss, MaxVio, dead experts
    compare(table, "balancing", "val_loss")      # mean, seed spread, and which gaps clear the noise

Every run's weights come from its `seed` and its batches from the same seed, so two runs with the same
seed see the same tokens in the same order whatever else differs: seeds pair runs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..config import K2Config
from ..moe import choose_experts, mixing_weights
from .experiments import RunResult, RunSpec

__all__ = [
    "routing_walkthrough",
    "summarize_runs",
    "dead_expert_fraction",
    "window_load",
    "compare",
    "sparsity_configs",
    "sparsity_specs",
    "param_table",
]


def routing_walkthrough(scores: torch.Tensor, gate, tokens: Sequence[str] | None = None, *,
                        expected: tuple[torch.Tensor, torch.Tensor] | None = None, decimals: int = 3) -> pd.DataFrame:  # fmt: skip
    """K2's routing (docs/K2_FACTS.md section 4) stage by stage from the sigmoid scores, one row per token, computed
    by the steps `route()` is made of (`choose_experts`, `mixing_weights`).

    scores: (N, E) sigmoid scores (e.g. a RouterRecord's `scores[b, :N]`); gate: the layer's `Router`
    (its correction bias, top_k, normalization and scaling factor; n_group must be 1). Columns: the
    top-k by raw score, the top-k of score + bias (the experts chosen), whether the bias changed the
    choice, the chosen experts' raw scores, the weights after normalization and after the scaling
    factor. expected: the (indices (N, k), weights (N, k)) the model produced; the rebuilt choice and
    weights must match them (as sets of (expert, weight) pairs), else AssertionError.
    """
    if gate.n_group != 1:
        raise ValueError("routing_walkthrough covers n_group = 1 (K2); grouped routing restricts the top-k")
    with torch.no_grad():
        s = scores.detach().to(torch.float32)  # (N, E), unbiased
        k, bias = gate.top_k, gate.e_score_correction_bias
        raw_top = choose_experts(s, torch.zeros_like(bias), k)  # what the router would pick without the bias
        chosen = choose_experts(s, bias, k)  # the bias picks experts...
        w = s.gather(1, chosen)  # ...but the weights come from the unbiased scores
        w_norm = mixing_weights(s, chosen, gate.norm_topk_prob)  # route()'s steps, scaling factor 1
        w_final = mixing_weights(s, chosen, gate.norm_topk_prob, gate.routed_scaling_factor)
        if expected is not None:
            idx, wt = (t.reshape(len(s), k) for t in expected)
            mine, theirs = chosen.sort(-1), idx.sort(-1)
            if not torch.equal(mine.values, theirs.values) or not torch.allclose(
                w_final.gather(1, mine.indices), wt.to(torch.float32).gather(1, theirs.indices), atol=1e-5
            ):
                raise AssertionError("routing_walkthrough: rebuilt routing differs from the model's")
    changed = [set(a) != set(b) for a, b in zip(raw_top.tolist(), chosen.tolist())]
    fmt = lambda row: " ".join(f"{v:.{decimals}f}" for v in row)  # noqa: E731
    return pd.DataFrame({
        "token": list(tokens) if tokens is not None else list(range(len(s))),
        "top-k of s": [list(map(int, row)) for row in raw_top],
        "top-k of s + b (chosen)": [list(map(int, row)) for row in chosen],
        "bias changed it": changed,
        "s of chosen": [fmt(row) for row in w.tolist()],
        "normalized": [fmt(row) for row in w_norm.tolist()],
        f"x {gate.routed_scaling_factor:g} (weights)": [fmt(row) for row in w_final.tolist()],
    })  # fmt: skip


def window_load(result: RunResult, last: int) -> np.ndarray:
    """Token-slots per (MoE layer, expert) summed over the run's last `last` logged steps: (n_layers, E)."""
    if result.loads is None:
        raise ValueError(f"{result.name}: the run has no per-step expert loads (a model without MoE layers?)")
    return result.loads[-last:].sum(0)


def dead_expert_fraction(load: np.ndarray, threshold: float = 0.0) -> float:
    """Share of (layer, expert) pairs with no token (threshold 0) or, with a threshold, under
    `threshold` x the layer's mean load. load: (n_layers, E) token-slot counts, e.g. from window_load."""
    load = np.asarray(load, dtype=float)
    if threshold == 0:
        return float((load == 0).mean())
    return float((load < threshold * load.mean(-1, keepdims=True)).mean())


def summarize_runs(results: Sequence[RunResult], last: int = 50, starved_below: float = 0.1) -> pd.DataFrame:
    """One row per run: its name, seed, train() settings (balancing, bias_update_speed, ...), config
    overrides, n_experts and sparsity, then
    val_loss (final evaluation), train_loss (mean of the last `last` steps), maxvio (mean MaxVio over
    the last `last` steps, layers averaged), maxvio_all (the same over the whole run),
    maxvio_max_layer (the worst layer's over the last steps), dead (share of (layer, expert) pairs
    that received no token in those steps), starved (share under `starved_below` x the uniform load),
    aux_loss (mean, last steps), cpu_s, and total/active parameters."""
    from .. import TrainConfig

    rows = []
    for r in results:
        h, spec, config = r.history, r.spec, r.spec.model_config()
        tail = h.iloc[-last:]
        vio_cols = [c for c in h.columns if c.startswith("maxvio_l")]
        counts = config.param_counts()
        load = window_load(r, last)
        rows.append({
            "run": r.name,
            "seed": spec.seed,
            "balancing": spec.get("balancing", TrainConfig.balancing),
            **spec.train_settings,
            **spec.config_overrides,
            "n_experts": config.n_routed_experts,
            "sparsity": config.sparsity,
            "val_loss": r.final_val_loss(),
            "train_loss": float(tail["train_loss"].mean()),
            "maxvio": float(tail["maxvio"].mean()),
            "maxvio_all": float(h["maxvio"].mean()),
            "maxvio_max_layer": float(tail[vio_cols].mean().max()) if vio_cols else float("nan"),
            "dead": dead_expert_fraction(load),
            "starved": dead_expert_fraction(load, starved_below),
            "aux_loss": float(tail["aux_loss"].mean()),
            "cpu_s": r.cpu_s,
            "total_params": counts["total"],
            "active_params": counts["active"],
        })  # fmt: skip
    return pd.DataFrame(rows)


def compare(table: pd.DataFrame, by: str, metric: str, *, baseline=None, seed: str = "seed") -> pd.DataFrame:
    """Per value of `by`: mean, min and max of `metric` over seeds, the gap to `baseline` (default: the
    first value) and two tests of whether that gap is more than run-to-run noise.

    separated (paired t-test, `scipy.stats.ttest_rel`, two-sided 5%): seeds are paired (same seed =
        same batches and, for equal shapes, the same initialization), so the test is on the per-seed
        gaps d_s = metric(value, s) - metric(baseline, s). Needs 2 seeds.
    apart (unpaired): the ranges over seeds do not overlap, every run of one is below every run of the
        other. With 3 seeds against 3 that happens by chance 1 time in 10, with 5 against 5, 1 in 126.
    `t` is the paired test's statistic |mean d| / (std(d) / sqrt(n)), `p` its p-value.
    """
    from scipy import stats

    values = list(dict.fromkeys(table[by]))
    baseline = values[0] if baseline is None else baseline
    wide = table.pivot_table(index=seed, columns=by, values=metric, aggfunc="mean")[values]
    base = wide[baseline].dropna()
    rows = []
    for v in values:
        pair = wide[[v, baseline]].dropna()
        d = (pair[v] - pair[baseline]).to_numpy()
        n = len(d)
        t, p = float("nan"), float("nan")
        if v != baseline and n > 1:
            if np.all(d == d[0]):  # no spread: the t statistic is infinite (or undefined at 0)
                t, p = (float("inf"), 0.0) if d[0] else (float("nan"), 1.0)
            else:
                res = stats.ttest_rel(pair[v], pair[baseline])
                t, p = abs(float(res.statistic)), float(res.pvalue)
        runs = wide[v].dropna()
        apart = v != baseline and len(runs) > 1 and (runs.max() < base.min() or runs.min() > base.max())
        rows.append({
            by: v,
            "mean": float(wide[v].mean()),
            "min": float(wide[v].min()),
            "max": float(wide[v].max()),
            f"gap to {baseline}": float(d.mean()) if n else float("nan"),
            "t": t,
            "p": p,
            "separated": bool(p < 0.05),
            "apart": bool(apart),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index(by)


def sparsity_configs(base: K2Config, n_experts: Sequence[int], top_k: int | None = None) -> dict[int, K2Config]:
    """{E: config} with E routed experts and everything else of `base` (top-k, expert width, shared
    experts, attention) unchanged, so the active parameters stay fixed while the total grows."""
    top_k = base.num_experts_per_tok if top_k is None else top_k
    return {E: base.replace(n_routed_experts=E, num_experts_per_tok=top_k) for E in n_experts}


def sparsity_specs(base: RunSpec, n_experts: Sequence[int], seeds: Sequence[int]) -> list[RunSpec]:
    """One RunSpec per (seed, E): `base` with E routed experts, everything else unchanged (see
    `sparsity_configs`), labelled "E=<E>"."""
    return [base.replace(config={"n_routed_experts": E}, seed=s, label=f"E={E}") for s in seeds for E in n_experts]


def param_table(configs: dict[int, K2Config]) -> pd.DataFrame:
    """Total and active parameters per configuration, with the active ones split into routed experts,
    router (grows with E: one row of the gate per expert) and the rest."""
    rows = []
    for E, c in configs.items():
        b = c.param_breakdown()
        total, active = sum(b["total"].values()), sum(b["active"].values())
        rows.append({
            "n_experts": E,
            "top_k": c.num_experts_per_tok,
            "sparsity": c.sparsity,
            "total": total,
            "active": active,
            "active routed experts": b["active"]["routed_experts"],
            "router": b["active"]["router"],
            "active without router": active - b["active"]["router"],
        })  # fmt: skip
    return pd.DataFrame(rows)
