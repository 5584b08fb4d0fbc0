"""QK-Clip (Kimi K2, Algorithm 1): cap each head's max attention logit by rescaling its q and k weights.

After an optimizer step, every head whose max pre-softmax logit ``S`` over the step's batch exceeded
``tau`` has its query and key weights scaled so that, on that batch, its max logit becomes exactly tau.
MLA's logit has two parts, and each gets the factor ``gamma = tau / S`` once:

    logit = (q_nope . k_nope + q_rope . k_rope) * scale
    q_nope rows (q_b_proj / q_proj)  *= sqrt(gamma)   |  k_nope rows (kv_b_proj)  *= sqrt(gamma)
    q_rope rows (q_b_proj / q_proj)  *= gamma         |  k_rope (kv_a_proj_with_mqa) untouched:
                                                          it is one key shared by every head
    v rows (kv_b_proj) untouched, so a head's output only changes through its attention pattern.

Every map from weights to logits here is linear in each weight, so the scaled head's logits are
``gamma`` times the old ones at every position, and ``max = gamma * S = tau``. Heads at or under tau,
and everything else in the model, are left bit-identical.

``S`` is measured on the forward pass *before* the optimizer step (it is what the model returns), and
the clip is applied *after* the step, as in K2's Algorithm 1. With gradient accumulation, pass the max
over the micro-batches (``torch.maximum``).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..checks import check_real

__all__ = ["qk_clip_", "clip_factors", "attention_modules", "check_max_logits", "check_finite_max_logits", "check_tau"]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The MLA modules of a K2 model (K2ForCausalLM or K2Model), in layer order."""
    found = [m for m in model.modules() if hasattr(m, "kv_b_proj") and hasattr(m, "num_heads")]
    if not found:
        raise ValueError(f"no MLA attention module (one with kv_b_proj and num_heads) in {type(model).__name__}")
    return found


def check_max_logits(model: nn.Module, max_logits: torch.Tensor) -> torch.Tensor:
    """max_logits as a detached float32 [layers, heads] tensor; ValueError if its shape is not the model's."""
    layers = attention_modules(model)
    expected = (len(layers), layers[0].num_heads)
    if not isinstance(max_logits, torch.Tensor):
        raise ValueError(f"max_logits must be a tensor of shape (layers, heads) = {expected}, got {type(max_logits).__name__}")
    if tuple(max_logits.shape) != expected:
        raise ValueError(
            f"max_logits must have shape (num_hidden_layers, num_attention_heads) = {expected}, got "
            f"{tuple(max_logits.shape)}; pass out.telemetry.max_logits from model(input_ids, telemetry=True)"
        )
    return max_logits.detach().to(torch.float32)


def check_finite_max_logits(S: torch.Tensor) -> torch.Tensor:
    """S itself; ValueError naming the (layer, head) entries that are inf or nan."""
    if not torch.isfinite(S).all():
        bad = (~torch.isfinite(S)).nonzero().tolist()
        raise ValueError(
            f"max_logits holds inf or nan at (layer, head) {bad}: the forward pass has already diverged "
            "and QK-Clip cannot rescale a head to a finite cap"
        )
    return S


def clip_factors(max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """gamma = tau / S where S > tau, exactly 1.0 elsewhere (a pure function)."""
    check_tau(tau)
    S = max_logits.to(torch.float32)
    return torch.where(S > tau, tau / S, torch.ones_like(S))


def check_tau(tau: float) -> None:
    check_real(tau, "tau", low=0, low_open=True, finite=False)  # tau = inf: never clip


def _heads_view(weight: torch.Tensor, heads: int, head_rows: int, what: str) -> torch.Tensor:
    """weight [(h d), in] as an in-place-writable view [h, d, in]."""
    if weight.shape[0] != heads * head_rows:
        raise ValueError(f"{what} has {weight.shape[0]} rows, expected heads * per-head rows = {heads} * {head_rows}")
    if not weight.is_contiguous():  # a reshape of a non-contiguous tensor would copy, losing the writes
        raise ValueError(f"{what} must be contiguous to be rescaled in place")
    return rearrange(weight, "(h d) i -> h d i", h=heads)


def _scale_rows_(rows: torch.Tensor, factor: torch.Tensor) -> None:
    """rows [h, d, in] *= factor[h], in float32 for low-precision weights (x * 1.0 is exact either way)."""
    factor = factor.to(rows.device)[:, None, None]
    if rows.dtype in (torch.float32, torch.float64):
        rows.mul_(factor.to(rows.dtype))
    else:
        rows.copy_(rows.float() * factor)


@torch.no_grad()
def qk_clip_(model: nn.Module, max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Rescale, in place, the q/k weights of every head whose max logit exceeded tau.

    Args:
        model: a K2 model (its MLA modules are found by attribute, in layer order).
        max_logits: [num_hidden_layers, num_attention_heads], e.g. ``out.telemetry.max_logits``.
        tau: the cap (K2: 100).

    Returns:
        gamma [layers, heads] (float32): the factor each head's logits were multiplied by, 1.0 where
        the head was left alone.
    """
    check_tau(tau)
    S = check_finite_max_logits(check_max_logits(model, max_logits))
    gamma = clip_factors(S, tau)
    layer_clipped = (S > tau).any(dim=1).tolist()  # the one host sync

    for attn, g, clipped in zip(attention_modules(model), gamma, layer_clipped):
        if not clipped:
            continue
        H, nope, rope = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
        q_proj = attn.q_proj if getattr(attn, "q_proj", None) is not None else attn.q_b_proj
        q = _heads_view(q_proj.weight, H, nope + rope, "the query projection")  # (H, nope + rope, in)
        kv = _heads_view(attn.kv_b_proj.weight, H, nope + attn.v_head_dim, "kv_b_proj")  # (H, nope + v, r)
        _scale_rows_(q[:, :nope], g.sqrt())
        _scale_rows_(q[:, nope:], g)
        _scale_rows_(kv[:, :nope], g.sqrt())
    return gamma
