"""Routing statistics (k2mini.analysis.routing_stats): pure functions checked against brute force."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k2mini.analysis import routing_stats as stats


def random_routing(n, e, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g)
    return indices, weights


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), e=st.integers(2, 12), data=st.data())
def test_coactivation_counts_pairs_of_chosen_experts(n, e, data):
    k = data.draw(st.integers(1, e))
    indices, _ = random_routing(n, e, k, seed=data.draw(st.integers(0, 10_000)))
    c = stats.coactivation_counts(indices, e)
    brute = torch.zeros(e, e, dtype=torch.int64)
    for row in indices.tolist():
        for a in row:
            for b in row:
                brute[a, b] += 1
    assert torch.equal(c, brute)
    assert torch.equal(c.diagonal(), stats.expert_counts(indices, e))
    assert torch.equal(c, c.T)


def test_weight_sums_and_mean_weight():
    indices = torch.tensor([[0, 1], [1, 2], [1, 0]])
    weights = torch.tensor([[0.5, 1.0], [2.0, 3.0], [4.0, 6.0]])
    s = stats.weight_sums(indices, weights, 4)
    assert s.tolist() == [6.5, 7.0, 3.0, 0.0]
    m = stats.mean_weight(s, stats.expert_counts(indices, 4))
    assert m[:3].tolist() == [6.5 / 2, 7.0 / 3, 3.0] and math.isnan(m[3])


def test_entropies():
    even = torch.ones(5, 4)
    assert torch.allclose(stats.weight_entropy(even), torch.full((5,), math.log(4), dtype=torch.float64))
    peaked = torch.tensor([[1.0, 0.0, 0.0]])
    assert stats.weight_entropy(peaked).item() == 0.0
    assert stats.load_entropy(torch.tensor([3, 3, 3, 3])).item() == 1.0
    assert stats.load_entropy(torch.tensor([9, 0, 0, 0])).item() == 0.0
    assert 0 < stats.load_entropy(torch.tensor([5, 1, 1, 1])).item() < 1


def test_shares_hottest_unused():
    counts = torch.tensor([[6, 2, 0, 0], [2, 2, 2, 2]])
    assert torch.allclose(stats.load_share(counts).sum(-1), torch.ones(2, dtype=torch.float64))
    assert stats.hottest_share(counts).tolist() == [0.75, 0.25]
    assert stats.unused_experts(counts).tolist() == [2, 0]


def test_coactivation_lift_is_one_for_independent_choices():
    # 4 experts, k = 2, every one of the 6 pairs equally often: each expert is chosen by half the tokens
    pairs = torch.tensor([[a, b] for a in range(4) for b in range(a + 1, 4)] * 10)
    lift = stats.coactivation_lift(stats.coactivation_counts(pairs, 4), len(pairs))
    off = stats.off_diagonal(lift)
    # P(a and b) = 1/6, P(a) P(b) = 1/4: pairs meet 2/3 as often as independent draws (k = 2 of 4)
    assert torch.allclose(off, torch.full_like(off, (1 / 6) / (1 / 4)))
    assert lift.diagonal().isnan().all()


def test_domain_preference_and_js():
    a = torch.tensor([80, 20, 0, 0])
    b = torch.tensor([0, 0, 20, 80])
    pref = stats.domain_preference(a, b, prior=0.0 + 1e-9)
    assert pref[0] > 10 and pref[3] < -10
    assert abs(stats.js_divergence(a, b).item() - 1.0) < 1e-9
    assert stats.js_divergence(a, a).item() == 0.0
    same = stats.domain_preference(a, 2 * a, prior=0.0)[:2]  # same proportions, twice the volume
    assert torch.allclose(same, torch.zeros(2, dtype=torch.float64))


def test_centred_and_cosine():
    b = torch.tensor([3.0, 4.0, 5.0])
    assert stats.centred(b).tolist() == [-1.0, 0.0, 1.0]
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    cos = stats.cosine_matrix(w)
    assert torch.allclose(cos, torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float64))
    assert stats.off_diagonal(cos).tolist() == [0.0, 1.0, 0.0]


def test_distinct_per_token():
    assert stats.distinct_per_token(torch.tensor([[3, 1, 2], [1, 1, 2]])).tolist() == [3, 2]

