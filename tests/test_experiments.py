"""Sweep runner and run cache: keys, atomic cache files, prepared batches, the MuonClip post-clip check."""

import json
import math
import os

import pytest
import torch

import k2mini
from k2mini.lab import experiments as ex
from k2mini.lab.experiments import PreparedBatches, RunCache, RunSpec, read_record, run_one, run_sweep, summarize, write_record

TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3

TINY = dict(batch_size=2, seq_len=16, steps=4, eval_every=2, eval_batches=1,
            config={"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 4})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return k2mini.make_dataset(k2mini.load_corpus(str(path)), val_fraction=0.1, block_size=256)


def test_spec_key_depends_on_settings_not_label():
    a = RunSpec(optimizer="muon", lr=1e-2, steps=10, config={"num_attention_heads": 2, "num_key_value_heads": 2})
    b = RunSpec(optimizer="muon", lr=1e-2, steps=10, config={"num_key_value_heads": 2, "num_attention_heads": 2},
                label="other name")
    assert a.key() == b.key() and a == b and hash(a) == hash(b)
    assert a.key() != a.replace(lr=2e-2).key()
    assert a.key() != a.replace(config={"num_attention_heads": 4}).key()
    assert a.key() != a.replace(train={"schedule": "cosine"}).key()
    # tau only matters for muonclip
    assert a.key() == a.replace(tau=30.0).key()
    c = a.replace(optimizer="muonclip")
    assert c.key() != c.replace(tau=30.0).key()
    assert b.name == "other name" and c.name == "muonclip tau=100 lr=0.01"
    assert a.model_config().num_attention_heads == 2


def test_spec_key_includes_library_version_and_digest(monkeypatch):
    a = RunSpec(lr=1e-3)
    k = a.key()
    monkeypatch.setattr(ex, "_library_version", lambda: "9.9.9")
    assert a.key() != k
    monkeypatch.undo()
    ex.library_digest.cache_clear()
    monkeypatch.setattr(ex, "library_digest", lambda: "0" * 16)
    assert a.key() != k


def test_spec_nested_overrides_roundtrip():
    yarn = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale_all_dim": 1.0}
    s = RunSpec(config={"rope_scaling": yarn}, train={"grad_clip": None})
    assert s.config_overrides == {"rope_scaling": yarn}
    assert s.train_settings == {"grad_clip": None}
    back = RunSpec(**{**s.settings(), "tau": 100.0})
    assert back == s and back.key() == s.key()
    assert s.model_config().rope_scaling["mscale_all_dim"] == 1.0


def test_spec_validation():
    with pytest.raises(ValueError, match="optimizer"):
        RunSpec(optimizer="sgd")
    with pytest.raises(ValueError, match="lr"):
        RunSpec(lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        RunSpec(steps=0)


def test_prepared_batches_equal_the_datasets(data):
    p = PreparedBatches(data, 2, 16, seed=3)
    for step in (0, 5, 0):
        x1, y1 = p.batch_for_step("train", step, 2, 16, seed=3)
        x2, y2 = data.batch_for_step("train", step, 2, 16, seed=3)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert p.batch_for_step("train", 5, 2, 16, seed=3)[0] is p.batch_for_step("train", 5, 2, 16, seed=3)[0]
    # another shape or seed falls through to the dataset
    assert torch.equal(p.batch_for_step("train", 1, 3, 16, seed=3)[0], data.batch_for_step("train", 1, 3, 16, seed=3)[0])
    v1 = list(p.iter_val_batches(2, 16, max_batches=2))
    v2 = list(data.iter_val_batches(2, 16, max_batches=2))
    assert len(v1) == len(v2) and all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))
    assert p.vocab_size == data.vocab_size  # delegated


def test_run_one_matches_plain_training(data):
    from k2mini.optim import build_optimizer
    from k2mini.train import train

    spec = RunSpec(optimizer="adamw", lr=3e-3, **TINY)
    r = run_one(spec, PreparedBatches(data, 2, 16, 0))
    torch.manual_seed(spec.seed)
    m = k2mini.K2ForCausalLM(spec.model_config())
    h = train(m, data, build_optimizer(m, "adamw", lr=3e-3, weight_decay=0.1), 4, batch_size=2, seq_len=16, seed=0,
              eval_every=2, eval_batches=1, progress=False)
    assert r.history["train_loss"].tolist() == h["train_loss"].tolist()
    assert r.history["max_logit"].tolist() == h["max_logit"].tolist()
    assert not r.diverged and r.total_heads == 2 * 4 and math.isfinite(r.final_val_loss())


def test_cache_roundtrip_and_reuse(data, tmp_path):
    specs = [RunSpec(optimizer=k, lr=3e-3, **TINY) for k in ("adamw", "muonclip")]
    first = run_sweep(specs, cache=tmp_path, data=data)
    assert not any(r.from_cache for r in first)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"{s.key()}.json" for s in specs)  # no temporary files left behind
    again = run_sweep([s.replace(label="renamed") for s in specs], cache=tmp_path, data=data)
    assert all(r.from_cache for r in again) and again[0].name == "renamed"
    for a, b in zip(first, again):
        cols = [c for c in a.history.columns if c != "load"]
        assert list(b.history.columns) == cols
        for c in cols:
            x, y = a.history[c].to_numpy(dtype=float), b.history[c].to_numpy(dtype=float)
            assert ((x == y) | (torch.isnan(torch.tensor(x)) & torch.isnan(torch.tensor(y))).numpy()).all(), c
        assert a.diverged == b.diverged and a.total_heads == b.total_heads
    # refresh recomputes; cache=False writes nothing
    assert not any(r.from_cache for r in run_sweep(specs[:1], cache=tmp_path, data=data, refresh=True))
    other = tmp_path / "none"
    run_sweep(specs[:1], cache=False, data=data)
    assert not other.exists()


