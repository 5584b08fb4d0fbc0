"""What attention costs at decode time: KV-cache size per token and multiply-adds per decoded token.

Closed-form counts from a K2Config, for comparing MLA with the attention it replaces. The other
schemes are hypothetical attention layers with the *same* query heads and head dims as the config:

    mha  every head caches its key (nope + rope dims) and its value      H * (qk_head_dim + v_head_dim)
    gqa  `kv_groups` key/value heads, each shared by H / kv_groups queries  g * (qk_head_dim + v_head_dim)
    mqa  one key/value head shared by all queries                        qk_head_dim + v_head_dim
    mla  the normed latent and the one shared rope key                   kv_lora_rank + qk_rope_head_dim

K2: 20,480 (mha), 2,560 (gqa, 8 groups), 320 (mqa) and 576 (mla) numbers per token per layer.
"""

from __future__ import annotations

import time

import torch

from ..attention import LayerCache
from ..config import K2Config
from ..model import KVCache

KV_SCHEMES = ("mha", "gqa", "mqa", "mla")


def kv_cache_numbers_per_token(config: K2Config, scheme: str = "mla", kv_groups: int | None = None) -> int:
    """Numbers one token adds to ONE layer's KV cache under `scheme` (see the module docstring)."""
    H, kv_dim = config.num_attention_heads, config.qk_head_dim + config.v_head_dim
    if scheme not in KV_SCHEMES:
        raise ValueError(f"scheme must be one of {KV_SCHEMES}, got {scheme!r}")
    if scheme == "gqa":
        if kv_groups is None or not isinstance(kv_groups, int) or kv_groups <= 0 or H % kv_groups:
            raise ValueError(f"gqa needs kv_groups, a positive divisor of num_attention_heads={H} (got {kv_groups!r})")
        return kv_groups * kv_dim
    if kv_groups is not None:
        raise ValueError(f"kv_groups only applies to scheme 'gqa', not {scheme!r}")
    if scheme == "mha":
        return H * kv_dim
    if scheme == "mqa":
        return kv_dim
    return config.kv_lora_rank + config.qk_rope_head_dim


def kv_cache_bytes(
    config: K2Config,
    scheme: str = "mla",
    context: int = 1,
    layers: int | None = None,
    bytes_per_number: int = 2,
    kv_groups: int | None = None,
) -> int:
    """Bytes of KV cache for `context` tokens over `layers` layers (default: all of them).

    bytes_per_number: 2 for bf16/fp16 (the default), 1 for an fp8 cache, 4 for float32.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    layers = config.num_hidden_layers if layers is None else layers
    return kv_cache_numbers_per_token(config, scheme, kv_groups) * context * layers * bytes_per_number


def mla_decode_macs(config: K2Config, context: int, absorbed: bool) -> int:
    """Multiply-adds of one MLA layer for ONE new token attending to `context` keys (itself included).

    Counts the matrix products of `MultiHeadLatentAttention.forward` with a latent cache (norms, rope
    and softmax are elementwise and left out):
      both forms: the query projections, kv_a_proj_with_mqa for the new token, o_proj;
      naive:      kv_b_proj re-expands all `context` cached latents to per-head keys and values,
                  then q.k over nope + rope dims and probs @ v;
      absorbed:   W_uk folded into the query (H * nope * r), q.c over r + rope dims, probs @ latent,
                  then W_uv applied once to the H attended latents.
    The naive form's context-dependent cost is H * (r * (nope + v) + nope + rope + v) per key, the
    absorbed form's H * (2 r + rope): for K2's dims the absorbed form does ~121x fewer per cached token.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1 (the new token attends to itself), got {context}")
    c = config
    H, h, r = c.num_attention_heads, c.hidden_size, c.kv_lora_rank
    nope, rope, v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    if c.q_lora_rank is None:
        q = h * H * (nope + rope)
    else:
        q = h * c.q_lora_rank + c.q_lora_rank * H * (nope + rope)
    fixed = q + h * (r + rope) + H * v * h
    S = context
    if absorbed:
        return fixed + H * nope * r + H * S * (r + rope) + H * S * r + H * r * v
    return fixed + S * r * H * (nope + v) + H * S * (nope + rope) + H * S * v


def decode_step_seconds(model, contexts, repeats: int = 3, seed: int = 0, chunk: int = 1024) -> dict[str, list[float]]:
    """Measured wall time of one decode step (batch 1) at each context length, naive and absorbed.

    A prompt of max(contexts) - 1 random tokens is prefilled once (naive form, `chunk` tokens per
    call); each measurement copies the first `context - 1` cached positions and decodes one token, so
    both forms see the same latent cache. Best of `repeats` runs, the two forms interleaved so that
    machine noise hits both alike. Returns {"naive": [seconds per context], "absorbed": [...]}.
    """
    contexts = [int(s) for s in contexts]
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive integers, got {contexts}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    g = torch.Generator().manual_seed(seed)
    n = max(contexts)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(model.device)
    full = KVCache.empty(model.config)
    out = {"naive": [], "absorbed": []}
    with torch.no_grad():
        for start in range(0, n - 1, chunk):
            model(ids[:, start : min(start + chunk, n - 1)], cache=full)
        for s in contexts:
            best = {"naive": float("inf"), "absorbed": float("inf")}
            for _ in range(repeats):
                for form in best:
                    cache = KVCache.empty(model.config)
                    if s > 1:  # views of the first s - 1 prefilled positions; `full` stays intact
                        cache.layers = [LayerCache(c.kv_latent[:, : s - 1], c.k_rope[:, : s - 1]) for c in full.layers]
                    t0 = time.perf_counter()
                    model(ids[:, s - 1 : s], cache=cache, absorbed=form == "absorbed")
                    best[form] = min(best[form], time.perf_counter() - t0)
            for form in best:
                out[form].append(best[form])
    return out
