"""Fine-grained mixture of experts with K2's sigmoid router (noaux_tc).

The router scores every expert with a sigmoid; a per-expert correction bias (trained by no gradient,
moved by the loss-free balancing rule) shifts which experts are *chosen*, but the mixing weights
come from the unbiased scores. Experts are stored stacked, [E, out, in], and run grouped: token-slots
are sorted by expert and each projection is one grouped matmul over all experts, so forward and
backward cost the routed tokens plus a small constant per expert (linear in E). Where the stack is
not in memory (the streaming analysis of a released checkpoint), an ExpertProvider hands the same
dispatch one expert's weights at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import K2Config


@dataclass
class Routing:
    indices: torch.Tensor  # (N, k) chosen experts
    weights: torch.Tensor  # (N, k) mixing weights (float32), normalized and scaled
    scores: torch.Tensor  # (N, E) sigmoid scores (float32), differentiable


def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """K2 / DeepSeek-V3 routing for tokens x: (N, hidden), in its three steps: score, choose, weight."""
    scores = router_scores(x, gate_weight)  # (N, E)
    indices = choose_experts(scores, correction_bias, top_k, n_group, topk_group)  # (N, k)
    weights = mixing_weights(scores, indices, norm_topk_prob, routed_scaling_factor)
    return Routing(indices, weights, scores)


def router_scores(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """Every expert's sigmoid score for every token, in float32: (N, E)."""
    return F.linear(x.to(torch.float32), gate_weight.to(torch.float32)).sigmoid()


def choose_experts(scores, correction_bias, top_k: int, n_group: int = 1, topk_group: int = 1) -> torch.Tensor:
    """The top_k experts of score + bias per token (N, k); with groups, only within the best topk_group."""
    choice = scores.detach() + correction_bias  # the bias picks experts, never weights them
    if n_group > 1:
        grouped = rearrange(choice, "n (g e) -> n g e", g=n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G): sum of each group's top 2
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        keep = rearrange(keep[..., None].expand_as(grouped), "n g e -> n (g e)")
        choice = choice.masked_fill(~keep, float("-inf"))
    return choice.topk(top_k, dim=-1).indices