def test_cache_ignores_corrupt_and_foreign_entries(data, tmp_path):
    spec = RunSpec(optimizer="adamw", lr=3e-3, **TINY)
    cache = RunCache(tmp_path)
    cache.path(spec).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get(spec) is None
    cache.path(spec).write_text(json.dumps({"key": "something else"}))
    assert cache.get(spec) is None and spec in cache


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    ex._write_json_atomic(path, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex.os, "replace", boom)
    with pytest.raises(OSError):
        ex._write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(ValueError):  # NaN is not JSON: refused, not written as a bare NaN
        monkeypatch.undo()
        ex._write_json_atomic(path, {"a": float("nan")})


def test_muonclip_post_clip_logits_are_capped(data):
    # a tau far below the initial logits forces clips on every step
    spec = RunSpec(optimizer="muonclip", lr=3e-3, tau=1e-3, **TINY)
    r = run_one(spec, data)
    h = r.history
    assert (h["qk_clip/heads_clipped"] > 0).all()
    assert h["max_logit"].iloc[0] > 10 * spec.tau
    # after each clipped step, the same batch's max logit over the clipped heads is recorded; it is not
    # exactly min(S, tau), because the optimizer step moved the weights before the clip (at this absurd
    # tau the step is as large as the logits themselves), but it is far below the unclipped logit
    assert h["post_clip_max_logit_clipped"].notna().all()
    assert h["post_clip_max_logit_clipped"].iloc[0] < 0.1 * h["max_logit"].iloc[0]
    s = summarize([r]).iloc[0]
    assert s["clip_steps"] == len(h) and s["last_clip_step"] == spec.steps - 1
    assert s["frac_heads_ever_clipped"] > 0


def test_post_clip_is_exactly_min_when_lr_is_zero(data):
    # with lr 0 and no weight decay the step changes nothing but the clip: S_after == min(S, tau)
    spec = RunSpec(optimizer="muonclip", lr=1e-12, weight_decay=0.0, tau=1e-3, **{**TINY, "steps": 2})
    r = run_one(spec, data)
    post = r.history["post_clip_max_logit_clipped"]
    assert post.notna().all()
    torch.testing.assert_close(torch.tensor(post.to_numpy()), torch.full((2,), 1e-3, dtype=torch.float64), rtol=1e-4, atol=0)


def test_summary_and_record_roundtrip(data, tmp_path):
    specs = [RunSpec(optimizer=k, lr=3e-3, **TINY) for k in ("adamw", "muon", "muonclip")]
    runs = run_sweep(specs, cache=False, data=data)
    table = summarize(runs)
    assert list(table["optimizer"]) == ["adamw", "muon", "muonclip"]
    assert {"peak_max_logit", "final_val_loss", "diverged"} <= set(table.columns)
    assert table["peak_max_logit"].notna().all() and not table["diverged"].any()
    path = write_record(tmp_path / "rec.json", runs, command="pytest", note="tiny")
    meta, back = read_record(path)
    assert meta["command"] == "pytest" and meta["machine"]["torch"] == torch.__version__
    assert [r.spec for r in back] == specs
    t2 = meta["summary"]
    assert t2["final_val_loss"].round(6).tolist() == table["final_val_loss"].round(6).tolist()
    assert t2["peak_max_logit"].round(6).tolist() == table["peak_max_logit"].round(6).tolist()
    assert summarize(back)["final_val_loss"].round(6).tolist() == table["final_val_loss"].round(6).tolist()
    assert path.stat().st_size < 200_000


def test_diverged_run_is_a_result(data):
    spec = RunSpec(optimizer="adamw", lr=1e6, **{**TINY, "steps": 6}, train={"grad_clip": None})
    r = run_one(spec, data)
    s = summarize([r]).iloc[0]
    if r.diverged:  # a huge lr may also just plateau; either way the summary is well-formed
        assert math.isnan(s["final_val_loss"])
    assert isinstance(bool(s["diverged"]), bool)


def test_thin_history_keeps_peaks_and_evaluations():
    import numpy as np
    import pandas as pd

    n = 1000
    ml = np.ones(n)
    ml[337] = 50.0
    val = np.full(n, np.nan)
    val[99::100] = np.arange(10, dtype=float)
    h = pd.DataFrame({"step": np.arange(n), "tokens": np.arange(n) * 8, "train_loss": np.linspace(3, 1, n),
                      "val_loss": val, "max_logit": ml})
    t = ex.thin_history(h, max_points=100)
    assert len(t) == 100 and t["max_logit"].max() == 50.0 and t["step"].iloc[-1] == n - 1
    assert t["val_loss"].dropna().tolist() == list(range(10))
    assert ex.thin_history(h, max_points=5000).equals(h)


def test_best_runs_picks_lowest_finished_val_loss(data):
    specs = [RunSpec(optimizer="adamw", lr=lr, **TINY) for lr in (1e-3, 1e-2)]
    specs.append(RunSpec(optimizer="muonclip", lr=1e-2, **TINY))
    runs = run_sweep(specs, cache=False, data=data)
    best = ex.best_runs(runs)
    assert [ex.optimizer_group(r.spec) for r in best] == ["adamw", "muonclip tau=100"]
    adam = [r for r in runs if r.spec.optimizer == "adamw"]
    assert best[0] is min(adam, key=lambda r: r.final_val_loss())
