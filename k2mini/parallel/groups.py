"""Which rank holds which experts: expert-parallel groups of `degree` consecutive ranks.

With world = degree x replicas, ranks [0, degree) form the first expert-parallel group, [degree,
2 degree) the second, and so on; rank r holds experts [e0, e0 + E/degree) with e0 = (r mod degree) E/degree.
Ranks holding the same experts (one per group) form a replica group; their expert gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


def check_degree(n_experts: int, degree: int, world: int) -> None:
    """ValueError, in words, for an expert-parallel degree that cannot shard n_experts over world ranks."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"the expert-parallel degree must be an integer >= 1, got {degree!r}")
    if degree > world:
        raise ValueError(f"expert-parallel degree {degree} is larger than the world ({world} processes); "
                         f"launch at least {degree} processes or lower the degree")
    if world % degree:
        raise ValueError(f"expert-parallel degree {degree} does not divide the world size {world}; "
                         "each group of `degree` ranks must hold every expert once")
    if n_experts % degree:
        raise ValueError(f"{n_experts} routed experts cannot be split evenly over expert-parallel degree {degree}; "
                         f"choose a degree that divides {n_experts}")


@dataclass(frozen=True)
class ExpertParallelGroups:
    degree: int  # ranks one MoE layer's experts are spread over
    world: int
    rank: int  # in the world
    group: object  # this rank's expert-parallel process group (the all-to-alls run in it)
    replicas: object | None  # the ranks holding the same experts (None when world == degree)
    n_experts: int

    def __deepcopy__(self, memo):  # process groups are handles to shared connections: a copied model shares them
        return self

    @property
    def ep_rank(self) -> int:
        return self.rank % self.degree

    @property
    def n_local(self) -> int:
        return self.n_experts // self.degree

    @property
    def first(self) -> int:
        """This rank's first expert; it holds [first, first + n_local)."""
        return self.ep_rank * self.n_local


def expert_parallel_groups(n_experts: int, degree: int | None = None) -> ExpertParallelGroups:
    """Create the process groups (collective: every rank calls it, with the same arguments).

    degree=None means the whole world. Raises ValueError for a degree that does not fit (see check_degree).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs torch.distributed initialized (run under torchrun, "
                           "or call torch.distributed.init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    degree = world if degree is None else degree
    check_degree(n_experts, degree, world)
    group = replicas = None
    for start in range(0, world, degree):  # new_group is collective: all ranks create every group
        g = dist.new_group(list(range(start, start + degree)))
        if start <= rank < start + degree:
            group = g
    if world > degree:
        for offset in range(degree):
            g = dist.new_group(list(range(offset, world, degree)))
            if rank % degree == offset:
                replicas = g
    return ExpertParallelGroups(degree, world, rank, group, replicas, n_experts)
