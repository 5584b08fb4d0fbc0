"""k2mini.lab.routing_study: the routing walkthrough agrees with the model, run summaries compute what they
say from run_sweep's results, seed-paired comparisons match a hand-computed paired t-test and scipy's
p-value, sparsity sweeps keep the active parameters fixed."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import k2mini
from k2mini import K2Config
from k2mini.lab.experiments import RunResult, RunSpec, build_model, run_sweep
from k2mini.lab.routing_study import (
    compare,
    dead_expert_fraction,
    param_table,
    routing_walkthrough,
    sparsity_configs,
    sparsity_specs,
    summarize_runs,
    window_load,
)

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3
BASE = RunSpec(preset="k2-micro", lr=3e-3, steps=6, batch_size=4, seq_len=16, eval_every=3, eval_batches=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.1, block_size=256)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    yield
    torch.set_num_threads(threads)


def micro(**changes):
    return K2Config.preset("k2-micro").replace(**changes)


@pytest.mark.parametrize("norm", [True, False])
def test_walkthrough_matches_the_model(norm):
    model = build_model(BASE.replace(config={"norm_topk_prob": norm}, seed=3))
    gate = model.moe_layers()[0].mlp.gate
    gate.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.02, 16))  # make the bias matter
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    rec = model(ids, telemetry=True).telemetry.routers[0]
    table = routing_walkthrough(rec.scores[0], gate, tokens=[str(i) for i in range(12)],
                                expected=(rec.indices[0], rec.weights[0]))  # fmt: skip
    assert len(table) == 12 and table["token"].tolist()[:2] == ["0", "1"]
    assert all(len(c) == 2 for c in table["top-k of s + b (chosen)"])
    assert table["bias changed it"].any()  # the bias above is large enough to matter somewhere
    for _, row in table.iterrows():
        assert row["bias changed it"] == (set(row["top-k of s"]) != set(row["top-k of s + b (chosen)"]))
        if norm:  # normalized weights sum to 1, final ones to the scaling factor
            assert sum(map(float, row["normalized"].split())) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(AssertionError):  # a wrong expectation is caught
        routing_walkthrough(rec.scores[0], gate, expected=(rec.indices[0].flip(-1) * 0, rec.weights[0]))


def test_walkthrough_refuses_grouped_routing():
    model = build_model(BASE.replace(config={"n_group": 4, "topk_group": 2}))
    gate = model.moe_layers()[0].mlp.gate
    with pytest.raises(ValueError, match="n_group"):
        routing_walkthrough(torch.rand(3, 16), gate)


@pytest.fixture(scope="module")
def runs(data):
    specs = [BASE.replace(train={"balancing": "none"}),
             BASE.replace(train={"balancing": "loss_free", "bias_update_speed": 0.05}),
             BASE.replace(train={"balancing": "none"}, seed=1),
             BASE.replace(config={"n_routed_experts": 8}, label="E=8")]  # fmt: skip
    return run_sweep(specs, cache=False, data=data, progress=False)


def test_summarize_runs(runs):
    assert [len(r.history) for r in runs] == [6, 6, 6, 6]
    # same seed: same initial routing of the same first batch; the bias acts only after step 0
    assert np.array_equal(runs[0].loads[0], runs[1].loads[0])
    assert not np.array_equal(runs[0].loads[0], runs[2].loads[0])

    table = summarize_runs(runs, last=3)
    assert list(table.columns[:3]) == ["run", "seed", "balancing"]
    assert table["run"].tolist() == [r.name for r in runs] and table.loc[3, "run"] == "E=8"
    assert table["seed"].tolist() == [0, 0, 1, 0]
    assert table["balancing"].tolist()[:3] == ["none", "loss_free", "none"]
    assert table.loc[3, "balancing"] == k2mini.TrainConfig.balancing  # the default, when not set
    assert table.loc[1, "bias_update_speed"] == 0.05 and math.isnan(table.loc[0, "bias_update_speed"])
    assert table["n_experts"].tolist() == [16, 16, 16, 8] and table.loc[3, "sparsity"] == 4
    for col in ("maxvio", "maxvio_max_layer", "dead", "starved", "train_loss", "aux_loss", "total_params",
                "active_params", "cpu_s"):
        assert col in table, col
    for i, r in enumerate(runs):
        h = r.history
        assert table.loc[i, "val_loss"] == h["val_loss"].dropna().iloc[-1]
        assert table.loc[i, "train_loss"] == pytest.approx(h["train_loss"].iloc[-3:].mean())
        assert table.loc[i, "maxvio"] == pytest.approx(h["maxvio"].iloc[-3:].mean())
        assert table.loc[i, "maxvio_all"] == pytest.approx(h["maxvio"].mean())
        assert table.loc[i, "dead"] == dead_expert_fraction(window_load(r, 3))
        assert table.loc[i, "cpu_s"] == r.cpu_s
    assert table.loc[3, "total_params"] < table.loc[0, "total_params"]
    assert table.loc[3, "active_params"] == table.loc[0, "active_params"] - 8 * 64 - 8  # 8 router rows fewer


def test_window_load_sums_the_last_steps(runs):
    r = runs[0]
    load = window_load(r, 3)
    assert load.shape == (1, 16)  # (MoE layers, experts)
    assert load.sum() == 3 * 4 * 16 * 2  # steps x batch x seq x top-k token-slots
    assert np.array_equal(load, r.loads[-3:].sum(0))
    assert window_load(r, 100).sum() == 6 * 4 * 16 * 2  # at most the whole run
    no_loads = RunResult(spec=BASE, history=r.history, diverged=False, stop_reason="", total_heads=8, wall_s=0.0)
    with pytest.raises(ValueError, match="no per-step expert loads"):
        window_load(no_loads, 3)


def test_dead_expert_fraction():
    load = np.array([[10, 0, 5, 5], [0, 0, 10, 10]])
    assert dead_expert_fraction(load) == 3 / 8
    assert dead_expert_fraction(load, threshold=1.0) == 3 / 8  # 5 is exactly the mean: not under it
    assert dead_expert_fraction(np.array([[1, 9]]), threshold=0.25) == 0.5  # 1 < 0.25 x 5


# ----------------------------------------------------------------------------------------------
# compare


def table_of(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"m": m, "seed": s, "v": v} for m, vs in values.items() for s, v in enumerate(vs)])


def test_compare_is_the_paired_t_test():
    x, y = [2.0, 2.1, 1.9], [1.99, 2.05, 1.84]
    out = compare(table_of({"x": x, "y": y}), "m", "v")
    assert list(out.index) == ["x", "y"]
    d = np.array(y) - np.array(x)  # (-0.01, -0.05, -0.06)
    t = abs(d.mean()) / (d.std(ddof=1) / math.sqrt(len(d)))
    p = 2 * stats.t.sf(t, df=len(d) - 1)
    assert out.loc["y", "gap to x"] == pytest.approx(d.mean())
    assert out.loc["y", "t"] == pytest.approx(t, rel=1e-9) and out.loc["y", "p"] == pytest.approx(p, rel=1e-9)
    assert out.loc["y", "separated"] == (p < 0.05) and not out.loc["y", "separated"]  # t = 2.62, p = 0.12
    assert not out.loc["y", "apart"]  # the ranges overlap
    assert (out.loc["y", "mean"], out.loc["y", "min"], out.loc["y", "max"]) == pytest.approx((np.mean(y), min(y), max(y)))
    # the baseline row: no test against itself
    assert math.isnan(out.loc["x", "t"]) and math.isnan(out.loc["x", "p"]) and not out.loc["x", "separated"]
    assert out.loc["x", "gap to x"] == 0.0


def test_compare_pairing_finds_what_ranges_miss():
    # seed effects much larger than the method's: unpaired ranges overlap, the paired gaps are consistent
    x = [2.0, 2.3, 1.7, 2.1, 1.9]
    y = [v - g for v, g in zip(x, [0.04, 0.05, 0.06, 0.05, 0.04])]
    out = compare(table_of({"x": x, "y": y}), "m", "v")
    d = np.array(y) - np.array(x)
    t = abs(d.mean()) / (d.std(ddof=1) / math.sqrt(len(d)))
    assert out.loc["y", "t"] == pytest.approx(t, rel=1e-9)
    assert out.loc["y", "p"] == pytest.approx(2 * stats.t.sf(t, df=4), rel=1e-9) and out.loc["y", "p"] < 0.05
    assert out.loc["y", "separated"] and not out.loc["y", "apart"]


def test_compare_apart_and_baseline_choice():
    table = table_of({"a": [2.0, 2.01, 1.99], "b": [2.2, 2.25, 2.21], "c": [2.0, 2.3, 1.8]})
    out = compare(table, "m", "v")
    assert out.loc["b", "apart"] and not out.loc["c", "apart"] and not out.loc["a", "apart"]
    by_b = compare(table, "m", "v", baseline="b")
    assert "gap to b" in by_b and by_b.loc["a", "gap to b"] == pytest.approx(-out.loc["b", "gap to a"])
    assert by_b.loc["a", "t"] == pytest.approx(out.loc["b", "t"]) and math.isnan(by_b.loc["b", "t"])


def test_compare_degenerate_cases():
    # the same gap in every seed: no spread, the shift is certain
    shifted = compare(table_of({"a": [2.0, 2.5, 1.5], "b": [2.25, 2.75, 1.75]}), "m", "v")
    assert shifted.loc["b", "t"] == math.inf and shifted.loc["b", "p"] == 0.0 and shifted.loc["b", "separated"]
    # identical results: no gap at all
    same = compare(table_of({"a": [2.0, 2.5, 1.5], "b": [2.0, 2.5, 1.5]}), "m", "v")
    assert math.isnan(same.loc["b", "t"]) and same.loc["b", "p"] == 1.0 and not same.loc["b", "separated"]
    assert same.loc["b", "gap to a"] == 0.0 and not same.loc["b", "apart"]
    # one seed: no test, no verdict
    one = compare(table_of({"a": [2.0], "b": [3.0]}), "m", "v")
    assert math.isnan(one.loc["b", "t"]) and math.isnan(one.loc["b", "p"])
    assert not one["separated"].any() and not one["apart"].any() and one.loc["b", "gap to a"] == 1.0
    # a seed missing on one side: only the paired seeds count
    partial = table_of({"a": [2.0, 2.5, 1.5], "b": [2.1, 2.6]})
    assert compare(partial, "m", "v").loc["b", "gap to a"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# Sparsity sweeps


def test_sparsity_configs_keep_active_fixed():
    configs = sparsity_configs(micro(), [8, 16, 32, 64], top_k=4)
    assert [c.sparsity for c in configs.values()] == [2, 4, 8, 16]
    table = param_table(configs)
    assert table["active without router"].nunique() == 1
    assert table["active routed experts"].nunique() == 1
    assert (table["total"].diff().dropna() > 0).all()
    assert (table["active"] - table["router"] == table["active without router"]).all()
    assert table["router"].tolist() == [(E * 64 + E) * 1 for E in (8, 16, 32, 64)]


def test_sparsity_specs():
    base = BASE.replace(config={"num_hidden_layers": 3, "num_experts_per_tok": 4}, train={"balancing": "none"})
    specs = sparsity_specs(base, [8, 16], seeds=[0, 1])
    assert [(s.seed, s.config_overrides["n_routed_experts"]) for s in specs] == [(0, 8), (0, 16), (1, 8), (1, 16)]
    assert [s.name for s in specs] == ["E=8", "E=16", "E=8", "E=16"]
    for s in specs:  # everything else of the base kept
        assert s.config_overrides["num_hidden_layers"] == 3 and s.model_config().num_experts_per_tok == 4
        assert s.train_settings == {"balancing": "none"} and s.batch_seed == s.seed and s.lr == base.lr
    assert len({s.key() for s in specs}) == 4
