"""Notebook 03's claims (k2mini.lab.claims.activation) and their controls (k2mini.lab.activation_controls):
each claim fails on data where its phenomenon is absent and holds where it is present.

The negative controls use a real untrained k2-micro on real prose and code bytes where that is cheap
(routing permuted across tokens, the class labels shuffled); the positive ones hand-made routings."""

import numpy as np
import pandas as pd
import pytest
import torch

from k2mini import K2Config, K2ForCausalLM
from k2mini.analysis import coactivation_counts
from k2mini.lab import activation_controls as ac
from k2mini.lab.claims.activation import (bias_learned, domains_use_different_experts, experts_pair_beyond_chance,
                                          format_keeps_routing_and_loss, int4_moves_experts_further,
                                          int4_reroutes_fewer_in_first_layer, load_even_beyond_untrained)
from k2mini.lab.quantization_study import expert_errors, perturb_experts, round_experts

PROSE = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do "
         "shake the darling buds of May, and summer's lease hath all too short a date. ") * 8
CODE = ("def compare(a, b):\n    if a < b:\n        return -1\n    return int(a > b)\n\nfor i in range(10):\n"
        "    print(compare(i, 5), [x * 2 for x in range(i)])\n") * 8


def byte_rows(text, n, t=64):
    data = torch.tensor(list(text.encode()), dtype=torch.int64)
    return data[: n * t].reshape(n, t)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.preset("k2-micro")).eval()


@pytest.fixture(scope="module")
def batch():
    ids = torch.cat([byte_rows(PROSE, 8), byte_rows(CODE, 8)])
    return ids, ["prose"] * 8 + ["code"] * 8


@pytest.fixture(scope="module")
def halves_result(micro, batch):
    ids, labels = batch
    return ac.telemetry_result(micro, ids, ac.split_halves(labels, seed=0))


def team_routing(n_tokens, teams, seed=0):
    """Each token picks one of the given teams of experts: pairs inside a team meet, others never."""
    g = torch.Generator().manual_seed(seed)
    teams = torch.tensor(teams)
    return teams[torch.randint(len(teams), (n_tokens,), generator=g)]


