"""k2mini.lab.experiments: run specs and their keys, prepared batches, the runner, the run cache (weights and
loads kept, damaged entries recomputed), parallel sweeps, the MuonClip post-clip check."""

import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

import k2mini
from k2mini.checkpoint import load as load_module
from k2mini.lab import experiments as ex
from k2mini.lab.experiments import PreparedBatches, RunCache, RunSpec, build_model, run_one, run_sweep
from k2mini.lab.stability import summarize
from lab_runs import TINY, write_corpus


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = write_corpus(tmp_path_factory)
    return path


@pytest.fixture(scope="module")
def data(corpus_file):
    return k2mini.make_dataset(k2mini.load_corpus(str(corpus_file)), val_fraction=0.1, block_size=256)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: one thread is fastest, and on a busy machine several threads spin against each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_default_cache(tmp_path, monkeypatch):
    # a test that forgot cache= must not write into the checkout's data/runs/cache
    monkeypatch.setenv("K2MINI_RUN_CACHE", str(tmp_path / "default-cache"))


def same_frame(a: pd.DataFrame, b: pd.DataFrame, ignore=()) -> bool:
    """Same columns, same values (NaN equal to NaN), whatever the dtypes; `ignore`: columns left out."""
    a, b = a.drop(columns=list(ignore)), b.drop(columns=list(ignore))
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    for c in a.columns:
        x, y = a[c].to_numpy(dtype=float), b[c].to_numpy(dtype=float)
        if not ((x == y) | (np.isnan(x) & np.isnan(y))).all():
            return False
    return True


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# RunSpec


def test_spec_key_depends_on_settings_not_label():
    a = RunSpec(optimizer="muon", lr=1e-2, steps=10, config={"num_attention_heads": 2, "num_key_value_heads": 2})
    b = RunSpec(optimizer="muon", lr=1e-2, steps=10, config={"num_key_value_heads": 2, "num_attention_heads": 2},
                label="other name")
    assert a.key() == b.key() and a == b and hash(a) == hash(b)
    assert a.key() != a.replace(lr=2e-2).key()
    assert a.key() != a.replace(config={"num_attention_heads": 4}).key()
    assert a.key() != a.replace(train={"schedule": "cosine"}).key()
    assert a.key() != a.replace(corpus="python-stdlib").key()
    # tau only matters for muonclip
    assert a.key() == a.replace(tau=30.0).key() and a == a.replace(tau=30.0)
    c = a.replace(optimizer="muonclip")
    assert c.key() != c.replace(tau=30.0).key() and c != c.replace(tau=30.0)
    assert b.name == "other name" and c.name == "muonclip tau=100 lr=0.01"
    assert a.model_config().num_attention_heads == 2


def test_spec_key_includes_torch_version_and_training_code(monkeypatch):
    a = RunSpec(lr=1e-3)
    k = a.key()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert a.key() != k
    monkeypatch.undo()
    assert a.key() == k
    monkeypatch.setattr(ex, "training_code_digest", lambda: "0" * 16)
    assert a.key() != k


