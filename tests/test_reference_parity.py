"""k2mini equals transformers' DeepseekV3 on the same weights: logits and greedy generations."""

import pytest
import torch

import k2mini
from k2mini import K2Config
from reference import random_hf_model

transformers = pytest.importorskip("transformers")

YARN_K2 = dict(
    rope_type="yarn", factor=32.0, original_max_position_embeddings=4096,
    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
)
YARN_DSV3 = dict(
    rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
)
# mscale_all_dim unset: no softmax-scale correction, and cos/sin scaled by yarn_mscale(factor)
YARN_ATTN_FACTOR = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=256)

BASE = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_attention_heads=3, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
    max_position_embeddings=2048, rope_theta=50000.0,
)

CASES = {
    # K2-like: q latent, one group, yarn as K2, one dense layer, normalized weights, 1 shared expert
    "k2_like": dict(BASE, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=16, n_routed_experts=12,
                    num_experts_per_tok=3, n_group=1, topk_group=1, norm_topk_prob=True, n_shared_experts=1,
                    routed_scaling_factor=2.827, rope_scaling=YARN_K2),
    # Moonlight-like: plain q_proj, no yarn, no dense layer, unnormalized weights, 2 shared experts
    "moonlight_like": dict(BASE, num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=None,
                           n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                           norm_topk_prob=False, n_shared_experts=2, routed_scaling_factor=2.446,
                           rms_norm_eps=1e-5),
    # DeepSeek-V3-like: group-limited routing (4 groups, keep 2), two dense layers, yarn as DSV3
    "dsv3_like": dict(BASE, num_hidden_layers=4, first_k_dense_replace=2, q_lora_rank=12, n_routed_experts=16,
                      num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, n_shared_experts=1,
                      routed_scaling_factor=2.5, rope_theta=10000.0, rope_scaling=YARN_DSV3),
    # groups with unnormalized weights, 2 shared experts, yarn whose factor scales cos/sin instead
    "groups_unnormalized": dict(BASE, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None,
                                n_routed_experts=12, num_experts_per_tok=2, n_group=3, topk_group=2,
                                norm_topk_prob=False, n_shared_experts=2, routed_scaling_factor=1.5,
                                rope_scaling=YARN_ATTN_FACTOR),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    config = K2Config(**CASES[request.param])
    hf_config = transformers.DeepseekV3Config(**config.to_hf())
    hf = random_hf_model(hf_config, seed=sorted(CASES).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = k2mini.load_pretrained(path, progress=False)
    return hf, ours


def test_config_round_trips_through_transformers(pair):
    hf, ours = pair
    assert K2Config.from_hf(hf.config.to_dict()) == ours.config


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert ref.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    assert (out - ref).abs().max().item() <= 1e-4


def test_routing_is_not_trivial(pair):
    """The weights route tokens to many experts, so the parity above exercises the router."""
    _, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tel = ours(ids, telemetry=True).telemetry
    assert (tel.loads > 0).sum(-1).min() >= ours.config.num_experts_per_tok + 1


def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, ours.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = ours.generate(prompt, max_new_tokens=20)
    assert ref.shape == (1, 27)
    assert torch.equal(out, ref)


def hf_gradient(hf, name: str, config) -> torch.Tensor:
    """transformers' gradient for k2mini's parameter `name` (its stacked gate_up split in two)."""
    params = dict(hf.named_parameters())
    if name.endswith("experts.gate_proj") or name.endswith("experts.up_proj"):
        grad = params[name.rsplit(".", 1)[0] + ".gate_up_proj"].grad
        half = config.moe_intermediate_size
        return grad[:, :half] if name.endswith("gate_proj") else grad[:, half:]
    return params[name].grad


def test_gradients_match_transformers(pair):
    """A training step's gradients equal the reference's for every parameter, experts included."""
    hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(4))
    for model in (hf, ours):
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    checked = 0
    for name, p in ours.named_parameters():
        ref = hf_gradient(hf, name, ours.config)
        assert ref is not None and p.grad is not None, name
        scale = ref.abs().max().item()
        assert (p.grad - ref).abs().max().item() <= 1e-4 * max(scale, 1e-3), name
        checked += scale > 0
    assert checked >= len(list(ours.parameters())) - 1  # gradients really flowed almost everywhere
    for model in (hf, ours):
        model.zero_grad(set_to_none=True)


def test_fused_attention_matches_transformers(pair, monkeypatch):
    """The fused attention path (taken from FUSED_FROM_KEYS keys on) gives the reference's logits too."""
    hf, ours = pair
    for layer in ours.model.layers:
        monkeypatch.setattr(layer.self_attn, "kernel", "fused")
    ids = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = hf(ids).logits, ours(ids).logits
    assert (out - ref).abs().max().item() <= 1e-4
