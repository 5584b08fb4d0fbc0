"""Controls for notebook 03's routing statistics: what the same statistic gives where the phenomenon is absent.

    telemetry_result(model, ids, labels)     the in-memory model's routing as a StreamResult (an untrained
                                             model on the same tokens, without writing a checkpoint)
    split_halves(labels, seed)               each class's rows split at random in two ("prose/A", "prose/B")
    merge_halves(counts_by_label)            the classes again ("prose" = "prose/A" + "prose/B")
    domain_divergences(counts_by_label)      JS divergence per layer: between the classes, and within each
                                             class (half against half), at the same sample size
    independent_routing(counts, n_tokens, k) a routing with the same loads whose tokens choose independently
    coactivation_figures(coactivation, n)    per layer: the share of pairs that never meet, the largest lift

A statistic measured on a trained model says something about training only beside its control: the
untrained model on the same tokens (what token identity alone gives), a within-class split (what
sampling alone gives), routing reshuffled across tokens (what the loads alone give).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..analysis import routing_stats as stats
from ..analysis.result import StreamResult

__all__ = ["telemetry_result", "split_halves", "merge_halves", "domain_divergences", "independent_routing",
           "coactivation_figures"]


@torch.no_grad()
def telemetry_result(model, token_ids: torch.Tensor, labels=None) -> StreamResult:
    """The routing of `model` on token_ids (B, T), from its telemetry, as the streaming pass reports it."""
    from einops import rearrange

    out = model(token_ids, telemetry=True)
    B = token_ids.shape[0]
    E = model.config.n_routed_experts
    routers = out.telemetry.routers
    counts, wsum, coact, went, by_label = [], [], [], [], {}
    for r in routers:
        idx = rearrange(r.indices, "b t k -> (b t) k")
        w = rearrange(r.weights, "b t k -> (b t) k")
        counts.append(stats.expert_counts(idx, E))
        wsum.append(stats.weight_sums(idx, w, E))
        coact.append(stats.coactivation_counts(idx, E))
        went.append(stats.weight_entropy(w).mean())
        if labels is not None:
            if len(labels) != B:
                raise ValueError(f"labels: {len(labels)} given for a batch of {B} rows (one per row)")
            for lab in dict.fromkeys(labels):
                keep = torch.tensor([x == lab for x in labels])
                by_label.setdefault(lab, []).append(stats.expert_counts(r.indices[keep], E))
    return StreamResult(
        source="in-memory model", config=model.config.to_hf(), layers=[r.layer for r in routers],
        top_k=int(routers[0].indices.shape[-1]), n_tokens=int(token_ids.numel()), counts=torch.stack(counts),
        weight_sum=torch.stack(wsum), coactivation=torch.stack(coact), weight_entropy=torch.stack(went),
        labels=None if labels is None else list(labels),
        counts_by_label={k: torch.stack(v) for k, v in by_label.items()},
    )


def split_halves(labels, seed: int = 0) -> list[str]:
    """Each row's label with "/A" or "/B" appended: every class's rows split at random into two halves."""
    rng = np.random.default_rng(seed)
    out = [None] * len(labels)
    for lab in dict.fromkeys(labels):
        rows = [i for i, x in enumerate(labels) if x == lab]
        if len(rows) < 2:
            raise ValueError(f"class {lab!r} has {len(rows)} row(s): a split needs at least 2")
        rows = list(rng.permutation(rows))
        for n, i in enumerate(rows):
            out[i] = f"{lab}/{'A' if n < len(rows) // 2 else 'B'}"
    return out


def merge_halves(counts_by_label: dict) -> dict:
    """{"prose/A": c, "prose/B": d, ...} -> {"prose": c + d, ...} (labels without a "/" kept as they are)."""
    merged: dict = {}
    for lab, c in counts_by_label.items():
        key = lab.rsplit("/", 1)[0]
        merged[key] = merged[key] + c if key in merged else c.clone()
    return merged


def domain_divergences(counts_by_label: dict, a: str = "prose", b: str = "code") -> dict[str, torch.Tensor]:
    """Per-layer JS divergences (bits) from the four halves "a/A", "a/B", "b/A", "b/B", each (L, E):

    between: mean of the four half-against-half divergences across the classes,
    within: the larger of the two half-against-half divergences inside a class (a/A vs a/B, b/A vs b/B).
    Both compare samples of the same size, so sampling noise inflates them alike.
    """
    need = [f"{x}/{h}" for x in (a, b) for h in "AB"]
    missing = [n for n in need if n not in counts_by_label]
    if missing:
        raise ValueError(f"counts_by_label lacks {missing} (label the rows with split_halves)")
    c = counts_by_label
    between = torch.stack([stats.js_divergence(c[f"{a}/{x}"], c[f"{b}/{y}"]) for x in "AB" for y in "AB"]).mean(0)
    within = torch.maximum(stats.js_divergence(c[f"{a}/A"], c[f"{a}/B"]), stats.js_divergence(c[f"{b}/A"], c[f"{b}/B"]))
    return {"between": between, "within": within}


def independent_routing(counts: torch.Tensor, n_tokens: int, k: int, generator: torch.Generator | None = None):
    """(n_tokens, k) expert choices drawn afresh: each token picks k distinct experts with probability
    proportional to `counts` (E,), independently of every other token and of its own text. The loads stay
    close to `counts`; any structure in which experts go together is gone (the null of co-activation)."""
    p = counts.to(torch.float64).clamp_min(0)
    if p.sum() <= 0:
        raise ValueError("counts: no expert has a token")
    p = (p + 1e-12).expand(n_tokens, -1)  # a tiny floor so that k distinct experts always exist
    return torch.multinomial(p, k, replacement=False, generator=generator)


def coactivation_figures(coactivation: torch.Tensor, n_tokens: int, min_together: int = 20):
    """Per layer of (L, E, E) co-activation counts: the share of expert pairs that never meet, and the largest
    lift among pairs that met at least `min_together` times (NaN where none did). Two numpy arrays (L,)."""
    co = coactivation if coactivation.dim() == 3 else coactivation[None]
    E = co.shape[-1]
    i, j = np.triu_indices(E, 1)
    never, strong = [], []
    for c in co:
        pairs = c.numpy()[i, j]
        lift = stats.coactivation_lift(c, n_tokens).numpy()[i, j]
        never.append(float((pairs == 0).mean()))
        ok = pairs >= min_together
        strong.append(float(np.nanmax(lift[ok])) if ok.any() else math.nan)
    return np.array(never), np.array(strong)
