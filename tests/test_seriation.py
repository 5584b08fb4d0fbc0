"""k2mini.lab.seriation: clustered orderings for heatmaps (scipy)."""

import numpy as np
import pytest
import torch

from k2mini.lab.seriation import cluster_order


def teams(sizes, within=4.0, across=0.1, seed=0):
    """A similarity matrix of hidden teams, rows shuffled; returns (matrix, team of each row)."""
    team = np.repeat(np.arange(len(sizes)), sizes)
    team = np.random.default_rng(seed).permutation(team)
    sim = np.where(team[:, None] == team[None, :], within, across)
    np.fill_diagonal(sim, np.nan)
    return sim, team


@pytest.mark.parametrize("sizes", [(3, 3), (2, 5, 4), (6, 1, 3, 2)])
def test_teams_end_up_contiguous(sizes):
    sim, team = teams(sizes)
    order = cluster_order(sim)
    assert sorted(order.tolist()) == list(range(len(team)))
    runs = 1 + int((np.diff(team[order]) != 0).sum())  # number of contiguous blocks along the order
    assert runs == len(sizes)


def test_deterministic_and_accepts_torch():
    sim, _ = teams((4, 4, 4), seed=3)
    noisy = sim + np.random.default_rng(1).uniform(0, 0.5, sim.shape)
    a = cluster_order(noisy)
    assert np.array_equal(a, cluster_order(noisy))
    assert np.array_equal(a, cluster_order(torch.from_numpy(noisy)))
    assert a.dtype == np.int64


def test_nan_rows_and_asymmetry():
    sim, team = teams((3, 3), seed=2)
    sim[0, :] = np.nan  # an unused expert: no information about its pairs
    sim[:, 0] = np.nan
    sim[1, 2] += 0.01  # slight asymmetry is averaged away
    order = cluster_order(sim)
    assert sorted(order.tolist()) == list(range(6))
    rest = [i for i in order.tolist() if i != 0]
    assert 1 + int((np.diff(team[rest]) != 0).sum()) == 2


def test_small_and_bad_input():
    assert cluster_order(np.ones((2, 2))).tolist() == [0, 1]
    assert cluster_order(np.ones((1, 1))).tolist() == [0]
    with pytest.raises(ValueError, match="square"):
        cluster_order(np.ones((2, 3)))
    with pytest.raises(ValueError, match="method"):
        cluster_order(np.ones((4, 4)), method="ward")