def test_training_sources_are_the_training_code():
    pkg = ex._PACKAGE_DIR
    names = {p.relative_to(pkg).as_posix() for p in ex.training_sources()}
    for must in ("model.py", "moe.py", "attention.py", "balance.py", "config.py", "lab/experiments.py"):
        assert must in names, must
    optim = {p.relative_to(pkg).as_posix() for p in (pkg / "optim").glob("*.py")}
    assert optim and optim <= names
    assert "lab/plots.py" not in names and "lab/stability.py" not in names and "lab/records.py" not in names
    assert not [n for n in names if n.startswith(("analysis/", "checkpoint/"))]
    assert not [n for n in names if n.startswith("lab/") and n != "lab/experiments.py"]


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A copy of the package's layout in tmp_path, so that editing files there is safe."""
    pkg = tmp_path / "k2mini"
    for rel in ("__init__.py", "model.py", "moe.py", "optim/muon.py", "lab/experiments.py", "lab/plots.py",
                "analysis/routing_stats.py", "analysis/__main__.py", "checkpoint/load.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(ex, "_PACKAGE_DIR", pkg)
    monkeypatch.setattr(ex, "__file__", str(pkg / "lab" / "experiments.py"))
    ex.training_code_digest.cache_clear()
    yield pkg
    monkeypatch.undo()
    ex.training_code_digest.cache_clear()


def test_editing_training_code_changes_the_key_other_code_keeps_it(fake_package):
    spec = RunSpec(lr=1e-3)

    def key_after(rel, text):
        (fake_package / rel).write_text(text)
        ex.training_code_digest.cache_clear()
        return spec.key()

    k = spec.key()
    for rel in ("lab/plots.py", "analysis/routing_stats.py", "analysis/__main__.py", "checkpoint/load.py"):
        assert key_after(rel, "# edited\n") == k, rel
    (fake_package / "lab" / "new_plot.py").write_text("x = 1\n")  # a new lab file
    ex.training_code_digest.cache_clear()
    assert spec.key() == k
    seen = {k}
    for rel in ("model.py", "moe.py", "optim/muon.py", "lab/experiments.py"):
        new = key_after(rel, "# edited\n")
        assert new not in seen, rel
        seen.add(new)
    (fake_package / "optim" / "clip.py").write_text("x = 1\n")  # a new training file
    ex.training_code_digest.cache_clear()
    assert spec.key() not in seen


def test_spec_nested_overrides_roundtrip():
    yarn = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale_all_dim": 1.0}
    s = RunSpec(config={"rope_scaling": yarn}, train={"grad_clip": None, "betas": [0.9, 0.95]})
    assert s.config_overrides == {"rope_scaling": yarn}
    assert s.train_settings == {"grad_clip": None, "betas": [0.9, 0.95]}
    back = RunSpec.from_settings(json.loads(json.dumps(s.settings())))
    assert back == s and back.key() == s.key() and back.train_settings == s.train_settings
    assert s.model_config().rope_scaling["mscale_all_dim"] == 1.0


def test_replace_merges_train_and_config():
    base = RunSpec(train={"balancing": "loss_free", "schedule": "cosine"}, config={"n_routed_experts": 8})
    s = base.replace(train={"balancing": "none", "warmup_steps": 5}, config={"num_hidden_layers": 3})
    assert s.train_settings == {"balancing": "none", "schedule": "cosine", "warmup_steps": 5}
    assert s.config_overrides == {"n_routed_experts": 8, "num_hidden_layers": 3}
    assert base.train_settings == {"balancing": "loss_free", "schedule": "cosine"}  # unchanged
    assert base.replace(train=()).train_settings == {}  # not a dict: replaced
    assert s.get("balancing") == "none" and s.get("n_routed_experts") == 8 and s.get("lr") == s.lr
    assert s.get("nothing", 7) == 7


def test_data_seed_none_is_the_seed():
    a = RunSpec(seed=3)
    b = RunSpec(seed=3, data_seed=3)
    assert a.batch_seed == 3 and a.settings()["data_seed"] == 3
    assert a.key() == b.key() and a == b and hash(a) == hash(b)
    assert a.replace(seed=4).batch_seed == 4  # None follows the seed
    assert b.replace(seed=4).batch_seed == 3  # an explicit data seed stays
    assert a.key() != RunSpec(seed=3, data_seed=4).key() and a != RunSpec(seed=3, data_seed=4)


def test_spec_validation():
    with pytest.raises(ValueError, match="optimizer"):
        RunSpec(optimizer="sgd")
    with pytest.raises(ValueError, match="lr"):
        RunSpec(lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        RunSpec(lr=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        RunSpec(steps=0)
    with pytest.raises(ValueError, match="seed"):
        RunSpec(seed=1.5)


@pytest.mark.parametrize("name", ["steps", "seed", "batch_size", "seq_len", "eval_every", "eval_batches"])
def test_train_may_not_set_spec_fields(name):
    with pytest.raises(ValueError, match=f"must not set.*{name}"):
        RunSpec(train={name: 1})
    with pytest.raises(ValueError, match=name):
        RunSpec().replace(train={"balancing": "none", name: 1})


# ----------------------------------------------------------------------------------------------
# Batches, models, the runner


def test_prepared_batches_equal_the_datasets(data):
    p = PreparedBatches(data, 2, 16, seed=3)
    for step in (0, 5, 0):
        x1, y1 = p.batch_for_step("train", step, 2, 16, seed=3)
        x2, y2 = data.batch_for_step("train", step, 2, 16, seed=3)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert p.batch_for_step("train", 5, 2, 16, seed=3)[0] is p.batch_for_step("train", 5, 2, 16, seed=3)[0]
    # another shape or seed falls through to the dataset
    assert torch.equal(p.batch_for_step("train", 1, 3, 16, seed=3)[0], data.batch_for_step("train", 1, 3, 16, seed=3)[0])
    assert torch.equal(p.batch_for_step("train", 1, 2, 16, seed=4)[0], data.batch_for_step("train", 1, 2, 16, seed=4)[0])
    v1 = list(p.iter_val_batches(2, 16, max_batches=2))
    v2 = list(data.iter_val_batches(2, 16, max_batches=2))
    assert len(v1) == len(v2) and all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))
    assert p.vocab_size == data.vocab_size  # delegated


def test_build_model_depends_only_on_seed():
    spec = RunSpec(**TINY, seed=1)
    torch.manual_seed(123)
    a = build_model(spec)
    torch.manual_seed(456)
    b = build_model(spec.replace(optimizer="muon", lr=1.0))
    c = build_model(spec.replace(seed=2))
    assert same_state(a.state_dict(), b.state_dict())
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_run_one_matches_plain_training(data):
    from k2mini import train
    from k2mini.optim import build_optimizer

    spec = RunSpec(optimizer="adamw", lr=3e-3, **TINY)
    r = run_one(spec, PreparedBatches(data, 2, 16, 0))
    m = build_model(spec)
    h = train(m, data, build_optimizer(m, "adamw", lr=3e-3, weight_decay=0.1), 4, batch_size=2, seq_len=16, seed=0,
              eval_every=2, eval_batches=1, progress=False)
    assert r.history["train_loss"].tolist() == h["train_loss"].tolist()
    assert r.history["max_logit"].tolist() == h["max_logit"].tolist()
    assert "load" not in r.history and r.loads.dtype == np.int64
    assert np.array_equal(r.loads, np.stack(h["load"]))
    assert r.loads.shape == (spec.steps, 1, 4)  # (steps, MoE layers, experts)
    assert same_state(r.state, m.state_dict())
    assert same_state(r.model.state_dict(), m.state_dict()) and not r.model.training
    assert not r.diverged and r.total_heads == 2 * 4 and math.isfinite(r.final_val_loss())
    assert r.cpu_s > 0 and r.wall_s > 0 and r.machine["torch"] == torch.__version__


def test_data_seed_changes_batches_not_weights(data):
    spec = RunSpec(optimizer="adamw", lr=3e-3, **{**TINY, "steps": 1})
    other_batches = spec.replace(data_seed=5)
    assert same_state(build_model(spec).state_dict(), build_model(other_batches).state_dict())
    a, b, c = run_sweep([spec, other_batches, spec.replace(seed=5, data_seed=0)], cache=False, data=data, progress=False)
    # one step from the same initial weights, on other batches: another loss
    assert a.history["train_loss"][0] != b.history["train_loss"][0]
    # the same batches, from other initial weights: another loss
    assert a.history["train_loss"][0] != c.history["train_loss"][0]


# ----------------------------------------------------------------------------------------------
# The cache


def test_cached_run_gives_back_history_loads_and_weights(data, tmp_path):
    specs = [RunSpec(optimizer=k, lr=3e-3, **TINY) for k in ("adamw", "muonclip")]
    first = run_sweep(specs, cache=tmp_path, data=data, progress=False)
    assert not any(r.from_cache for r in first)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"{s.key()}{ext}" for s in specs for ext in (".json", ".pt"))  # no temporary files
    again = run_sweep([s.replace(label="renamed") for s in specs], cache=tmp_path, data=data, progress=False)
    assert all(r.from_cache for r in again) and again[0].name == "renamed"
    for a, b in zip(first, again):
        assert b.spec == a.spec
        assert same_frame(a.history, b.history)
        assert b.history["step"].dtype == np.int64
        assert a.loads is not None and b.loads.dtype == a.loads.dtype and np.array_equal(a.loads, b.loads)
        assert same_state(a.model.state_dict(), b.model.state_dict())
        assert not b.model.training
        assert (a.diverged, a.stop_reason, a.total_heads) == (b.diverged, b.stop_reason, b.total_heads)
        assert b.cpu_s == a.cpu_s and b.machine == a.machine
    # the weights are trained ones, not a fresh initialization
    assert not same_state(again[0].model.state_dict(), build_model(specs[0]).state_dict())
    # refresh recomputes; cache=False writes nothing
    assert not any(r.from_cache for r in run_sweep(specs[:1], cache=tmp_path, data=data, refresh=True, progress=False))
    default = ex.default_cache_dir()
    run_sweep(specs[:1], cache=False, data=data, progress=False)
    assert not default.exists()


