"""The expert-parallel routed experts: this rank's E/degree experts, fed by two all-to-alls.

For one MoE layer on a rank with N tokens, each choosing k experts (the router is the same on every
rank, so every rank can route its own tokens):

1. sort the N k token-slots by expert (`slots_by_expert`); experts are numbered rank-major, so this
   also groups them by the rank that owns the expert;
2. exchange the per-expert slot counts (E integers), so every rank knows what it will receive;
3. dispatch: all-to-all the slots' token rows to the experts' owners;
4. the owner runs its local experts on what it received, grouped (`grouped_experts`, the same code as
   the single-process layer, with each slot's expert and weight 1);
5. combine: all-to-all the results back, scale each by its mixing weight, and sum each token's k slots.

The mixing weight is applied after the combine rather than before down_proj (as `grouped_experts`
does): w * down(h) = down(w * h), equal to float rounding, and the weights, with their gradient to the
router, never leave the rank that routed the token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from ..moe import Experts, Routing, grouped_experts, slots_by_expert
from .all_to_all import Traffic, all_to_all
from .groups import ExpertParallelGroups


class ExpertParallelExperts(nn.Module):
    """Experts [first, first + n_local) of a layer's stack, held whole: gate/up (n_local, I, H), down (n_local, H, I).

    Built from the single-process `Experts` (same weights on every rank); keeps only this rank's slice.
    `traffic` counts the bytes its all-to-alls move (see `Traffic`).
    """

    def __init__(self, experts: Experts, groups: ExpertParallelGroups):
        super().__init__()
        if experts.provider is not None:
            raise ValueError("an Experts with an ExpertProvider (streamed weights) cannot be sharded")
        self.groups = groups
        self.n_experts = experts.gate_proj.shape[0]
        part = slice(groups.first, groups.first + groups.n_local)
        self.gate_proj = nn.Parameter(experts.gate_proj.detach()[part].clone())
        self.up_proj = nn.Parameter(experts.up_proj.detach()[part].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[part].clone())
        self.traffic = Traffic()

    def extra_repr(self) -> str:
        g = self.groups
        return f"experts [{g.first}, {g.first + g.n_local}) of {self.n_experts}, degree {g.degree}"

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: (N, H) -> (N, H), the routing-weighted sum of each token's k experts, wherever they live."""
        g = self.groups
        k = routing.indices.shape[-1]
        order, counts = slots_by_expert(routing.indices, self.n_experts)  # (N k,), (E,)
        incoming = torch.empty_like(counts)  # (degree * n_local,): slots from rank s for my expert e
        dist.all_to_all_single(incoming, counts, group=g.group)
        self.traffic.record(("counts", "forward"), counts.element_size(), [g.n_local] * g.degree,
                            [g.n_local] * g.degree, g.ep_rank)
        per_rank = rearrange(counts, "(r e) -> r e", r=g.degree)
        incoming = rearrange(incoming, "(r e) -> r e", r=g.degree)
        send, recv = per_rank.sum(1).tolist(), incoming.sum(1).tolist()

        xs = x[order // k]  # (N k, H): each slot's token, sorted by expert, hence by owner
        received = all_to_all(xs, send, recv, g.group, self.traffic, "dispatch")  # (S, H): by source, then expert
        local_expert = torch.arange(g.n_local, device=x.device).repeat(g.degree)  # the expert of each block
        local_expert = torch.repeat_interleave(local_expert, incoming.reshape(-1))  # (S,)
        ones = received.new_ones(received.shape[0], 1)
        out = grouped_experts(received, local_expert[:, None], ones, self.gate_proj, self.up_proj, self.down_proj)
        back = all_to_all(out, recv, send, g.group, self.traffic, "combine")  # (N k, H), in xs's order

        slot_weight = routing.weights.reshape(-1)[order].to(x.dtype)[:, None]
        y = torch.empty_like(back).index_copy(0, order, back * slot_weight)  # back to slot order (n, j)
        return rearrange(y, "(n k) h -> n k h", k=k).sum(1)
