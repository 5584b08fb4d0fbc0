"""Every rope type k2mini accepts (default, linear, dynamic, yarn) gives transformers' DeepseekV3 logits.

max_position_embeddings is 16 here, so the 40-token sequences and the generations run past it: the
dynamic (NTK-aware) type recomputes its base from the call's length there, as transformers does.
"""

import math

import pytest
import torch

import k2mini
from k2mini import K2Config
from k2mini.rope import dynamic_ntk_base, rope_frequencies, softmax_scale
from reference import random_hf_model

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, q_lora_rank=12, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
    max_position_embeddings=16, rope_theta=100.0,
)
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}


@pytest.fixture(scope="module", params=sorted(ROPES))
def pair(request, tmp_path_factory):
    config = K2Config(**BASE, rope_scaling=ROPES[request.param])
    hf_config = transformers.DeepseekV3Config(**config.to_hf())
    assert hf_config.rope_parameters["rope_type"] == request.param
    hf = random_hf_model(hf_config, seed=sorted(ROPES).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, k2mini.load_pretrained(path, progress=False)


def test_config_round_trips_through_transformers(pair):
    hf, ours = pair
    assert K2Config.from_hf(hf.config.to_dict()) == ours.config


@pytest.mark.parametrize("T", [12, 40])
def test_logits_match_transformers(pair, T):
    hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref, out = hf(ids).logits, ours(ids).logits
    assert ref.abs().max() > 1.0
    assert (out - ref).abs().max().item() <= 1e-4


def test_greedy_generation_past_max_position_matches_transformers(pair):
    """Prefill 7 tokens, decode 25: past position 16 each dynamic step has new frequencies."""
    hf, ours = pair
    prompt = torch.randint(0, ours.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ref.shape == (1, 32)
    for absorbed in (True, False):
        with pytest.warns(UserWarning, match="past max_position_embeddings"):  # on purpose here
            assert torch.equal(ours.generate(prompt, max_new_tokens=25, absorbed=absorbed), ref)


def test_types_differ_where_they_should():
    """The parity above is not four copies of one computation: the frequencies differ as the formulas say."""
    freqs = {k: rope_frequencies(K2Config(**BASE, rope_scaling=v), seq_len=64)[0] for k, v in ROPES.items()}
    default = freqs["default"]
    assert torch.allclose(freqs["linear"], default / 4)
    base = dynamic_ntk_base(K2Config(**BASE, rope_scaling=ROPES["dynamic"]), 64)
    assert math.isclose(base, 100.0 * (4 * 64 / 16 - 3) ** (8 / 6))
    assert freqs["dynamic"][0] == default[0] and freqs["dynamic"][-1] < default[-1] / 4  # low freqs stretched most
    assert torch.allclose(rope_frequencies(K2Config(**BASE, rope_scaling=ROPES["dynamic"]), seq_len=16)[0], default)
    assert freqs["yarn"][0] == default[0] and torch.isclose(freqs["yarn"][-1], default[-1] / 4)
    # only yarn (with mscale_all_dim) changes the softmax scale
    scales = {k: softmax_scale(K2Config(**BASE, rope_scaling=v)) for k, v in ROPES.items()}
    assert scales["default"] == scales["linear"] == scales["dynamic"] == 16**-0.5
    assert math.isclose(scales["yarn"], 16**-0.5 * (0.1 * math.log(4) + 1) ** 2)


@pytest.mark.parametrize(
    "rope,match",
    [
        ({"rope_type": "longrope", "factor": 2.0}, "not supported"),
        ({"rope_type": "linear"}, "needs a 'factor'"),
        ({"rope_type": "dynamic", "factor": 0.5}, ">= 1"),
        ({"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}, "takes only 'factor'"),
        ({"rope_type": "dynamic", "factor": "2"}, "finite number"),
    ],
)
def test_bad_rope_scaling_is_refused_by_name(rope, match):
    with pytest.raises(ValueError, match=match):
        K2Config(**BASE, rope_scaling=rope)
