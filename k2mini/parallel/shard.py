"""Converting a single-process K2ForCausalLM into an expert-parallel one, in place.

Why DDP, not FSDP2, for the parameters outside the experts: in a K2-shaped model nearly all weights
are routed experts (K2: 1.01T of its 1.03T), and those are already sharded, whole experts per rank, by
expert parallelism itself. What stays replicated (attention, dense layers, shared experts, router,
embeddings) is small, so sharding it with FSDP2's `fully_shard` would add an all-gather before and a
reduce-scatter after every layer to save little memory; and Muon orthogonalizes whole matrices, so a
sharded non-expert matrix would have to be gathered for its update anyway. DDP keeps every replicated
matrix whole on every rank and averages their gradients with one all-reduce, which is also what
`k2mini.train` already does under torchrun. (K2 itself used ZeRO-1, sharding optimizer state only.)

DDP wraps only the replicated part (`replicate`, replicate.py: each rank's experts differ, so they must
be neither broadcast nor averaged). The experts' gradients arrive through the all-to-all's backward
already summed over the tokens of every rank in the expert-parallel group, and a hook divides them by
the world size (DDP averages, so the loss the model is trained on is the mean of the ranks' losses) and
sums them over replica groups.
"""

from __future__ import annotations

import torch.distributed as dist

from .experts import ExpertParallelExperts
from .groups import expert_parallel_groups


def _expert_grad_hook(groups):
    def hook(grad):
        grad = grad / groups.world
        if groups.replicas is not None:
            dist.all_reduce(grad, group=groups.replicas)
        return grad

    return hook


def shard_experts(model, degree: int | None = None):
    """Shard the routed experts of every MoE layer of `model` over `degree` ranks (default: all), in place.

    Collective: every rank calls it with the same model weights (same seed or same checkpoint) and degree.
    Afterwards rank r holds experts [e0, e0 + E/degree) of each layer, whole (so Muon orthogonalizes
    them with no gather), and everything else replicated. Run it through `k2mini.parallel.replicate(model)`
    to average the replicated gradients (`k2mini.train` does, through `plan_of(model)`), never through
    `DistributedDataParallel(model)`, which would broadcast rank 0's experts to every rank and average
    experts that differ. Returns the model; `model.expert_parallel` holds the groups (ExpertParallelGroups),
    which is how `plan_of` knows the model is sharded.

    ValueError if the degree does not fit: larger than the world, not dividing it, or not dividing
    the number of routed experts; or if the model is already sharded.
    """
    if getattr(model, "expert_parallel", None) is not None:
        raise ValueError("shard_experts: this model's experts are already sharded (model.expert_parallel is set); "
                         "call shard_experts once, on a model that is not sharded")
    groups = expert_parallel_groups(model.config.n_routed_experts, degree)
    hook = _expert_grad_hook(groups)
    for layer in model.moe_layers():
        layer.mlp.experts = ExpertParallelExperts(layer.mlp.experts, groups)
        for p in layer.mlp.experts.parameters():  # gate, up and down projections of this rank's experts
            p.register_hook(hook)
    model.expert_parallel = groups
    return model
