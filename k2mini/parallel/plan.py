"""How a training step runs over processes: the seam between k2mini.training and this package.

`train()` and `train_step()` take a plan (`parallel=`, by default `plan_of(model)`) and ask it, and only
it, about processes:

    plan.rank, plan.world                   this process, and how many share every global batch
    plan.wrap(model)                        the module the training forward runs through; backward through
                                            it leaves every rank the gradients of the global batch's loss
    plan.all_reduce(t, "sum" | "max")       a step's figures over every rank (loss and loads; max logits)
    plan.clip_grad_norm_(model, max_norm)   the whole model's gradient norm before clipping (None: no clip)
    plan.checkpoint_refusal                 why run checkpoints cannot be written, or None

`DataParallel`: every rank holds the whole model (one process, or DistributedDataParallel under
torchrun). `ExpertParallel`: the model after `shard_experts`, each rank holding other experts; DDP
averages only the replicated part (replicate.py), and the gradient norm adds every rank's experts
(clip.py). `plan_of(model)` is the plan a model is set up for: `shard_experts` leaves its groups on the
model as `model.expert_parallel` (None or absent: not sharded).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .clip import clip_grad_norm_
from .groups import ExpertParallelGroups
from .replicate import replicate

__all__ = ["ParallelPlan", "DataParallel", "ExpertParallel", "plan_of"]


class ParallelPlan(Protocol):
    rank: int
    world: int
    checkpoint_refusal: str | None

    def wrap(self, model: nn.Module) -> nn.Module: ...

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    def clip_grad_norm_(self, model: nn.Module, max_norm: float | None) -> float: ...


class DataParallel:
    """Every rank holds the whole model; gradients are averaged by DistributedDataParallel (world > 1)."""

    checkpoint_refusal: str | None = None

    def __init__(self):
        initialized = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)

    def wrap(self, model: nn.Module) -> nn.Module:
        # stacked experts: every parameter is used every step, as DDP expects
        return DistributedDataParallel(model) if self.world > 1 else model

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """t, reduced in place over every rank: "sum" or "max"."""
        if self.world > 1:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def clip_grad_norm_(self, model: nn.Module, max_norm: float | None) -> float:
        """The gradients' norm before clipping (equal on every rank after DDP's average), clipped to max_norm."""
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


class ExpertParallel(DataParallel):
    """The routed experts sharded over `groups` (shard_experts), everything else replicated."""

    checkpoint_refusal = ("checkpoints of an expert-parallel model (k2mini.parallel.shard_experts) are not supported "
                          "yet: each rank holds other experts; train without checkpoint_dir")

    def __init__(self, groups: ExpertParallelGroups):
        super().__init__()
        self.groups = groups

    def wrap(self, model: nn.Module) -> nn.Module:
        return replicate(model) if self.world > 1 else model

    def clip_grad_norm_(self, model: nn.Module, max_norm: float | None) -> float:
        """The norm of the whole model's gradient, every rank's experts included; every rank clips alike."""
        return clip_grad_norm_(model, max_norm, self.groups.group)


def plan_of(model: nn.Module) -> DataParallel:
    """ExpertParallel for a model shard_experts converted, else DataParallel."""
    groups = getattr(model, "expert_parallel", None)
    return DataParallel() if groups is None else ExpertParallel(groups)
