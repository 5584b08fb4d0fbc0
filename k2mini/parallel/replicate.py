"""DistributedDataParallel over the replicated part of an expert-parallel model, through DDP's public API.

When DDP wraps a module it broadcasts rank 0's parameters and buffers to every rank, and after each
backward it averages the gradients of every parameter of the module. An expert-parallel model's routed
experts must take part in neither: each rank holds other experts, and their gradients arrive through
the all-to-all's backward (shard.py scales them). `replicate(model)` therefore wraps, not the model, but
a `Replicated` module: it holds the replicated parameters and buffers (the model's own tensors,
registered under names with "/" for ".") and its forward runs the whole model, which it keeps out of its
module tree, so DDP sees exactly what every rank holds alike. The gradients DDP averages are the model's
own `.grad`s, in the model's parameter order, bucketed as DDP would bucket them on the whole model.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .experts import ExpertParallelExperts

__all__ = ["Replicated", "replicate", "sharded_names"]


def sharded_names(model: nn.Module) -> set[str]:
    """Names of the parameters and buffers that differ per rank: those of the sharded experts."""
    return {f"{module_name}.{name}" for module_name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
            for name, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}


class Replicated(nn.Module):
    """The replicated parameters and buffers of `model` as a module whose forward is model's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = (model,)  # a tuple, so that nn.Module does not register it: DDP must not see the experts
        sharded = sharded_names(model)
        for name, p in model.named_parameters():
            if name not in sharded:
                self.register_parameter(name.replace(".", "/"), p)
        for name, b in model.named_buffers():
            if name not in sharded:
                self.register_buffer(name.replace(".", "/"), b)

    def forward(self, *args, **kwargs):
        return self._model[0](*args, **kwargs)


def replicate(model: nn.Module) -> DistributedDataParallel:
    """`model` (after shard_experts) under DDP, which averages only the gradients of what is replicated;
    call it as the model (`net(input_ids, telemetry=True)`). Collective: every rank calls it."""
    return DistributedDataParallel(Replicated(model))
