"""Converting a single-process K2ForCausalLM into an expert-parallel one, in place.

Why DDP, not FSDP2, for the parameters outside the experts: in a K2-shaped model nearly all weights
are routed experts (K2: 1.01T of its 1.03T), and those are already sharded, whole experts per rank, by
expert parallelism itself. What stays replicated (attention, dense layers, shared experts, router,
embeddings) is small, so sharding it with FSDP2's `fully_shard` would add an all-gather before and a
reduce-scatter after every layer to save little memory; and Muon orthogonalizes whole matrices, so a
sharded non-expert matrix would have to be gathered for its update anyway. DDP keeps every replicated
matrix whole on every rank and averages their gradients with one all-reduce, which is also what
`k2mini.train` already does under torchrun. (K2 itself used ZeRO-1, sharding optimizer state only.)

The expert parameters are excluded from DDP's all-reduce (each rank's experts differ); their gradients
arrive through the all-to-all's backward already summed over the tokens of every rank in the
expert-parallel group, and a hook divides them by the world size (DDP averages, so the loss the
model is trained on is the mean of the ranks' losses) and sums them over replica groups.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .experts import ExpertParallelExperts
from .groups import expert_parallel_groups

EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


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
    them with no gather), and everything else replicated. Wrap the model in DistributedDataParallel
    (`k2mini.train` does) to average the replicated gradients; the expert parameters are registered as
    ignored by DDP (through its `_set_params_and_buffers_to_ignore_for_model`, which `DistributedDataParallel`
    reads when it wraps the model). Returns the model; `model.expert_parallel` holds the groups.

    ValueError if the degree does not fit: larger than the world, not dividing it, or not dividing
    the number of routed experts; or if the model is already sharded.
    """
    if getattr(model, "expert_parallel", None) is not None:
        raise ValueError("shard_experts: this model's experts are already sharded (model.expert_parallel is set); "
                         "call shard_experts once, on a model that is not sharded")
    groups = expert_parallel_groups(model.config.n_routed_experts, degree)
    ignored, hook = [], _expert_grad_hook(groups)
    for layer in model.moe_layers():
        layer.mlp.experts = ExpertParallelExperts(layer.mlp.experts, groups)
        for name in EXPERT_PARAMS:
            getattr(layer.mlp.experts, name).register_hook(hook)
            ignored.append(f"model.layers.{layer.index}.mlp.experts.{name}")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    model.expert_parallel = groups
    return model
