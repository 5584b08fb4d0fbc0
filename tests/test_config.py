"""K2Config: released presets, HF config.json spellings, parameter accounting, bad input."""

import json
import math

import pytest

from k2mini import K2Config
from k2mini.rope import softmax_scale

K2_CONFIG_JSON = {  # the fields of Kimi-K2-Instruct's config.json that matter (transformers-4 spelling)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 1, "num_attention_heads": 64, "num_key_value_heads": 64,
    "n_routed_experts": 384, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.827, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "rope_theta": 50000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "bos_token_id": 163584, "eos_token_id": 163585,
}


@pytest.mark.parametrize(
    "name,total,active",
    [
        ("kimi-k2", 1_026_408_232_448, 32_861_500_928),
        ("kimi-k2-instruct-0905", 1_026_408_232_448, 32_861_500_928),
        ("kimi-k2.5", 1_026_408_232_448, 32_861_500_928),
        ("deepseek-v3", 671_026_419_200, 37_552_297_472),
    ],
)
def test_released_parameter_counts(name, total, active):
    assert K2Config.preset(name).param_counts() == {"total": total, "active": active}


def test_param_counts_equal_meta_model():
    import torch

    from k2mini import K2ForCausalLM

    for name in ("kimi-k2", "moonlight-16b-a3b", "k2-mini"):
        config = K2Config.preset(name)
        with torch.device("meta"):
            model = K2ForCausalLM(config)
        n = sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for k, b in model.named_buffers() if k.endswith("e_score_correction_bias")
        )
        assert n == config.param_counts()["total"], name


def test_k2_expert_arithmetic():
    c = K2Config.preset("kimi-k2")
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    assert expert == 44_040_192
    assert (c.num_experts_per_tok + c.n_shared_experts) * expert == 3 * c.hidden_size * c.intermediate_size
    assert c.sparsity == 48


def test_k2_softmax_scale():
    assert softmax_scale(K2Config.preset("kimi-k2")) == pytest.approx(0.130861, abs=5e-7)


def test_k25_preset_is_k2_with_yarn_factor_64():
    """K2.5 / K2.6: yarn factor 64 over K2's 4,096 original tokens = 262,144 positions; nothing else changes."""
    k2, k25 = K2Config.preset("kimi-k2").to_dict(), K2Config.preset("kimi-k2.5").to_dict()
    rs = k25.pop("rope_scaling")
    assert rs == {**k2.pop("rope_scaling"), "factor": 64.0}
    assert rs["factor"] * rs["original_max_position_embeddings"] == k25.pop("max_position_embeddings") == 262_144
    k2.pop("max_position_embeddings")
    assert k25 == k2
    assert softmax_scale(K2Config.preset("kimi-k2.5")) == pytest.approx(192**-0.5 * (0.1 * math.log(64) + 1) ** 2)


def test_from_hf_kimi_k2_json_equals_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(K2_CONFIG_JSON))
    for source in (K2_CONFIG_JSON, path, tmp_path):
        c = K2Config.from_hf(source)
        assert c.param_counts() == K2Config.preset("kimi-k2").param_counts()
        assert c.rope_scaling == K2Config.preset("kimi-k2").rope_scaling


def test_transformers5_rope_parameters_spelling():
    d = dict(K2_CONFIG_JSON, model_type="deepseek_v3")
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 50000.0}
    c = K2Config.from_hf(d)
    assert c.rope_theta == 50000.0 and c.rope_scaling["factor"] == 32.0


def test_to_hf_is_accepted_by_transformers():
    transformers = pytest.importorskip("transformers")
    for name in ("kimi-k2", "moonlight-16b-a3b", "deepseek-v3", "k2-mini"):
        c = K2Config.preset(name)
        hf = transformers.DeepseekV3Config(**c.to_hf())
        assert hf.hidden_size == c.hidden_size and hf.n_routed_experts == c.n_routed_experts
        assert K2Config.from_hf(hf.to_dict()).param_counts() == c.param_counts()


@pytest.mark.parametrize(
    "change,field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"hidden_size": None}, "hidden_size"),
        ({"n_group": 5}, "n_group"),
        ({"topk_group": 2}, "topk_group"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0, "mscale": 1.0}}, "rope_scaling"),
        ({"hidden_size": "7168"}, "hidden_size"),
    ],
)
def test_bad_config_names_the_field(change, field):
    d = dict(K2_CONFIG_JSON, **change)
    with pytest.raises(ValueError, match=field):
        K2Config.from_hf(d)


def test_missing_field_is_named():
    d = dict(K2_CONFIG_JSON)
    del d["kv_lora_rank"]
    with pytest.raises(ValueError, match="kv_lora_rank"):
        K2Config.from_hf(d)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        K2Config.preset("gpt-5")


NAN, INF = float("nan"), float("inf")
TYPED_BAD_VALUES = [  # (field, value): each used to load (and fail or give NaN later) or was silently truthy
    ("tie_word_embeddings", "false"), ("tie_word_embeddings", 0), ("tie_word_embeddings", None),
    ("norm_topk_prob", "true"), ("norm_topk_prob", 1), ("attention_bias", "no"),
    ("rms_norm_eps", "1e-6"), ("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-6), ("rms_norm_eps", NAN), ("rms_norm_eps", INF),
    ("routed_scaling_factor", "2.827"), ("routed_scaling_factor", 0), ("routed_scaling_factor", NAN),
    ("routed_scaling_factor", -INF), ("routed_scaling_factor", True),
    ("rope_theta", "50000"), ("rope_theta", NAN), ("rope_theta", INF), ("rope_theta", 0),
    ("initializer_range", -0.02), ("initializer_range", NAN), ("initializer_range", "0.02"),
    ("max_position_embeddings", 0), ("max_position_embeddings", "4096"), ("max_position_embeddings", 4096.0),
    ("n_shared_experts", True), ("n_shared_experts", 1.0), ("first_k_dense_replace", False),
    ("q_lora_rank", True), ("hidden_size", 7168.0), ("num_experts_per_tok", -8),
    ("bos_token_id", "163584"), ("eos_token_id", -1), ("eos_token_id", [163585, "x"]), ("pad_token_id", 1.5),
]


@pytest.mark.parametrize("field,value", TYPED_BAD_VALUES)
def test_config_values_are_checked_by_type_and_range_naming_the_field(field, value, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(K2_CONFIG_JSON, **{field: value})))
    with pytest.raises(ValueError, match=rf"{path}: K2Config\.{field}: must be"):
        K2Config.from_hf(path)
    with pytest.raises(ValueError, match=rf"K2Config\.{field}"):  # the dataclass itself checks the same
        K2Config(**{**K2Config.preset("k2-micro").to_dict(), field: value})


@pytest.mark.parametrize("key,value", [("factor", "32"), ("factor", 0), ("factor", NAN), ("mscale", INF),
                                       ("original_max_position_embeddings", 4096.5), ("beta_fast", "1")])
def test_yarn_values_are_checked_too(key, value):
    d = dict(K2_CONFIG_JSON, rope_scaling={**K2_CONFIG_JSON["rope_scaling"], key: value})
    with pytest.raises(ValueError, match=rf"rope_scaling.*{key}"):
        K2Config.from_hf(d)


def test_good_numbers_in_other_json_spellings_still_load():
    c = K2Config.from_hf(dict(K2_CONFIG_JSON, rope_theta=50000, routed_scaling_factor=2, eos_token_id=[1, 2],
                              pad_token_id=None, rms_norm_eps=1e-5))
    assert c.rope_theta == 50000.0 and c.routed_scaling_factor == 2 and c.eos_token_id == [1, 2]