def mixing_weights(scores, indices, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """The chosen experts' unbiased scores, normalized to sum 1 (norm_topk_prob), times the scaling factor."""
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token-slots routed to each expert (E,), as int64."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts)


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch runs torch._grouped_mm (forward and backward) for this device and dtype."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM:
        try:  # under no_grad / inference_mode too: the answer must not depend on the caller's mode
            with torch.inference_mode(False), torch.enable_grad():
                a = torch.ones(2, 8, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([1, 2], device=device, dtype=torch.int32)
                y = torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
                y.backward(torch.ones_like(y))
            _GROUPED_MM[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _GROUPED_MM[key] = False
    return _GROUPED_MM[key]


_GROUPED_MM: dict = {}


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int], offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert (counts[e] rows for expert e) times each expert's w[e]^T: (S, out).

    One grouped matmul where torch has it for this device, else one matmul per non-empty expert on
    views from a single unbind. Either way the backward writes each expert's gradient once into one
    stack-sized buffer; indexing w[e] per expert instead would zero-fill a stack-sized gradient per
    expert (cost E^2).
    """
    # torch.compile's meta kernel for the grouped matmul takes bf16 only (torch 2.13): traced, loop
    if not torch.compiler.is_compiling() and _probe_grouped_mm(x.device, x.dtype):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    per_expert = w.unbind(0)
    pieces = [F.linear(rows, per_expert[e]) for e, rows in enumerate(x.split(counts)) if counts[e]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[1])


def slots_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-slots (n, j), flattened to n k + j, sorted by expert (stable), and each expert's count (E,)."""
    slot_expert = indices.reshape(-1)  # (N k,)
    return torch.argsort(slot_expert, stable=True), torch.bincount(slot_expert, minlength=n_experts)


def grouped_experts(x, indices, weights, w_gate, w_up, w_down):
    """sum_j weights[n, j] * expert_{indices[n, j]}(x[n]) for tokens x: (N, H), stacked expert weights.

    Token-slots are sorted by expert, every expert's rows run through its SwiGLU as one grouped
    matmul per projection, and each token sums its k results. No loop over tokens; experts with
    no tokens cost nothing; forward and backward are linear in the number of experts.
    """
    k = indices.shape[-1]
    order, counts_t = slots_by_expert(indices, w_gate.shape[0])
    counts, offsets = counts_t.tolist(), counts_t.cumsum(0).to(torch.int32)
    xs = x[order // k]  # (N k, H): each slot's token, sorted by expert
    # scaling the (slots, I) activation before down_proj is cheaper than scaling (slots, H) after it
    slot_weight = weights.reshape(-1)[order].to(x.dtype)[:, None]
    h = F.silu(grouped_linear(xs, w_gate, counts, offsets)) * grouped_linear(xs, w_up, counts, offsets) * slot_weight
    y_sorted = grouped_linear(h, w_down, counts, offsets)  # (N k, H)
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to slot order (n, j)
    return rearrange(y, "(n k) h -> n k h", k=k).sum(1)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        c = config
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor

    def forward(self, x) -> Routing:
        return route(
            x,
            self.weight,
            self.e_score_correction_bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.norm_topk_prob,
            self.routed_scaling_factor,
        )


class ExpertProvider:
    """Routed experts' weights on demand, for an `Experts` whose stack is not in memory (the streaming
    analysis reads them from a checkpoint). `provided_experts` announces the experts it will ask for,
    then asks for them one at a time and drops each one's matrices before the next: one expert at once.
    """

    def plan(self, experts: list[int]) -> None:
        """The experts that received tokens, in the order they will be asked for (a read-ahead hint)."""

    def get(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (gate (I, H), up (I, H), down (H, I))."""
        raise NotImplementedError

    def done(self, e: int) -> None:
        """Expert e is finished; nothing references its matrices any more."""


def provided_experts(x, indices, weights, provider: ExpertProvider, n_experts: int):
    """`grouped_experts` with each expert's matrices fetched from `provider` when its turn comes.

    The same dispatch: slots sorted by `slots_by_expert`, each expert's slots through `grouped_experts`
    itself (as a stack of one), their results added to their tokens. Memory: one expert's weights.
    """
    k = indices.shape[-1]
    order, counts = slots_by_expert(indices, n_experts)
    counts = counts.tolist()
    slot_weight = weights.reshape(-1)[order]
    used = [e for e, n in enumerate(counts) if n]
    provider.plan(used)
    out = torch.zeros_like(x)
    start = 0
    for e in used:
        n = counts[e]
        rows = order[start : start + n] // k  # (n,) the tokens of expert e's slots
        gate, up, down = provider.get(e)
        one = torch.zeros(n, 1, dtype=torch.int64, device=x.device)  # every slot to the stack's only expert
        part = grouped_experts(x[rows], one, slot_weight[start : start + n, None], gate[None], up[None], down[None])
        out.index_add_(0, rows, part)
        del gate, up, down, part
        provider.done(e)
        start += n
    return out


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts stored stacked: gate/up (E, I, H), down (E, H, I).

    With `provider` set (an ExpertProvider), the weights come from it one expert at a time instead of
    from the stack, which may then stay on the meta device (the streaming analysis).
    """

    def __init__(self, config: K2Config):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.provider: ExpertProvider | None = None

    def forward(self, x, routing: Routing):
        """x: (N, H) -> (N, H), the routing-weighted sum of each token's k experts."""
        if self.provider is not None:
            return provided_experts(x, routing.indices, routing.weights, self.provider, self.gate_proj.shape[0])
        return grouped_experts(x, routing.indices, routing.weights, self.gate_proj, self.up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.n_experts = config.n_routed_experts
        width = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = FeedForward(config.hidden_size, width) if width else None

    def forward(self, x):
        """x: (B, T, H). Returns (output, routing over the B*T tokens)."""
        B = x.shape[0]
        flat = rearrange(x, "b t h -> (b t) h")
        routing = self.gate(flat)
        y = self.experts(flat, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return rearrange(y, "(b t) h -> b t h", b=B), routing

