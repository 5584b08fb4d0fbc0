"""Hugging Face `config.json` <-> K2Config: which model types are read, the two rope spellings, defaults
older DeepseekV3 configs omit, and the dict transformers' DeepseekV3Config accepts.

`K2Config.from_hf` / `K2Config.to_hf` forward here; the field checks themselves are K2Config's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ..checks import check_real
from ..config import POSITIVE_INT_FIELDS, K2Config, normalize_rope_scaling

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
# the sizes no DeepseekV3 config.json leaves out: K2Config's positive integers but for the ones older
# configs may omit (routing groups default to one, the context length to K2Config's default)
REQUIRED_FIELDS = tuple(f for f in POSITIVE_INT_FIELDS if f not in ("n_group", "topk_group", "max_position_embeddings"))


def read_hf_config(config: dict | str | os.PathLike) -> tuple[dict, str]:
    """(the config dict, where it came from for error messages) from a dict, a config.json or its directory."""
    if isinstance(config, dict):
        return dict(config), "config"
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), path
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json there") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_from_hf(config: dict | str | os.PathLike, cls: type[K2Config] = K2Config) -> K2Config:
    """Build from a HF `config.json` (a dict, a path to the file, or a checkpoint directory).

    Accepts model_type "kimi_k2" and "deepseek_v3", and both the transformers-4 spelling
    (`rope_theta` + `rope_scaling`) and the transformers-5 one (`rope_parameters`).
    """
    d, where = read_hf_config(config)
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a DeepseekV3-family model "
            f"(expected one of {SUPPORTED_MODEL_TYPES})"
        )
    archs = d.get("architectures")
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"{where}: architectures {archs} not supported (expected {SUPPORTED_ARCHITECTURES})")

    rope_theta, rope_scaling = rope_from_hf(d, where)
    for r in REQUIRED_FIELDS:
        if r not in d or d[r] is None:
            raise ValueError(f"{where}: required field {r!r} is missing")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {k: d[k] for k in names if k in d and k not in ("rope_theta", "rope_scaling")}
    # DeepSeek-V3 defaults for fields older configs omit (or write as null)
    kwargs.setdefault("first_k_dense_replace", 0)
    for k, default in (("n_shared_experts", 0), ("n_group", 1), ("topk_group", 1)):
        if kwargs.get(k) is None:
            kwargs[k] = default
    if "q_lora_rank" not in d:
        kwargs["q_lora_rank"] = None
    kwargs["rope_theta"] = rope_theta
    kwargs["rope_scaling"] = rope_scaling
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    except TypeError as e:
        raise ValueError(f"{where}: a field has the wrong type ({e})") from None


def rope_from_hf(d: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in k2mini's spelling) from either transformers spelling of a config dict."""
    params = d.get("rope_parameters")
    if params and isinstance(params, dict) and "rope_theta" in params:  # transformers 5
        theta = params["rope_theta"]
        scaling = params
    else:  # transformers 4
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"{where}: rope_scaling must be a dict or null")
    try:
        scaling = normalize_rope_scaling(scaling) if scaling else None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    try:
        theta = check_real(theta, "rope_theta", low=0, low_open=True)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: K2Config.rope_theta: must be a finite number > 0 (got {theta!r})") from None
    return theta, scaling


def config_to_hf(config: K2Config) -> dict:
    """A config.json dict that transformers' DeepseekV3Config (v5) accepts."""
    d = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",  # transformers knows the family by this name
    }
    skip = {"rope_theta", "rope_scaling", "model_type", "quantization_config", "scoring_func", "topk_method"}
    for f in dataclasses.fields(config):
        if f.name not in skip:
            d[f.name] = getattr(config, f.name)
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_scaling is not None:
        rope.update(config.rope_scaling)
    d["rope_parameters"] = rope
    d["num_nextn_predict_layers"] = 0
    d["rope_interleave"] = True
    if config.quantization_config is not None:
        d["quantization_config"] = dict(config.quantization_config)
    return d