def sampled_counts(p, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.bincount(torch.multinomial(torch.tensor(p, dtype=torch.float64), n, True, generator=g),
                          minlength=len(p))[None]


# ------------------------------------------------------------------ the controls' helpers


def test_split_halves_splits_every_class_in_two_and_merge_restores_it():
    labels = ["prose"] * 6 + ["code"] * 5
    halves = ac.split_halves(labels, seed=1)
    assert [h.split("/")[0] for h in halves] == labels
    assert halves.count("prose/A") == 3 and halves.count("code/A") == 2 and halves.count("code/B") == 3
    counts = {h: torch.full((2, 4), i + 1) for i, h in enumerate(dict.fromkeys(halves))}
    merged = ac.merge_halves(counts)
    assert set(merged) == {"prose", "code"} and int(merged["prose"].sum()) == 8 * sum(
        i + 1 for i, h in enumerate(dict.fromkeys(halves)) if h.startswith("prose"))
    with pytest.raises(ValueError, match="'x' has 1 row"):
        ac.split_halves(["x", "y", "y"])


def test_telemetry_result_matches_the_models_own_loads(micro, batch):
    ids, labels = batch
    r = ac.telemetry_result(micro, ids, labels)
    with torch.no_grad():
        tel = micro(ids, telemetry=True).telemetry
    assert torch.equal(r.counts, tel.loads)
    assert torch.equal(r.counts_by_label["prose"] + r.counts_by_label["code"], r.counts)
    assert torch.equal(r.coactivation.diagonal(dim1=-2, dim2=-1), r.counts)


def test_independent_routing_keeps_the_loads_and_picks_distinct_experts():
    counts = torch.tensor([400, 300, 200, 100, 0, 0])
    idx = ac.independent_routing(counts, 500, 2, torch.Generator().manual_seed(0))
    assert idx.shape == (500, 2) and bool((idx[:, 0] != idx[:, 1]).all())
    load = torch.bincount(idx.reshape(-1), minlength=6)
    assert int(load[4:].sum()) == 0 and load[0] > load[1] > load[2] > load[3]


def test_coactivation_figures_of_teams():
    idx = team_routing(2000, [[0, 1], [2, 3]])
    never, strong = ac.coactivation_figures(coactivation_counts(idx, 4)[None], 2000)
    assert never[0] == pytest.approx(4 / 6) and strong[0] == pytest.approx(2.0, rel=0.1)


def test_round_experts_rounds_only_the_routed_experts_and_coarser_moves_further(micro):
    four, two = round_experts(micro, 4), round_experts(micro, 2)
    e4, e2 = expert_errors(micro, four), expert_errors(micro, two)
    assert (e2 > 2 * e4).all() and (e4 > 0).all()
    w = four.moe_layers()[0].mlp.experts.gate_proj.detach()  # (E, out, in): at most 16 levels per 32 columns
    assert w.reshape(*w.shape[:-1], -1, 32).unique(dim=None).numel() <= 16 * w.numel() // 32
    assert torch.equal(four.model.embed_tokens.weight, micro.model.embed_tokens.weight)


def test_perturb_experts_moves_each_expert_by_the_size_asked(micro):
    target = expert_errors(micro, round_experts(micro, 4))
    noisy = perturb_experts(micro, target, seed=3)
    assert np.allclose(expert_errors(micro, noisy).values, target.values, rtol=1e-3)


# ------------------------------------------------------------------ claims: negative and positive controls


def test_claim_domains_fail_when_the_labels_are_shuffled_on_a_real_model(micro, batch):
    ids, labels = batch
    shuffled = [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]
    r = ac.telemetry_result(micro, ids, ac.split_halves(shuffled, seed=0))
    d = ac.domain_divergences(r.counts_by_label)
    assert not domains_use_different_experts(d, None)


def test_claim_domains_fail_when_trained_is_the_untrained_model(halves_result):
    d = ac.domain_divergences(halves_result.counts_by_label)
    assert not domains_use_different_experts(d, d)  # the two arms identical: no excess over the untrained


def test_claim_domains_hold_for_disjoint_experts():
    p, c = [1.0] * 8 + [0.0] * 8, [0.0] * 8 + [1.0] * 8
    counts = {f"prose/{h}": sampled_counts(p, 2000, s) for s, h in enumerate("AB")}
    counts |= {f"code/{h}": sampled_counts(c, 2000, 2 + s) for s, h in enumerate("AB")}
    mixed = [1.0] * 16
    base = {f"{x}/{h}": sampled_counts(mixed, 2000, 4 + s) for s, (x, h) in
            enumerate((x, h) for x in ("prose", "code") for h in "AB")}
    v = domains_use_different_experts(ac.domain_divergences(counts), ac.domain_divergences(base))
    assert v and v.margin > 0.5


def _figures(idx, n_experts):
    return ac.coactivation_figures(coactivation_counts(idx, n_experts)[None], idx.shape[0])


def _null(idx, n_experts, seed=0):
    counts = torch.bincount(idx.reshape(-1), minlength=n_experts)
    return _figures(ac.independent_routing(counts, idx.shape[0], idx.shape[1], torch.Generator().manual_seed(seed)),
                    n_experts)


def test_claim_pairs_fail_on_routing_redrawn_across_tokens(halves_result):
    counts, n = halves_result.counts[0], halves_result.n_tokens  # a real untrained router's loads
    permuted = ac.independent_routing(counts, n, 2, torch.Generator().manual_seed(7))
    assert not experts_pair_beyond_chance(_figures(permuted, 16), _null(permuted, 16))


def test_claim_pairs_fail_when_no_better_than_the_untrained_router():
    idx = team_routing(4000, [[0, 1], [2, 3], [4, 5], [6, 7]])
    obs, null = _figures(idx, 8), _null(idx, 8)
    assert experts_pair_beyond_chance(obs, null)  # teams, beyond chance...
    assert not experts_pair_beyond_chance(obs, null, untrained=obs, untrained_null=null)  # ...but not learned


def test_claim_pairs_hold_for_teams_beyond_an_untrained_router():
    idx = team_routing(4000, [[0, 1], [2, 3], [4, 5], [6, 7]])
    loose = ac.independent_routing(torch.ones(8), 4000, 2, torch.Generator().manual_seed(1))
    v = experts_pair_beyond_chance(_figures(idx, 8), _null(idx, 8), _figures(loose, 8), _null(loose, 8))
    assert v and v.margin > 0.3


TRAINED = {"unused": [0, 0, 1], "load_entropy": [0.97, 0.97, 0.96], "hottest_over_uniform": [2.9, 2.5, 2.6]}


def test_claim_load_fails_on_an_untrained_router(halves_result):
    lf = halves_result.layer_frame()
    untrained = {"unused": lf["unused_experts"], "load_entropy": lf["load_entropy"],
                 "hottest_over_uniform": lf["hottest_over_uniform"]}
    assert not load_even_beyond_untrained(untrained, untrained)
    assert not load_even_beyond_untrained(TRAINED, TRAINED)  # arms identical


def test_claim_load_holds_when_only_the_trained_router_is_even():
    untrained = {"unused": [0, 1, 1], "load_entropy": [0.82, 0.77, 0.71], "hottest_over_uniform": [6.2, 9.8, 13.3]}
    assert load_even_beyond_untrained(TRAINED, untrained)
    assert not load_even_beyond_untrained(untrained, TRAINED)  # arms swapped


def test_claim_bias_fails_on_untrained_biases(micro):
    bias = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in micro.moe_layers()]).double()
    assert not bias_learned(bias.mean(-1), bias.std(-1))
    assert not bias_learned([0.37, 0.41, 0.60], [0.32, 0.23, 0.19])  # widest first, not last


