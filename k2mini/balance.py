"""Expert load balancing: the auxiliary-loss-free bias rule K2 inherits from DeepSeek-V3, the
sequence-wise loss that complements it, the Switch/GShard auxiliary loss it replaced, and MaxVio,
the imbalance they are judged by.

All pure functions of the router's record (docs/K2_FACTS.md section 4).
"""

from __future__ import annotations

import torch
from einops import reduce

METHODS = ("none", "aux_loss", "loss_free", "loss_free+seq_aux")


def loss_free_update(bias: torch.Tensor, load: torch.Tensor, speed: float, variant: str = "deepseek") -> torch.Tensor:
    """New correction bias after one step's per-expert load (E,).

    deepseek:  b_i += u * sign(mean(load) - load_i)           (DeepSeek-V3)
    centered:  b_i += u * (sign(e_i) - mean(sign(e)))          (Moonlight), e_i = mean(load) - load_i
    Overloaded experts move down by exactly u, underloaded ones up; an expert at the mean stays.
    """
    load = load.to(torch.float32)
    err = load.mean() - load
    step = torch.sign(err)
    if variant == "centered":
        step = step - step.mean()
    elif variant != "deepseek":
        raise ValueError(f"variant must be 'deepseek' or 'centered', got {variant!r}")
    return bias + speed * step.to(bias.device, bias.dtype)


def _normalized(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)


def _dispatch_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(..., T, k) expert indices -> (..., E) token-slot counts, summed over T."""
    one_hot = torch.nn.functional.one_hot(indices, n_experts).to(torch.float32)  # (..., T, k, E)
    return reduce(one_hot, "... t k e -> ... e", "sum")


def sequence_aux_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over the batch's sequences.

    scores (B, T, E) sigmoid affinities, indices (B, T, K). Per sequence:
    f_i = E / (K T) * count_i,  P_i = mean_t s_{i,t} / sum_j s_{j,t},  L = alpha * sum_i f_i P_i.
    """
    B, T, E = scores.shape
    K = indices.shape[-1]
    f = _dispatch_counts(indices, E) * (E / (K * T))  # (B, E), no gradient
    P = reduce(_normalized(scores), "b t e -> b e", "mean")
    return alpha * (f * P).sum(-1).mean()


def switch_aux_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """Switch/GShard auxiliary loss over the whole batch: alpha * E * sum_i f_i P_i.

    f_i = share of the batch's token-slots sent to expert i, P_i = mean normalized affinity.
    Equals alpha when routing is perfectly uniform.
    """
    E = scores.shape[-1]
    counts = _dispatch_counts(indices.reshape(1, -1, indices.shape[-1]), E)[0]
    f = counts / counts.sum()
    P = _normalized(scores.reshape(-1, E)).mean(0)
    return alpha * E * (f * P).sum()


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio (Wang et al. 2024): (max load - mean load) / mean load, over the last dim."""
    load = load.to(torch.float32)
    mean = reduce(load, "... e -> ...", "mean")
    return (load.amax(-1) - mean) / mean.clamp_min(1e-9)
