"""The config's three rooms: K2Config (config.py), the presets (presets.py), the HF conversion
(checkpoint/hf_config.py); the forwards on K2Config, and which way the imports point."""

import ast
from pathlib import Path

import pytest

import k2mini
from k2mini import K2Config
from k2mini.checkpoint.hf_config import config_from_hf, config_to_hf, rope_from_hf
from k2mini.presets import K2_QUANTIZATION_CONFIG, PRESETS, preset_kwargs, preset_names

PACKAGE = Path(k2mini.__file__).parent


def _k2mini_imports(relpath: str) -> set[str]:
    """The k2mini modules a file imports at module level (relative imports resolved), not inside functions."""
    path = PACKAGE / relpath
    package = ["k2mini", *Path(relpath).parent.parts]
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join([*base, *(node.module or "").split(".")]).rstrip("."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] == "k2mini"}


def test_import_arrows_point_down():
    assert _k2mini_imports("checks.py") == set()
    assert _k2mini_imports("presets.py") == set()
    assert _k2mini_imports("config.py") == {"k2mini.checks", "k2mini.presets"}  # not k2mini.checkpoint
    assert "k2mini.config" in _k2mini_imports("checkpoint/hf_config.py")  # the scan sees imports that exist
    assert {"k2mini.config", "k2mini.attention"} <= _k2mini_imports("model.py")


def test_preset_forwards_and_lookup():
    assert K2Config.presets() == preset_names() == sorted(PRESETS)
    for name in preset_names():
        assert K2Config.preset(name) == K2Config(**preset_kwargs(name))
    with pytest.raises(ValueError, match=r"unknown preset 'gpt-5'; choose from \['deepseek-v3'"):
        preset_kwargs("gpt-5")


def test_a_preset_config_does_not_share_its_dicts_with_the_table():
    a = K2Config.preset("kimi-k2")
    a.quantization_config["fmt"] = "e5m2"
    a.rope_scaling["factor"] = 1.0
    b = K2Config.preset("kimi-k2")
    assert b.quantization_config == K2_QUANTIZATION_CONFIG and b.quantization_config["fmt"] == "e4m3"
    assert b.rope_scaling["factor"] == 32.0
    assert PRESETS["kimi-k2"]["rope_scaling"]["factor"] == 32.0


@pytest.mark.parametrize("name", ["kimi-k2", "moonlight-16b-a3b", "deepseek-v3", "k2-micro"])
def test_hf_forwards_and_round_trip(name):
    c = K2Config.preset(name)
    assert K2Config.to_hf(c) == config_to_hf(c)
    back = config_from_hf(config_to_hf(c))
    assert K2Config.from_hf(config_to_hf(c)) == back
    assert back == c.replace(model_type="deepseek_v3")  # to_hf names the family by transformers' model_type


def test_from_hf_keeps_the_subclass_it_is_called_on():
    class Mine(K2Config):
        pass

    assert type(Mine.from_hf(K2Config.preset("k2-micro").to_hf())) is Mine


def test_rope_spellings_read_the_same():
    yarn = {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0}
    v4 = rope_from_hf({"rope_theta": 50000, "rope_scaling": {"type": "yarn", **yarn}}, "config")
    v5 = rope_from_hf({"rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, **yarn}}, "config")
    assert v4 == v5 == (50000.0, {"rope_type": "yarn", **yarn})
    assert type(v4[0]) is float
    assert rope_from_hf({}, "config") == (10000.0, None)  # transformers' default theta, no scaling
    with pytest.raises(ValueError, match=r"^cfg\.json: K2Config\.rope_theta: must be a finite number > 0 \(got True\)$"):
        rope_from_hf({"rope_theta": True}, "cfg.json")
    with pytest.raises(ValueError, match=r"^cfg\.json: rope_scaling must be a dict or null$"):
        rope_from_hf({"rope_scaling": "yarn"}, "cfg.json")
