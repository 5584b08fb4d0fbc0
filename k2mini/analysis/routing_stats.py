"""Routing statistics as pure functions of a layer's routing choices (no weights, no I/O).

A layer's routing of N tokens is `indices` (N, k), the chosen experts, and `weights` (N, k), their
mixing weights. Everything here is computed from those two tensors, or from the per-expert counts
they give, so the streaming pass and the in-memory model's telemetry can share one implementation.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from ..moe import expert_load


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token-slots per expert (E,), int64: how many tokens chose each expert."""
    return expert_load(indices, n_experts)


def weight_sums(indices: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Sum of the mixing weights each expert received (E,), float64 (mean weight = this / counts)."""
    return torch.zeros(n_experts, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), weights.reshape(-1).to(torch.float64)
    )


def coactivation_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E, E) int64: entry [a, b] counts the tokens that chose both a and b; the diagonal is the load.

    Exact integers: every token adds its k x k pairs of chosen experts to one bincount.
    """
    idx = rearrange(indices, "... k -> (...) k")
    pairs = idx[:, :, None] * n_experts + idx[:, None, :]  # (N, k, k)
    return torch.bincount(pairs.reshape(-1), minlength=n_experts * n_experts).reshape(n_experts, n_experts)


def mean_weight(weight_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean mixing weight per expert over the tokens it received; NaN for an unused expert."""
    return weight_sum.to(torch.float64) / counts.to(torch.float64).where(counts > 0, torch.nan)


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Per token, the entropy (nats) of its normalized mixing weights over its k experts.

    log(k) means the token spread itself evenly over its experts, 0 that one expert took it all.
    """
    p = weights.to(torch.float64)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def load_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy of the load distribution over experts, normalized by log(E): 1 is perfectly even.

    counts: (..., E). Returns (...,).
    """
    c = counts.to(torch.float64)
    p = c / c.sum(-1, keepdim=True).clamp_min(1)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return h / math.log(counts.shape[-1])


def load_share(counts: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the layer's token-slots, (..., E), summing to 1 per layer."""
    c = counts.to(torch.float64)
    return c / c.sum(-1, keepdim=True).clamp_min(1)


def hottest_share(counts: torch.Tensor) -> torch.Tensor:
    """Share of the token-slots taken by the busiest expert (uniform would be 1 / E)."""
    return load_share(counts).amax(-1)


def unused_experts(counts: torch.Tensor) -> torch.Tensor:
    """Number of experts that received no token, per layer (...,)."""
    return (counts == 0).sum(-1)


def coactivation_lift(coactivation: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Observed pair counts over those expected if experts were chosen independently (c_a c_b / N).

    1 means a pair meets as often as chance says, above 1 that the router pairs them on purpose. The
    diagonal is set to NaN (a pair of an expert with itself says nothing); pairs of unused experts too.
    """
    c = coactivation.to(torch.float64)
    load = c.diagonal()
    expected = load[:, None] * load[None, :] / max(n_tokens, 1)
    lift = c / expected.where(expected > 0, torch.nan)
    lift.fill_diagonal_(torch.nan)
    return lift


def domain_preference(counts_a: torch.Tensor, counts_b: torch.Tensor, prior: float = 1.0) -> torch.Tensor:
    """log2 of each expert's share of domain a's token-slots over its share of domain b's, (..., E).

    `prior` pseudo-counts per expert keep rarely used experts near 0. +1 means the expert is picked
    twice as often (relative to the domain's volume) for a as for b.
    """
    a = counts_a.to(torch.float64) + prior
    b = counts_b.to(torch.float64) + prior
    return torch.log2((a / a.sum(-1, keepdim=True)) / (b / b.sum(-1, keepdim=True)))


def js_divergence(counts_a: torch.Tensor, counts_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (bits, in [0, 1]) between two load distributions, per layer.

    0: both domains use the experts in the same proportions; 1: they use disjoint experts.
    """
    p, q = load_share(counts_a), load_share(counts_b)
    m = (p + q) / 2

    def kl(x, y):
        return (x * (x.clamp_min(1e-300) / y.clamp_min(1e-300)).log2()).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def centred(bias: torch.Tensor) -> torch.Tensor:
    """A correction bias minus its layer mean: only the spread inside a layer changes routing."""
    b = bias.to(torch.float64)
    return b - b.mean(-1, keepdim=True)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(E, E) cosine similarity between the rows of (E, H) router vectors (float64)."""
    v = vectors.to(torch.float64)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return v @ v.T


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The entries of a square matrix above its diagonal, flattened."""
    i, j = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1)
    return matrix[i, j]


def distinct_per_token(indices: torch.Tensor) -> torch.Tensor:
    """How many different experts each token chose (N,): k unless the routing repeated one."""
    s = indices.sort(-1).values
    return 1 + (s[..., 1:] != s[..., :-1]).sum(-1)

