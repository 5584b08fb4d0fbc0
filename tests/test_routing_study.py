"""k2mini.lab.routing_study: the routing walkthrough agrees with the model, run grids are deterministic and
share batches by seed, summaries and verdicts compute what they say."""

import numpy as np
import pandas as pd
import pytest
import torch

import k2mini
from k2mini import K2Config
from k2mini.lab.routing_study import (
    build_model,
    compare,
    dead_expert_fraction,
    param_table,
    routing_walkthrough,
    run_grid,
    sparsity_configs,
    summarize_runs,
    t_critical,
    window_load,
)

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3
SETTINGS = dict(steps=6, batch_size=4, seq_len=16, eval_every=3, eval_batches=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.1, block_size=256)


def micro(**changes):
    return K2Config.preset("k2-micro").replace(**changes)


@pytest.mark.parametrize("norm", [True, False])
def test_walkthrough_matches_the_model(norm):
    model = build_model(micro(norm_topk_prob=norm), seed=3)
    gate = model.moe_layers()[0].mlp.gate
    gate.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.02, 16))  # make the bias matter
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    rec = model(ids, telemetry=True).telemetry.routers[0]
    table = routing_walkthrough(rec.scores[0], gate, tokens=[str(i) for i in range(12)],
                                expected=(rec.indices[0], rec.weights[0]))  # fmt: skip
    assert len(table) == 12 and table["token"].tolist()[:2] == ["0", "1"]
    assert all(len(c) == 2 for c in table["top-k of s + b (chosen)"])
    for _, row in table.iterrows():
        assert row["bias changed it"] == (set(row["top-k of s"]) != set(row["top-k of s + b (chosen)"]))
        if norm:  # normalized weights sum to 1, final ones to the scaling factor
            assert sum(map(float, row["normalized"].split())) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(AssertionError):  # a wrong expectation is caught
        routing_walkthrough(rec.scores[0], gate, expected=(rec.indices[0].flip(-1) * 0, rec.weights[0]))


def test_walkthrough_refuses_grouped_routing():
    model = build_model(micro(n_group=4, topk_group=2), seed=0)
    gate = model.moe_layers()[0].mlp.gate
    with pytest.raises(ValueError, match="n_group"):
        routing_walkthrough(torch.rand(3, 16), gate)


