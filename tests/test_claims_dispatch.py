"""Notebook 06's claim: balanced routers leave the slowest rank waiting less than no balancing, every seed.

Negative controls: identical arms (every method's loads the same, here an untrained router's real loads
on real tokens) and the methods' labels swapped; positive: a table with the notebook's ordering.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from k2mini import K2Config, K2ForCausalLM
from k2mini.lab.claims.dispatch import balancing_cuts_stragglers
from k2mini.lab.expert_parallel import straggler_factor, straggler_table

D = 4


def table(values):
    """{seed: (loss_free, aux_loss, none)} straggler factors at degree D, as `straggler_table` shapes them."""
    return pd.DataFrame([{"seed": s, "balancing": m, D: v} for s, vals in values.items()
                         for m, v in zip(("loss_free", "aux_loss", "none"), vals)])


def test_claim_balancing_cuts_stragglers_holds_on_the_notebooks_figures():
    v = balancing_cuts_stragglers(table({0: (1.12, 1.25, 1.91), 1: (1.16, 1.156, 1.787)}), degree=D)
    assert v and v.margin == pytest.approx(1.787 - 1.16 - 0.25)


def test_claim_balancing_cuts_stragglers_fails_when_one_seed_gains_too_little():
    assert not balancing_cuts_stragglers(table({0: (1.12, 1.25, 1.91), 1: (1.30, 1.25, 1.50)}), degree=D)


def test_claim_balancing_cuts_stragglers_fails_on_swapped_labels():
    swapped = table({0: (1.12, 1.25, 1.91)}).replace({"balancing": {"none": "loss_free", "loss_free": "none"}})
    assert not balancing_cuts_stragglers(swapped, degree=D)


class Run:
    def __init__(self, seed, balancing, loads):
        self.loads = loads

        class Spec:
            def get(self, name):
                return balancing

        self.spec = Spec()
        self.spec.seed = seed


def test_claim_balancing_cuts_stragglers_fails_on_identical_arms_of_an_untrained_router():
    """Every method given the same real loads (an untrained k2-micro routing random tokens): no order."""
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("k2-micro")).eval()
    with torch.no_grad():
        loads = torch.stack([model(torch.randint(0, 256, (4, 64)), telemetry=True).telemetry.loads for _ in range(5)])
    loads = loads.numpy()  # (steps, MoE layers, E)
    runs = [Run(0, m, loads) for m in ("loss_free", "aux_loss", "none")]
    t = straggler_table(runs, degrees=[D], last=50)
    assert np.allclose(t[D], t[D].iloc[0]) and t[D].iloc[0] > 1  # uneven, but the same in every arm
    v = balancing_cuts_stragglers(t, degree=D)
    assert not v and v.margin == pytest.approx(-0.25)


def test_straggler_table_averages_the_factor_over_the_last_steps_and_layers():
    loads = np.array([[[4, 0, 0, 0], [1, 1, 1, 1]], [[2, 2, 0, 0], [1, 1, 1, 1]]])  # (steps, layers, E)
    t = straggler_table([Run(3, "none", loads)], degrees=[2, 4], last=1)
    assert t.loc[0, 2] == pytest.approx(np.mean([straggler_factor(loads[-1], 2)])) == pytest.approx(1.5)
    assert t.loc[0, 4] == pytest.approx((2.0 + 1.0) / 2) and t.loc[0, "seed"] == 3