def test_claim_bias_holds_for_a_shared_offset_widest_last():
    assert bias_learned([0.37, 0.41, 0.60], [0.19, 0.23, 0.32])


def test_claim_int4_error_ratio_fails_with_the_arms_swapped():
    int4, fp8 = np.full(192, 0.0936), np.full(192, 0.0265)
    assert int4_moves_experts_further(int4, fp8)
    assert not int4_moves_experts_further(fp8, int4)
    assert not int4_moves_experts_further(int4, int4)


def test_claim_int4_error_ratio_on_real_rounding(micro):
    """4-bit against 6-bit rounding of the same experts: each extra bit halves the step, so 4x."""
    e4, e6 = expert_errors(micro, round_experts(micro, 4)), expert_errors(micro, round_experts(micro, 6))
    assert int4_moves_experts_further(e4, e6, 3.0, 5.5)
    assert not int4_moves_experts_further(e6, e4, 3.0, 5.5)


def test_claim_format_fails_where_it_reroutes_or_moves_the_loss():
    assert format_keeps_routing_and_loss([0.005, 0.02, 0.033], -0.0001)
    assert not format_keeps_routing_and_loss([0.12, 0.2, 0.3], 0.001)  # a coarse grid reroutes
    assert not format_keeps_routing_and_loss([0.01, 0.02, 0.03], 0.02)  # or moves the loss


def test_claim_first_layer_fails_with_the_arms_swapped():
    assert int4_reroutes_fewer_in_first_layer(0.005, 0.028)
    assert not int4_reroutes_fewer_in_first_layer(0.028, 0.005)
    assert not int4_reroutes_fewer_in_first_layer(0.01, 0.01)


def test_claim_module_registers_every_claim_with_notebook_03():
    from k2mini.lab.claims import registry

    names = {c.name for c in registry() if c.notebook == "03"}
    assert {"domains_use_different_experts", "experts_pair_beyond_chance", "load_even_beyond_untrained",
            "bias_learned", "int4_moves_experts_further", "format_keeps_routing_and_loss",
            "int4_reroutes_fewer_in_first_layer"} <= names


def test_zero_experts_removes_only_the_routed_experts(micro):
    from k2mini.lab.quantization_study import zero_experts

    z = zero_experts(micro)
    assert all(float(getattr(l.mlp.experts, p).detach().abs().sum()) == 0 for l in z.moe_layers()
               for p in ("gate_proj", "up_proj", "down_proj"))
    assert torch.equal(z.moe_layers()[0].mlp.gate.weight, micro.moe_layers()[0].mlp.gate.weight)
    assert float(micro.moe_layers()[0].mlp.experts.gate_proj.detach().abs().sum()) > 0  # the original untouched
