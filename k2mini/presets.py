"""Presets: the released models' config.json values and CPU-sized minis with K2's proportions.

Plain dicts of K2Config keyword arguments, looked up by name; `K2Config.preset(name)` builds one and
`K2Config.presets()` lists the names. Nothing here imports the rest of the library.
"""

from __future__ import annotations

import copy

# Released models: values of their public config.json files (docs/K2_FACTS.md section 1).
# Kimi-K2 and DeepSeek-V3 publish fp8 weights with a scale per 128x128 block (save_pretrained(fp8=True) too).
K2_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
}
_K2 = dict(
    vocab_size=163840,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=1,
    num_attention_heads=64,
    n_routed_experts=384,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_theta=50000.0,
    rope_scaling=dict(
        rope_type="yarn",
        factor=32.0,
        original_max_position_embeddings=4096,
        beta_fast=1.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    bos_token_id=163584,
    eos_token_id=163585,
    model_type="kimi_k2",
    quantization_config=dict(K2_QUANTIZATION_CONFIG),
)

_K2_256K = {**_K2, "rope_scaling": {**_K2["rope_scaling"], "factor": 64.0}, "max_position_embeddings": 262144}

# CPU-sized minis with K2's proportions: MLA with a latent, sigmoid routing over fine-grained experts
# plus one shared expert, one dense first layer, no yarn (short contexts). Byte-level vocabulary (260).
_MINI = dict(
    vocab_size=260,
    hidden_size=256,
    intermediate_size=320,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    n_routed_experts=64,
    num_experts_per_tok=4,
    n_shared_experts=1,
    routed_scaling_factor=2.827,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    rope_theta=50000.0,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    model_type="kimi_k2",
)

PRESETS: dict[str, dict] = {
    "kimi-k2": _K2,
    # Kimi-K2-Instruct-0905 and K2.5 / K2.6 (text model): K2's sizes, yarn factor 64 over the same 4,096
    # original tokens (256K)
    "kimi-k2-instruct-0905": _K2_256K,
    "kimi-k2.5": _K2_256K,
    "moonlight-16b-a3b": dict(
        vocab_size=163840,
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        norm_topk_prob=True,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=50000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=163584,
        eos_token_id=163585,
        model_type="deepseek_v3",
    ),
    # DeepSeek-V3 written as its differences from K2, which shares its architecture (docs/K2_FACTS.md
    # section 1): twice the heads, 256 experts instead of 384 (sparsity 32, not 48), three dense layers,
    # node-limited routing (8 groups, 4 kept), another vocabulary, rope base and yarn.
    "deepseek-v3": {
        **_K2,
        "vocab_size": 129280,
        "first_k_dense_replace": 3,
        "num_attention_heads": 128,
        "n_routed_experts": 256,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "rope_scaling": {**_K2["rope_scaling"], "factor": 40.0, "beta_fast": 32.0},
        "max_position_embeddings": 163840,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "model_type": "deepseek_v3",
    },
    # sparsity 16 (64 experts, 4 active + 1 shared): the default mini for training notebooks
    "k2-mini": _MINI,
    # K2's own sparsity 48 (192 experts, 4 active) at the same active size
    "k2-mini-s48": {**_MINI, "n_routed_experts": 192},
    # the smallest useful one: unit tests and CI-scale notebooks
    "k2-micro": dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=2.827,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_theta=50000.0,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        model_type="kimi_k2",
    ),
}


def preset_kwargs(name: str) -> dict:
    """A copy of preset `name`'s K2Config keyword arguments; ValueError naming the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {preset_names()}")
    return copy.deepcopy(PRESETS[name])


def preset_names() -> list[str]:
    return sorted(PRESETS)