def test_cache_ignores_foreign_entries(data, tmp_path):
    spec = RunSpec(optimizer="adamw", lr=3e-3, **TINY)
    cache = RunCache(tmp_path)
    run_sweep([spec], cache=cache, data=data, progress=False)
    d = json.loads(cache.path(spec).read_text())
    d["key"] = "something else"
    cache.path(spec).write_text(json.dumps(d))
    assert cache.get(spec) is None and spec in cache
    (again,) = run_sweep([spec], cache=cache, data=data, progress=False)
    assert not again.from_cache and cache.get(spec) is not None


@pytest.mark.parametrize("damaged", [".json", ".pt"])
def test_damaged_cache_entry_is_recomputed_with_a_warning(data, tmp_path, damaged):
    spec = RunSpec(optimizer="adamw", lr=3e-3, **{**TINY, "steps": 2})
    cache = RunCache(tmp_path)
    (first,) = run_sweep([spec], cache=cache, data=data, progress=False)
    path = cache.path(spec).with_suffix(damaged)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        (second,) = run_sweep([spec], cache=cache, data=data, progress=False)
    assert not second.from_cache and same_frame(first.history, second.history, ignore=["wall_time"])
    (third,) = run_sweep([spec], cache=cache, data=data, progress=False)  # the rewritten entry is whole
    assert third.from_cache and same_state(third.model.state_dict(), first.model.state_dict())


