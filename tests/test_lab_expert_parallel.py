"""The lab side of notebook 06: the spawned dispatch record, stragglers, device-limited routing."""

import numpy as np
import pytest
import torch

from k2mini.balance import max_violation
from k2mini.lab.expert_parallel import dispatch_record, distinct_groups, straggler_factor
from k2mini.moe import route
from k2mini.parallel import traffic_from_slots


def test_dispatch_record_matches_one_process_and_the_accounting():
    ranks = dispatch_record(world=2, batch=2, seq=16)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[1]["first"] == ranks[0]["n_local"]
    for r in ranks:
        assert r["logit_err"] < 1e-5 and r["grad_err"] < 1e-5
    for layer in ranks[0]["slots"]:
        slots = torch.stack([r["slots"][layer].reshape(2, -1).sum(1) for r in ranks])  # (source, owner)
        assert slots.sum() == 2 * 2 * 16 * 2  # every token-slot of both ranks (top-2)
        expected = traffic_from_slots(slots, 64, torch.float32, n_experts=16)
        for a, r in enumerate(ranks):
            assert r["sent"][layer] == {k: v[a] for k, v in expected.sent.items()}


def test_straggler_factor():
    load = np.array([[4, 0, 2, 2], [1, 1, 1, 1]])
    assert straggler_factor(load, 2).tolist() == [1.0, 1.0]  # ranks get 4 and 4: balanced though experts are not
    assert straggler_factor(load, 4)[0] == pytest.approx(2.0)  # one expert per rank: 1 + MaxVio
    rng = np.random.default_rng(0)
    for _ in range(20):
        load = rng.integers(0, 50, size=(3, 16))
        for d in (1, 2, 4, 8, 16):
            assert (straggler_factor(load, d) <= 1 + max_violation(torch.tensor(load)).numpy() + 1e-6).all()  # MaxVio is float32
        assert np.allclose(straggler_factor(load, 1), 1.0)


def test_device_limited_routing_stays_within_its_groups():
    torch.manual_seed(0)
    x, gate = torch.randn(256, 32), torch.randn(64, 32)
    grouped = route(x, gate, torch.zeros(64), top_k=8, n_group=8, topk_group=3)
    single = route(x, gate, torch.zeros(64), top_k=8)
    assert distinct_groups(grouped.indices, 64, 8).max() <= 3
    assert distinct_groups(single.indices, 64, 8).float().mean() > distinct_groups(grouped.indices, 64, 8).float().mean()
    assert distinct_groups(torch.tensor([[0, 9, 63]]), 64, 8).tolist() == [3]


def test_plot_dispatch_draws_every_rank():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from k2mini.lab.expert_parallel import plot_dispatch

    ranks = [{"rank": r, "first": 2 * r, "n_local": 2, "slots": {1: torch.tensor([3, 1, 0, 4])}} for r in range(2)]
    ax = plot_dispatch(ranks, 1)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0's tokens", "rank 1's tokens"]
    assert len(ax.patches) == 2  # the slots each rank keeps
    plt.close("all")
