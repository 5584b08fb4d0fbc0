"""Rotary position embedding as DeepSeek/K2 use it: interleaved pairs, optional context extension.

Only the `qk_rope_head_dim` slice of each query and the one shared rope key are rotated (MLA's
"decoupled" rope). `config.rope_scaling` picks how the frequencies theta_i = base^(-2i/d) are
stretched for contexts longer than the trained one, as transformers' `modeling_rope_utils` computes
them (so that logits match the reference):

    default   theta_i                                    no extension
    linear    theta_i / s                                position interpolation: positions squeezed s x
    dynamic   theta_i(base')  base' = base (s L/L0 - (s-1))^(d/(d-2)) for L > L0, else base
                                                         NTK-aware: low frequencies stretched most,
                                                         recomputed from the current length L
    yarn      per-dimension blend of theta_i and theta_i / s by wavelength, plus an attention factor

(s = factor, L0 = max_position_embeddings.) Only `dynamic` depends on the sequence length: its
frequencies are a function of the length of the current call (`seq_len` = last position + 1).
transformers' rotary module also keeps state: after a call past L0 it keeps that grown base for later
shorter calls until one is shorter than L0. k2mini keeps none (a forward depends on its inputs only),
so the two agree on a fresh model and through a generation (whose length only grows), and differ on
a call that follows a longer one when both are past L0.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from .config import K2Config


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_type(config: K2Config) -> str:
    """"default", "linear", "dynamic" or "yarn"."""
    return "default" if config.rope_scaling is None else config.rope_scaling["rope_type"]


def dynamic_ntk_base(config: K2Config, seq_len: int) -> float:
    """NTK-aware base at sequence length `seq_len`: rope_theta up to max_position_embeddings, then
    rope_theta * (s L / L0 - (s - 1))^(d / (d - 2)), which keeps the highest frequency and stretches
    the lowest by about s L / L0 (transformers' `_compute_dynamic_ntk_parameters`)."""
    dim, L0 = config.qk_rope_head_dim, config.max_position_embeddings
    factor, L = config.rope_scaling["factor"], max(int(seq_len), L0)
    return config.rope_theta * ((factor * L / L0) - (factor - 1)) ** (dim / (dim - 2))


def rope_frequencies(config: K2Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim / 2] and the cos/sin attention factor.

    seq_len: the length of the current call (last position + 1); only the `dynamic` type reads it
    (None: max_position_embeddings, i.e. the unscaled frequencies).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    kind = rope_type(config)
    if kind == "dynamic":
        base = dynamic_ntk_base(config, config.max_position_embeddings if seq_len is None else seq_len)
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = base**exponents
    if kind in ("default", "dynamic"):
        return 1.0 / pos_freqs, 1.0
    rs = config.rope_scaling
    if kind == "linear":
        return 1.0 / pos_freqs / rs["factor"], 1.0

    factor = rs["factor"]
    original = rs["original_max_position_embeddings"]
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the rope dimension whose wavelength fits `rotations` times into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (fast dims), 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def softmax_scale(config: K2Config) -> float:
    """(nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (K2: 0.130861)."""
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling  # only yarn has an mscale_all_dim (linear and dynamic take a factor only)
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, rope_dim / 2] for integer positions [T]."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the last dim by the angles of position t.

    x: [..., T, rope_dim]; cos, sin: [T, rope_dim / 2]. The output keeps the interleaved layout.
    """
    pairs = rearrange(x, "... (d two) -> ... d two", two=2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)")