def test_cache_missing_weights_is_recomputed(data, tmp_path):
    spec = RunSpec(optimizer="adamw", lr=3e-3, **{**TINY, "steps": 2})
    cache = RunCache(tmp_path)
    run_sweep([spec], cache=cache, data=data, progress=False)
    cache.path(spec).with_suffix(".pt").unlink()
    assert cache.get(spec) is None
    (r,) = run_sweep([spec], cache=cache, data=data, progress=False)
    assert not r.from_cache and cache.get(spec).from_cache


def test_cache_clear_removes_both_files(data, tmp_path):
    specs = [RunSpec(optimizer="adamw", lr=3e-3, **{**TINY, "steps": 2}, seed=s) for s in (0, 1)]
    cache = RunCache(tmp_path / "cache")
    run_sweep(specs, cache=cache, data=data, progress=False)
    assert len(list(cache.directory.iterdir())) == 4
    (cache.directory / "0123abcd.pt").write_bytes(b"weights of an interrupted put")  # no JSON beside it
    assert cache.clear() == 2
    assert list(cache.directory.iterdir()) == []
    assert all(s not in cache and cache.get(s) is None for s in specs)
    assert RunCache(tmp_path / "never made").clear() == 0


def test_write_json_is_atomic_and_refuses_nan(tmp_path, monkeypatch):
    import k2mini.atomic

    path = tmp_path / "x.json"
    ex.write_json(path, {"a": 1, "t": (1, 2), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"a": 1, "t": [1, 2], "n": 3}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(k2mini.atomic.os, "replace", boom)
    with pytest.raises(OSError):
        ex.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text())["a"] == 1
    assert os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(ValueError):  # NaN is not JSON: refused, not written as a bare NaN
        ex.write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text())["a"] == 1 and os.listdir(tmp_path) == ["x.json"]


