"""k2mini.lab.records: a record of runs written and read back, histories thinned without losing peaks or
evaluations, other formats refused, and the committed full-scale records readable."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import k2mini
from k2mini.lab.experiments import RunResult, RunSpec, run_sweep, training_code_digest
from k2mini.lab.records import RECORD_FORMAT, read_record, thin_history, write_record
from k2mini.lab.routing_study import compare
from k2mini.lab.stability import summarize
from lab_runs import TINY, write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = write_corpus(tmp_path_factory)
    data = k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.1, block_size=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    try:
        specs = [RunSpec(optimizer=k, lr=3e-3, **TINY) for k in ("adamw", "muon")]
        specs.append(RunSpec(optimizer="muonclip", lr=3e-3, tau=0.05, label="clipped", **TINY))
        yield run_sweep(specs, cache=False, data=data, progress=False)
    finally:
        torch.set_num_threads(threads)


def same_values(a, b) -> bool:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return x.shape == y.shape and bool(((x == y) | (np.isnan(x) & np.isnan(y))).all())


def test_record_round_trip(runs, tmp_path):
    table = summarize(runs)
    assert table["clip_steps"].iloc[2] > 0  # the muonclip run clipped: its clip columns are numbers
    path = write_record(tmp_path / "sub" / "rec.json", runs, summary=table, command="pytest", note="tiny")
    assert [p.name for p in path.parent.iterdir()] == ["rec.json"]  # written atomically, nothing left over
    meta, back, summary = read_record(path)
    assert meta["format"] == RECORD_FORMAT and meta["command"] == "pytest" and meta["note"] == "tiny"
    assert meta["machine"]["torch"] == torch.__version__ and meta["training_code"] == training_code_digest()
    assert [r.spec for r in back] == [r.spec for r in runs]
    assert [r.name for r in back] == ["adamw lr=0.003", "muon lr=0.003", "clipped"]  # labels kept
    assert all(r.from_cache and r.state is None and r.loads is None for r in back)  # no weights, no loads
    # the summary table comes back as it went in: same columns, same values, NaN where it had NaN
    assert list(summary.columns) == list(table.columns)
    for c in table.columns:
        if pd.api.types.is_numeric_dtype(table[c]):  # (bool included)
            assert same_values(summary[c], table[c]), c
        else:
            assert summary[c].tolist() == table[c].tolist(), c
    # short histories are kept whole (the record's columns only); the summaries of them agree
    for r, b in zip(runs, back):
        assert 0 < len(b.history.columns) < len(r.history.columns)
        for c in b.history.columns:
            assert same_values(b.history[c], r.history[c]), c
        assert b.diverged == r.diverged and b.total_heads == r.total_heads and b.cpu_s == r.cpu_s
    again = summarize(back)
    for c in ("peak_max_logit", "final_val_loss", "final_train_loss", "last_clip_step", "worst_post_clip_over_tau"):
        assert same_values(again[c], table[c]), c


def test_record_without_summary_and_summary_of_wrong_length(runs, tmp_path):
    path = write_record(tmp_path / "rec.json", runs[:2])
    meta, back, summary = read_record(path)
    assert len(back) == 2 and summary.empty and meta["command"]  # the command line by default
    with pytest.raises(ValueError, match="2 rows for 3 runs"):
        write_record(tmp_path / "bad.json", runs, summary=summarize(runs[:2]))
    assert not (tmp_path / "bad.json").exists()


def test_long_history_is_thinned_in_the_record(runs, tmp_path):
    r = runs[0]
    n = 1000
    h = pd.DataFrame({"step": np.arange(n), "tokens": np.arange(1, n + 1) * 32, "lr": 3e-3,
                      "train_loss": np.linspace(3, 1, n), "val_loss": np.nan, "max_logit": 1.0})  # fmt: skip
    h.loc[499::500, "val_loss"] = [2.0, 1.5]
    h.loc[123, "max_logit"] = 40.0
    long = RunResult(spec=r.spec.replace(steps=n), history=h, diverged=False, stop_reason="completed",
                     total_heads=r.total_heads, wall_s=1.0)  # fmt: skip
    path = write_record(tmp_path / "rec.json", [long], max_points=50)
    (back,) = read_record(path)[1]
    assert len(back.history) == 50 and back.peak_max_logit() == 40.0 and back.final_val_loss() == 1.5
    assert back.history["step"].iloc[-1] == n - 1 and back.history["tokens"].iloc[-1] == n * 32


def test_record_of_another_format_is_refused(runs, tmp_path):
    path = write_record(tmp_path / "old.json", runs[:1])
    record = json.loads(path.read_text())
    record["format"] = 1
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"old\.json.*format 1"):
        read_record(path)
    del record["format"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"old\.json.*format None"):
        read_record(path)


def test_thin_history_keeps_peaks_and_evaluations():
    n = 1000
    ml = np.ones(n)
    ml[337] = 50.0
    post = np.full(n, np.nan)
    post[[5, 600]] = [3.0, 7.0]
    val = np.full(n, np.nan)
    val[99::100] = np.arange(10, dtype=float)
    frac = np.minimum(np.arange(n) / 500, 1.0)
    h = pd.DataFrame({"step": np.arange(n), "tokens": (np.arange(n) + 1) * 8, "train_loss": np.linspace(3, 1, n),
                      "val_loss": val, "max_logit": ml, "post_clip_max_logit": post,
                      "qk_clip/frac_heads_ever_clipped": frac})  # fmt: skip
    t = thin_history(h, max_points=100)
    assert len(t) == 100 and list(t.columns) == list(h.columns)
    assert t["max_logit"].max() == 50.0 and t["max_logit"].min() == 1.0  # the spike survives, not smeared
    assert t["post_clip_max_logit"].max() == 7.0 and t["post_clip_max_logit"].notna().sum() == 2
    assert t["val_loss"].dropna().tolist() == list(range(10))  # every evaluation
    assert t["step"].iloc[-1] == n - 1 and t["tokens"].iloc[-1] == n * 8  # chunks end on their last step
    assert t["qk_clip/frac_heads_ever_clipped"].iloc[-1] == 1.0 and t["qk_clip/frac_heads_ever_clipped"].is_monotonic_increasing
    assert t["train_loss"].mean() == pytest.approx(h["train_loss"].mean())  # chunk means
    # at most max_points rows for any length; short histories unchanged; columns chosen
    assert len(thin_history(h.iloc[:999], max_points=100)) <= 100
    assert thin_history(h, max_points=5000).equals(h)
    assert list(thin_history(h, 10, columns=["step", "val_loss", "not there"]).columns) == ["step", "val_loss"]


# ----------------------------------------------------------------------------------------------
# The committed records


@pytest.mark.parametrize("name, n_runs, columns", [
    ("04_muonclip_full.json", 18, {"run", "group", "optimizer", "lr", "tau", "peak_max_logit", "final_max_logit",
                                   "final_val_loss", "diverged", "frac_heads_ever_clipped", "last_clip_step"}),
    ("05_sparsity_full.json", 20, {"run", "n_experts", "sparsity", "seed", "val_loss", "train_loss", "maxvio",
                                   "maxvio_max_layer", "dead", "starved", "total_params", "active_params"}),
])  # fmt: skip
def test_committed_records_read_back(name, n_runs, columns):
    meta, runs, summary = read_record(ROOT / "data" / "runs" / name)
    assert meta["format"] == RECORD_FORMAT and meta["command"] and meta["machine"]
    assert len(runs) == n_runs and len(summary) == n_runs
    assert columns <= set(summary.columns)
    for r, row in zip(runs, summary.to_dict("records")):
        spec = r.spec
        assert isinstance(spec, RunSpec) and RunSpec.from_settings(spec.settings(), spec.label) == spec
        spec.model_config()  # a valid K2Config
        assert row["run"] == r.name  # the summary's rows are the runs', in order
        assert len(r.history) and r.history["step"].is_monotonic_increasing and r.history["step"].iloc[-1] < spec.steps
        if "optimizer" in row:
            assert (row["optimizer"], row["lr"], bool(row["diverged"])) == (spec.optimizer, spec.lr, r.diverged)
        if "n_experts" in row:
            config = spec.model_config()
            assert row["n_experts"] == config.n_routed_experts and row["sparsity"] == config.sparsity
            assert row["total_params"] == config.param_counts()["total"] and row["seed"] == spec.seed
        if not r.diverged:  # the thinned history keeps the last evaluation of the full one
            loss = row.get("final_val_loss", row.get("val_loss"))
            assert r.final_val_loss() == pytest.approx(loss, rel=1e-12)
    assert len({r.spec for r in runs}) == n_runs  # no run recorded twice


def test_committed_stability_record_keeps_peaks():
    _, runs, summary = read_record(ROOT / "data" / "runs" / "04_muonclip_full.json")
    again = summarize(runs)
    assert same_values(again["peak_max_logit"], summary["peak_max_logit"])
    assert (summary["group"] == again["group"]).all()


def test_committed_sparsity_record_compares_by_seed():
    summary = read_record(ROOT / "data" / "runs" / "05_sparsity_full.json")[2]
    out = compare(summary, "n_experts", "val_loss")
    assert list(out.index) == sorted(set(summary["n_experts"]))
    seeds = summary.groupby("n_experts")["seed"].nunique()
    assert (seeds > 1).all() and out["p"].iloc[1:].between(0, 1).all()
    assert math.isnan(out["p"].iloc[0])  # the baseline