def test_build_model_depends_only_on_seed():
    torch.manual_seed(123)
    a = build_model(micro(), 1)
    torch.manual_seed(456)
    b = build_model(micro(), 1)
    c = build_model(micro(), 2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_run_grid_summaries(data):
    grid = [{"balancing": "none", "seed": 0}, {"balancing": "loss_free", "bias_update_speed": 0.05, "seed": 0},
            {"balancing": "none", "seed": 1}, {"config": {"n_routed_experts": 8}, "seed": 0}]  # fmt: skip
    runs = run_grid(micro(), data, grid, **SETTINGS)
    assert [len(r.history) for r in runs] == [6, 6, 6, 6]
    assert runs[3].config.n_routed_experts == 8 and runs[3].params["config"] == "n_routed_experts=8"
    assert runs[0].params == {"balancing": "none", "seed": 0}
    # same seed: same initial routing of the same first batch; the bias acts only after step 0
    assert np.array_equal(runs[0].history["load"][0], runs[1].history["load"][0])
    assert not np.array_equal(runs[0].history["load"][0], runs[2].history["load"][0])
    again = run_grid(micro(), data, grid[:1], keep_models=True, **SETTINGS)
    assert again[0].history["train_loss"].tolist() == runs[0].history["train_loss"].tolist()
    assert runs[0].model is None and not again[0].model.training

    table = summarize_runs(runs, last=3)
    assert list(table.columns[:3]) == ["balancing", "seed", "val_loss"]
    assert table.loc[0, "maxvio_all"] == pytest.approx(runs[0].history["maxvio"].mean())
    for col in ("maxvio", "maxvio_max_layer", "dead", "starved", "train_loss", "aux_loss", "total_params", "active_params"):
        assert col in table
    assert table.loc[0, "val_loss"] == runs[0].history["val_loss"].dropna().iloc[-1]
    assert table.loc[0, "maxvio"] == pytest.approx(runs[0].history["maxvio"].iloc[-3:].mean())
    assert table.loc[3, "total_params"] < table.loc[0, "total_params"]
    assert window_load(runs[0].history, 3).shape == (1, 16)
    assert window_load(runs[0].history, 3).sum() == 3 * 4 * 16 * 2


def test_dead_expert_fraction():
    load = np.array([[10, 0, 5, 5], [0, 0, 10, 10]])
    assert dead_expert_fraction(load) == 3 / 8
    assert dead_expert_fraction(load, threshold=1.0) == 3 / 8  # 5 is exactly the mean: not under it
    assert dead_expert_fraction(np.array([[1, 9]]), threshold=0.25) == 0.5  # 1 < 0.25 x 5


def test_compare_pairs_seeds():
    rows = []
    for seed, noise in enumerate([0.0, 0.01, -0.01]):
        rows += [{"m": "a", "seed": seed, "v": 2.0 + noise}, {"m": "b", "seed": seed, "v": 2.1 + noise},
                 {"m": "c", "seed": seed, "v": 2.0 + noise + (0.02 if seed == 0 else -0.01)}]  # fmt: skip
    out = compare(pd.DataFrame(rows), "m", "v")
    assert list(out.index) == ["a", "b", "c"]
    assert out.loc["b", "separated"] and out.loc["b", "gap to a"] == pytest.approx(0.1)
    assert out.loc["b", "t"] > 1e6  # the same shift in every seed (up to rounding)
    assert not out.loc["c", "separated"]  # gaps +0.02, -0.01, -0.01: mean 0, noise
    assert not out.loc["a", "separated"]
    assert out.loc["b", "min"] == pytest.approx(2.09) and out.loc["b", "max"] == pytest.approx(2.11)
    assert out.loc["b", "apart"] and not out.loc["c", "apart"] and not out.loc["a", "apart"]
    one = compare(pd.DataFrame(rows[:3]), "m", "v")
    assert not one["separated"].any() and not one["apart"].any()


def test_compare_paired_t_test_threshold():
    # gaps d = (-0.01, -0.05, -0.06): mean -0.04, sd 0.0265, se 0.0153, t = 2.62 < 4.303 (2 dof)
    table = pd.DataFrame([{"m": m, "seed": s, "v": v} for m, vs in (("x", [2.0] * 3), ("y", [1.99, 1.95, 1.94]))
                          for s, v in enumerate(vs)])  # fmt: skip
    out = compare(table, "m", "v")
    assert out.loc["y", "t"] == pytest.approx(0.04 / (np.std([-0.01, -0.05, -0.06], ddof=1) / np.sqrt(3)))
    assert not out.loc["y", "separated"] and out.loc["y", "apart"]  # unpaired: all of y below all of x
    five = pd.DataFrame([{"m": m, "seed": s, "v": v} for m, vs in (("x", [2.0] * 5), ("y", [1.99, 1.95, 1.94, 1.95, 1.96]))
                         for s, v in enumerate(vs)])  # fmt: skip
    assert compare(five, "m", "v").loc["y", "separated"]  # t = 4.9 > 2.776 (4 dof)


def test_t_critical():
    assert t_critical(1) == 12.706 and t_critical(2) == 4.303 and t_critical(30) == 2.042 and t_critical(100) == 1.96
    with pytest.raises(ValueError):
        t_critical(0)


def test_sparsity_configs_keep_active_fixed():
    configs = sparsity_configs(micro(), [8, 16, 32, 64], top_k=4)
    assert [c.sparsity for c in configs.values()] == [2, 4, 8, 16]
    table = param_table(configs)
    assert table["active without router"].nunique() == 1
    assert table["active routed experts"].nunique() == 1
    assert (table["total"].diff().dropna() > 0).all()
    assert (table["active"] - table["router"] == table["active without router"]).all()
    assert table["router"].tolist() == [(E * 64 + E) * 1 for E in (8, 16, 32, 64)]


def test_grid_labels_are_not_passed_to_train(data):
    (run,) = run_grid(micro(), data, [{"seed": 0, "n_experts": 16, "balancing": "none"}], **SETTINGS)
    assert run.params == {"seed": 0, "n_experts": 16, "balancing": "none"}
    assert run.history.attrs["train_config"]["balancing"] == "none"


def test_record_round_trip(tmp_path, monkeypatch, data):
    from k2mini.lab import routing_study

    monkeypatch.setattr(k2mini.data, "load_corpus", lambda name: k2mini.load_corpus(str(tmp_path / "t.txt")))
    (tmp_path / "t.txt").write_text(TEXT)
    settings = routing_study.sparsity_settings(layers=2, n_experts=[4, 8], seeds=[0], steps=4, batch=2, seq=16,
                                               eval_every=2, corpus="unused")  # fmt: skip
    settings["train"]["eval_batches"] = 1
    runs = routing_study.sparsity_study(settings)
    assert [r.params["n_experts"] for r in runs] == [4, 8] and runs[1].config.n_routed_experts == 8
    assert runs[0].params["sparsity"] == 1.0 and runs[0].config.num_experts_per_tok == 4
    path = tmp_path / "runs" / "rec.json"
    routing_study.save_record(path, runs, command="test", settings=settings, last=2)
    record, summary, curves = routing_study.load_record(path)
    assert record["command"] == "test" and "cpu_count" in record["machine"]
    assert record["settings"]["train"]["steps"] == 4
    assert summary["n_experts"].tolist() == [4, 8]
    assert summary["val_loss"].tolist() == [r.history["val_loss"].dropna().iloc[-1] for r in runs]
    assert curves.groupby("n_experts").size().tolist() == [2, 2]  # evaluations at steps 2 and 4