# ----------------------------------------------------------------------------------------------
# Sweeps


def test_sweep_in_two_processes_equals_one(corpus_file, tmp_path):
    # jobs > 1 trains each spec on its own corpus in processes of one thread; compare on one thread here too
    specs = [RunSpec(optimizer=k, lr=3e-3, corpus=str(corpus_file), **{**TINY, "steps": 3}) for k in ("adamw", "muon")]
    assert torch.get_num_threads() == 1  # (the module's fixture)
    one = run_sweep(specs, cache=False, jobs=1, progress=False)
    two = run_sweep(specs, cache=tmp_path, jobs=2, progress=False)
    assert [r.spec for r in two] == specs and not any(r.from_cache for r in two)
    for a, b in zip(one, two):
        assert same_frame(a.history, b.history, ignore=["wall_time"])
        assert np.array_equal(a.loads, b.loads) and same_state(a.state, b.state)
    assert all(s in RunCache(tmp_path) for s in specs)  # the workers' results were cached by the parent
    with pytest.raises(ValueError, match="data=None"):
        run_sweep(specs, cache=False, jobs=2, data=object(), progress=False)


def test_a_sweep_without_data_trains_each_run_on_its_own_corpus(corpus_file, tmp_path):
    # one process: each corpus is loaded once and its runs share prepared batches; a run must still see its own
    other = tmp_path / "other.txt"
    other.write_text("".join(chr(32 + (7 * i) % 90) for i in range(12000)))
    specs = [RunSpec(optimizer="adamw", lr=3e-3 * k, corpus=str(c), **{**TINY, "steps": 3})
             for k, c in enumerate((corpus_file, other, corpus_file), 1)]
    swept = run_sweep(specs, cache=False, jobs=1, progress=False)
    for spec, r in zip(specs, swept):
        alone = run_one(spec)
        assert same_frame(r.history, alone.history, ignore=["wall_time"]) and same_state(r.state, alone.state)
    assert not same_frame(swept[0].history, swept[1].history, ignore=["wall_time"])  # the corpora do differ


def test_default_jobs_reads_the_environment_else_counts_this_process_cpus(monkeypatch):
    monkeypatch.delenv("K2MINI_JOBS", raising=False)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(load_module, "available_memory", lambda device, swap=True: None)
    assert ex.default_jobs() == usable
    monkeypatch.setattr(load_module, "available_memory", lambda device, swap=True: 64 * ex.WORKER_MEMORY * usable)
    assert ex.default_jobs() == usable
    # no more workers than the memory holds without swap, and always one
    monkeypatch.setattr(load_module, "available_memory", lambda device, swap=True: (1 + 8 * swap) * ex.WORKER_MEMORY + 5)
    assert ex.default_jobs() == 1
    monkeypatch.setattr(load_module, "available_memory", lambda device, swap=True: 0)
    assert ex.default_jobs() == 1
    monkeypatch.setenv("K2MINI_JOBS", " 3 ")
    assert ex.default_jobs() == 3  # the user's number, whatever the memory
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("K2MINI_JOBS", bad)
        with pytest.raises(ValueError, match=f"K2MINI_JOBS must be .* got '{re.escape(bad)}'"):
            ex.default_jobs()


