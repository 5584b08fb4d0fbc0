"""Multi-head latent attention (MLA), in its naive and its absorbed form, and a fused fast path.

Keys and values of all heads are decompressed from one small latent per token,
`kv_latent = kv_a_layernorm(kv_a_proj(x)[:kv_lora_rank])`, plus one rope key `k_rope` shared by
every head. Decoding only needs to cache those two (K2: 512 + 64 numbers per token per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from .config import K2Config
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale


@dataclass
class LayerCache:
    """What MLA caches for one layer: the normed latent and the rotated shared rope key."""

    kv_latent: torch.Tensor  # (B, S, kv_lora_rank)
    k_rope: torch.Tensor  # (B, S, qk_rope_head_dim)


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """Boolean [t_q, t_k], True where query i (at position t_k - t_q + i) may see key j."""
    offset = t_k - t_q
    q = torch.arange(t_q, device=device)[:, None] + offset
    k = torch.arange(t_k, device=device)[None, :]
    return k <= q


def mla_logits(q_nope, q_rope, k_nope, k_rope, scale: float) -> torch.Tensor:
    """Pre-softmax logits (B, H, T, S): per-head content part plus the shared rope part."""
    content = einsum(q_nope, k_nope, "b h t d, b h s d -> b h t s")
    position = einsum(q_rope, k_rope, "b h t r, b s r -> b h t s")
    return (content + position) * scale


def absorbed_logits(q_nope, q_rope, kv_latent, k_rope, w_uk, scale: float) -> torch.Tensor:
    """The same logits without decompressing keys: q_nope . (W_uk c) = (W_uk^T q_nope) . c."""
    q_latent = einsum(q_nope, w_uk, "b h t d, h d r -> b h t r")
    content = einsum(q_latent, kv_latent, "b h t r, b s r -> b h t s")
    position = einsum(q_rope, k_rope, "b h t r, b s r -> b h t s")
    return (content + position) * scale


def causal_max_logit(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = 256) -> torch.Tensor:
    """Per-head max of scale * q.k over the causal pairs, (H,), exact, without the (T, S) matrix.

    q: (B, H, T, D), the last T of the S positions of k: (B, H, S, D). Query blocks of `block` rows
    meet only the keys they may see, so the cost is half a QK^T product and the memory one block.
    """
    T, S = q.shape[2], k.shape[2]
    offset = S - T
    best = []
    with torch.no_grad():
        for start in range(0, T, block):
            stop = min(start + block, T)
            logits = einsum(q[:, :, start:stop], k[:, :, : offset + stop], "b h t d, b h s d -> b h t s")
            mask = causal_mask(stop - start, offset + stop, device=q.device)
            best.append(logits.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3)))
    return torch.stack(best).amax(0) * scale


def fused_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(scale q k^T + causal mask) v through torch's fused kernel, (B, H, T, Dv).

    The same function as mla_logits + masked_softmax + the product with v. The CPU flash kernel
    wants one head dim for q, k and v, so v (MLA: 128 wide against 192 for q.k) is padded with
    zero columns and the padding sliced off again.
    """
    T, S, dv = q.shape[2], k.shape[2], v.shape[-1]
    pad = q.shape[-1] - dv
    if pad > 0:
        v = F.pad(v, (0, pad))
    if T == S:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:  # queries continue a cache: they are the last T positions
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, device=q.device), scale=scale)
    return out[..., :dv]


# Below this many keys the materialized softmax is as fast as the fused kernel on CPU, and it gives the
# max logit for free (benchmarks/bench_train_step.py measures the crossover).
FUSED_FROM_KEYS = 512


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over keys in float32 under a causal mask; also the per-head max logit (H,)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    max_logit = logits.detach().amax(dim=(0, 2, 3))
    return F.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype), max_logit


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank, self.q_lora_rank = c.v_head_dim, c.kv_lora_rank, c.q_lora_rank
        self.scale = softmax_scale(c)
        # "auto": torch's fused kernel from FUSED_FROM_KEYS keys on, else the materialized form;
        # "fused" / "materialized" force one (tests hold the two equal)
        self.kernel = "auto"
        H, qk = c.num_attention_heads, c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def queries(self, x, cos, sin):
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = rearrange(q, "b t (h d) -> b h t d", h=self.num_heads)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latent(self, x, cos, sin):
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(kv_latent), apply_rope(k_rope, cos, sin)  # (B, T, r), (B, T, rope)

    def up_weights(self):
        """kv_b_proj split per head into W_uk (H, nope, r) and W_uv (H, v, r)."""
        w = rearrange(self.kv_b_proj.weight, "(h d) r -> h d r", h=self.num_heads)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def uses_fused_kernel(self, n_keys: int) -> bool:
        if self.kernel not in ("auto", "fused", "materialized"):
            raise ValueError(f"attention kernel must be 'auto', 'fused' or 'materialized', got {self.kernel!r}")
        return self.kernel == "fused" or (self.kernel == "auto" and n_keys >= FUSED_FROM_KEYS)

    def forward(self, x, cos, sin, cache: LayerCache | None = None, use_cache: bool = False, absorbed: bool = False):
        """x: (B, T, hidden). Returns (output, max_logit per head (H,), the extended cache or None).

        With use_cache, keys come from `cache` (earlier positions) plus this call's tokens."""
        q_nope, q_rope = self.queries(x, cos, sin)  # (B, H, T, nope), (B, H, T, rope)
        kv_latent, k_rope = self.latent(x, cos, sin)
        if cache is not None:
            kv_latent = torch.cat([cache.kv_latent, kv_latent], dim=1)
            k_rope = torch.cat([cache.k_rope, k_rope], dim=1)
        cache = LayerCache(kv_latent, k_rope) if use_cache else None
        mask = causal_mask(x.shape[1], kv_latent.shape[1], device=x.device)
        w_uk, w_uv = self.up_weights()
        if absorbed:
            # Absorbed form: fold W_uk into the query and W_uv into the output; attention runs over
            # the cached latent directly. Same function as the naive form, just re-associated products.
            logits = absorbed_logits(q_nope, q_rope, kv_latent, k_rope, w_uk, self.scale)
            probs, max_logit = masked_softmax(logits, mask)
            out_latent = einsum(probs, kv_latent, "b h t s, b s r -> b h t r")
            out = einsum(out_latent, w_uv, "b h t r, h v r -> b t h v")
        else:
            kv = rearrange(self.kv_b_proj(kv_latent), "b s (h d) -> b h s d", h=self.num_heads)
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            if self.uses_fused_kernel(kv_latent.shape[1]):
                # the naive form's logits as one product: each head's key is its content part beside
                # the one shared rope key
                q = torch.cat([q_nope, q_rope], dim=-1)
                k = torch.cat([k_nope, repeat(k_rope, "b s r -> b h s r", h=self.num_heads)], dim=-1)
                out = rearrange(fused_attention(q, k, v, self.scale), "b h t v -> b t h v")
                max_logit = causal_max_logit(q, k, self.scale)
            else:
                logits = mla_logits(q_nope, q_rope, k_nope, k_rope, self.scale)  # (B, H, T, S)
                probs, max_logit = masked_softmax(logits, mask)
                out = einsum(probs, v, "b h t s, b h s v -> b t h v")
        return self.o_proj(rearrange(out, "b t h v -> b t (h v)")), max_logit, cache
