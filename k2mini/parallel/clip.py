"""The gradient norm of an expert-parallel model: every rank holds other experts, so the norm of the
whole model's gradient adds the squared norms of the expert shards over the expert-parallel group
to those of the replicated parameters (equal on every rank after DDP's average). Clipping with it
scales every rank's gradients by the same factor, as one process would."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .replicate import sharded_names


def clip_grad_norm_(model, max_norm: float | None, group) -> float:
    """Clip the gradients of `model` (after shard_experts; `group` its expert-parallel process group) to
    `max_norm` (None: only measure); the norm before."""
    device = model.lm_head.weight.device  # NCCL reduces tensors on the GPU
    sharded = sharded_names(model)
    expert_sq = torch.zeros((), dtype=torch.float32, device=device)
    shared_sq = torch.zeros((), dtype=torch.float32, device=device)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square().to(device)
        if name in sharded:
            expert_sq += sq
        else:
            shared_sq += sq
        grads.append(p.grad)
    dist.all_reduce(expert_sq, group=group)
    norm = float((shared_sq + expert_sq).sqrt())
    if max_norm is not None:
        scale = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
        if scale < 1:
            torch._foreach_mul_(grads, scale)
    return norm