def test_sweep_keeps_order_with_cached_and_new_runs(data, tmp_path):
    specs = [RunSpec(optimizer="adamw", lr=lr, **{**TINY, "steps": 2}) for lr in (1e-3, 2e-3, 3e-3)]
    run_sweep(specs[1:2], cache=tmp_path, data=data, progress=False)
    runs = run_sweep(specs, cache=tmp_path, data=data, progress=False)
    assert [r.spec.lr for r in runs] == [1e-3, 2e-3, 3e-3]
    assert [r.from_cache for r in runs] == [False, True, False]


# ----------------------------------------------------------------------------------------------
# MuonClip's post-clip check, diverged runs


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


def test_muonclip_that_never_clips_has_empty_post_clip_columns(data):
    r = run_one(RunSpec(optimizer="muonclip", lr=3e-3, tau=1e6, **{**TINY, "steps": 2}), data)
    assert (r.history["qk_clip/heads_clipped"] == 0).all()
    for col in ex.CLIP_COLUMNS:
        assert r.history[col].isna().all()


def test_post_clip_is_exactly_min_when_lr_is_zero(data):
    # with lr 0 and no weight decay the step changes nothing but the clip: S_after == min(S, tau). One
    # layer: in a deeper model, clipping a layer changes its attention output, so the next layer's inputs
    # and logits move too (by ~0.3% here), and only the first layer lands exactly on tau
    config = {**TINY["config"], "num_hidden_layers": 1, "first_k_dense_replace": 0}
    spec = RunSpec(optimizer="muonclip", lr=1e-12, weight_decay=0.0, tau=1e-3, **{**TINY, "steps": 2, "config": config})
    r = run_one(spec, data)
    clipped = (r.history["qk_clip/heads_clipped"] > 0).to_numpy()
    post = r.history["post_clip_max_logit_clipped"].to_numpy()
    assert clipped[0] and (np.isfinite(post) == clipped).all()  # measured after exactly the steps that clipped
    torch.testing.assert_close(torch.tensor(post[clipped]), torch.full((int(clipped.sum()),), 1e-3, dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_diverged_run_is_a_result(data, tmp_path):
    spec = RunSpec(optimizer="adamw", lr=1e6, **{**TINY, "steps": 6}, train={"grad_clip": None})
    (r,) = run_sweep([spec], cache=tmp_path, data=data, progress=False)
    s = summarize([r]).iloc[0]
    if r.diverged:  # a huge lr may also just plateau; either way the result is well-formed and cached
        assert math.isnan(s["final_val_loss"]) and r.stop_reason
    assert bool(s["diverged"]) == r.diverged
    (back,) = run_sweep([spec], cache=tmp_path, data=data, progress=False)
    assert back.from_cache and back.diverged == r.diverged and back.stop_reason == r.stop_reason
    assert same_frame(r.history, back.history)


@pytest.mark.parametrize("optimizer", ["muon", "muonclip", "adamw"])
def test_a_diverging_run_is_a_result_with_its_history_for_every_optimizer(data, optimizer):
    """train() itself now stops a run whose gradient or max logit is not finite, for every optimizer."""
    r = run_one(RunSpec(optimizer=optimizer, lr=1e6, **{**TINY, "steps": 8}), data)
    assert r.diverged and r.stop_reason.startswith("non-finite") and r.stop_reason.endswith(f"step {len(r.history) - 1}")
    assert r.history["step"].tolist() == list(range(len(r.history))) and len(r.history) < 8
