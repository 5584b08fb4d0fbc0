"""KV-cache sizes and decode multiply-adds: K2's published numbers and torch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from k2mini import K2Config
from k2mini.attention import MultiHeadLatentAttention
from k2mini.lab.attention_costs import kv_cache_bytes, kv_cache_numbers_per_token, mla_decode_macs
from k2mini.rope import rope_cos_sin, rope_frequencies

K2 = K2Config.preset("kimi-k2")


def test_k2_numbers_per_token_per_layer():
    # docs/K2_FACTS.md section 3: 576 for MLA against 64 x (192 + 128) = 20,480 for the same heads uncompressed
    assert kv_cache_numbers_per_token(K2, "mla") == 512 + 64 == 576
    assert kv_cache_numbers_per_token(K2, "mha") == 64 * (192 + 128) == 20480
    assert kv_cache_numbers_per_token(K2, "gqa", kv_groups=8) == 8 * 320
    assert kv_cache_numbers_per_token(K2, "mqa") == 320
    # GQA spans MQA (one group) to MHA (one group per head)
    assert kv_cache_numbers_per_token(K2, "gqa", kv_groups=1) == kv_cache_numbers_per_token(K2, "mqa")
    assert kv_cache_numbers_per_token(K2, "gqa", kv_groups=64) == kv_cache_numbers_per_token(K2, "mha")


def test_bytes_scale_with_context_layers_and_dtype():
    assert kv_cache_bytes(K2, "mla") == 576 * 61 * 2
    assert kv_cache_bytes(K2, "mla", context=131072) == 576 * 61 * 2 * 131072
    assert kv_cache_bytes(K2, "mha", context=10, layers=1, bytes_per_number=1) == 204800
    assert kv_cache_bytes(K2, "gqa", context=3, kv_groups=8, bytes_per_number=4) == 2560 * 3 * 61 * 4
    assert kv_cache_bytes(K2, "mla", context=0) == 0


@pytest.mark.parametrize(
    "scheme, groups", [("gqa", None), ("gqa", 0), ("gqa", 7), ("mha", 8), ("mla", 2), ("mqa", 1), ("bogus", None)]
)
def test_bad_arguments(scheme, groups):
    with pytest.raises(ValueError):
        kv_cache_numbers_per_token(K2, scheme, kv_groups=groups)


def test_bad_context():
    with pytest.raises(ValueError):
        kv_cache_bytes(K2, "mla", context=-1)
    with pytest.raises(ValueError):
        mla_decode_macs(K2, 0, absorbed=True)


@pytest.mark.parametrize("q_lora_rank", [None, 32])
@pytest.mark.parametrize("absorbed", [False, True])
@pytest.mark.parametrize("context", [2, 9])  # at 1, einsum lowers some size-1 contractions to uncounted muls
def test_decode_macs_match_torch_flop_counter(q_lora_rank, absorbed, context):
    config = K2Config.preset("k2-micro").replace(q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(config)
    inv_freq, factor = rope_frequencies(config)
    cos, sin = rope_cos_sin(torch.arange(context), inv_freq, factor)
    x = torch.randn(1, context, config.hidden_size)
    _, _, cache = attn(x[:, :-1], cos[:-1], sin[:-1], use_cache=True)
    with FlopCounterMode(display=False) as counter:
        attn(x[:, -1:], cos[-1:], sin[-1:], cache=cache, use_cache=True, absorbed=absorbed)
    assert counter.get_total_flops() == 2 * mla_decode_macs(config, context, absorbed)


def test_absorbed_is_cheaper_per_cached_token_at_k2_dims():
    per_key = {a: mla_decode_macs(K2, 2, a) - mla_decode_macs(K2, 1, a) for a in (False, True)}
    assert per_key[True] == 64 * (2 * 512 + 64)
    assert per_key[False] == 64 * (512 * 256 + 128 + 64 + 128)
    assert round(per_key[False] / per_key[True]) == 121


def test_decode_step_seconds_shapes_and_cache_untouched():
    from k2mini import K2ForCausalLM
    from k2mini.lab.attention_costs import decode_step_seconds

    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("k2-micro")).eval()
    times = decode_step_seconds(model, [1, 5, 12], repeats=2, chunk=4)
    assert set(times) == {"naive", "absorbed"}
    assert all(len(v) == 3 and all(t > 0 for t in v) for v in times.values())
    with pytest.raises(ValueError):
        decode_step_seconds(model, [0, 4])
    with pytest.raises(ValueError):
        decode_step_seconds(model, [4], repeats=0)
