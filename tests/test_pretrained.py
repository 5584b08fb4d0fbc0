"""pretrained_mini: trains once, caches an fp8 checkpoint, loads thereafter."""

import json
import os

import pytest
import torch

import k2mini
from k2mini.lab import pretrained


@pytest.fixture
def tiny_recipe(monkeypatch, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("Now is the winter of our discontent\n" * 300)
    recipe = dict(pretrained.RECIPES["k2-micro"], corpora={str(corpus): None}, steps=3, batch_size=2, seq_len=16,
                  warmup_steps=1)
    monkeypatch.setitem(pretrained.RECIPES, "tiny", recipe)
    return tmp_path / "root"


def test_trains_once_then_loads_from_cache(tiny_recipe):
    path = k2mini.lab.pretrained_mini("tiny", root=tiny_recipe, progress=False)
    record = json.loads((path / "training.json").read_text())
    assert record["recipe"]["steps"] == 3 and record["final_val_loss"] > 0
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["fmt"] == "e4m3"  # K2's fp8 format
    stamp = os.stat(path / "training.json").st_mtime_ns
    assert k2mini.lab.pretrained_mini("tiny", root=tiny_recipe, progress=False) == path
    assert os.stat(path / "training.json").st_mtime_ns == stamp  # not retrained
    # the same weights as K2-Thinking stores them and unquantized; no temporary directories left
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + "-float32", path.name + "-int4"]
    assert pretrained.mini_path("tiny", tiny_recipe, "int4") == path.parent / (path.name + "-int4")
    int4 = json.loads((path.parent / (path.name + "-int4") / "config.json").read_text())
    assert int4["quantization_config"]["format"] == "pack-quantized"
    assert "quantization_config" not in json.loads((path.parent / (path.name + "-float32") / "config.json").read_text())
    model = k2mini.load_pretrained(path, progress=False)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_recipe_change_changes_the_cache_key(tiny_recipe, monkeypatch):
    a = pretrained.mini_path("tiny", tiny_recipe)
    monkeypatch.setitem(pretrained.RECIPES, "tiny", dict(pretrained.RECIPES["tiny"], lr=1e-3))
    assert pretrained.mini_path("tiny", tiny_recipe) != a


def test_cache_format_change_changes_the_cache_key(tiny_recipe, monkeypatch):
    a = pretrained.mini_path("tiny", tiny_recipe)
    monkeypatch.setattr(pretrained, "CACHE_FORMAT", pretrained.CACHE_FORMAT + 1)
    assert pretrained.mini_path("tiny", tiny_recipe) != a


def test_cached_config_is_what_save_pretrained_writes_today(tiny_recipe):
    # a cache written by older code must not be served: its files would differ from a fresh save
    path = k2mini.lab.pretrained_mini("tiny", root=tiny_recipe, progress=False)
    fresh = path.parent / "fresh"
    k2mini.save_pretrained(k2mini.load_pretrained(path, progress=False), fresh, fp8=True, progress=False)
    assert (path / "config.json").read_text() == (fresh / "config.json").read_text()


def test_unknown_mini():
    with pytest.raises(ValueError, match="unknown mini"):
        k2mini.lab.pretrained_mini("gpt-2")
