"""Bytes an expert-parallel MoE layer moves between ranks: exactly for a routing, or expected for a config.

Per MoE layer and step, with s(a, b) the token-slots rank a sends to experts on rank b (a != b; rows
a rank keeps are not traffic) and H the hidden size, rank a sends

    forward   dispatch  sum_b s(a, b) H  bytes(dispatch dtype)    its tokens to the experts' owners
              combine   sum_b s(b, a) H  bytes(dtype)             the expert outputs back
    backward  combine   sum_b s(a, b) H  bytes(dtype)             the outputs' gradients to the owners
              dispatch  sum_b s(b, a) H  bytes(dtype)             the inputs' gradients back

plus E/degree int64 slot counts to every other rank, and receives the mirror image. Under balanced routing
of T tokens per rank with top-k, s(a, b) = T k / degree, so a rank sends 4 T k (degree - 1) / degree H
bytes per layer and step at one dtype: the (degree - 1) / degree of slots that leave, four times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KEYS = (("dispatch", "forward"), ("combine", "forward"), ("combine", "backward"), ("dispatch", "backward"))


def dtype_bytes(dtype) -> float:
    """Bytes per element of a torch dtype (e.g. torch.float8_e4m3fn: 1) or a number of bytes."""
    return float(dtype) if isinstance(dtype, (int, float)) else torch.empty((), dtype=dtype).element_size()


@dataclass
class LayerTraffic:
    """Bytes each rank sends and receives in one MoE layer, one step: {(phase, pass): [bytes of rank r]}."""

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)

    def total_sent(self, rank: int = 0) -> float:
        return sum(v[rank] for v in self.sent.values())

    def total_received(self, rank: int = 0) -> float:
        return sum(v[rank] for v in self.received.values())


def traffic_from_slots(slots, hidden: int, dtype=torch.float32, dispatch_dtype=None, n_experts: int | None = None) -> LayerTraffic:
    """The exact traffic of one MoE layer (forward + backward) given slots[a, b], the token-slots rank a
    sends to experts held by rank b (a degree x degree matrix; the diagonal stays home).

    dtype: activations and gradients; dispatch_dtype: the forward dispatch (default dtype; DeepSeek-V3
    dispatches in fp8). With n_experts, the slot-count exchange (int64) is included as ("counts", "forward").
    """
    s = torch.as_tensor(slots, dtype=torch.float64).clone()
    s.fill_diagonal_(0)
    out_rows, in_rows = s.sum(1), s.sum(0)  # slots each rank sends away, slots it receives
    b, bd = dtype_bytes(dtype), dtype_bytes(dtype if dispatch_dtype is None else dispatch_dtype)
    rows = {("dispatch", "forward"): (out_rows, in_rows, bd), ("combine", "forward"): (in_rows, out_rows, b),
            ("combine", "backward"): (out_rows, in_rows, b), ("dispatch", "backward"): (in_rows, out_rows, b)}
    t = LayerTraffic()
    for key, (sent, received, nbytes) in rows.items():
        t.sent[key] = [float(v) * hidden * nbytes for v in sent]
        t.received[key] = [float(v) * hidden * nbytes for v in received]
    if n_experts is not None:
        degree = s.shape[0]
        counts = (degree - 1) * (n_experts // degree) * 8.0
        t.sent[("counts", "forward")] = [counts] * degree
        t.received[("counts", "forward")] = [counts] * degree
    return t


def distinct_ranks_per_token(n_experts: int, top_k: int, degree: int) -> float:
    """Expected number of ranks a token's k experts live on, for k distinct experts chosen uniformly."""
    per_rank = n_experts // degree
    miss = math.comb(n_experts - per_rank, top_k) / math.comb(n_experts, top_k)  # none of k on a given rank
    return degree * (1 - miss)


def expected_traffic(config, tokens: int, degree: int, dtype=torch.bfloat16, dispatch_dtype=None,
                     per: str = "slot") -> LayerTraffic:
    """Bytes per rank of one MoE layer, one step (forward + backward), under perfectly balanced routing.

    config: a K2Config (hidden_size, n_routed_experts, num_experts_per_tok); tokens: tokens per step over
    the expert-parallel group, tokens / degree on each rank. per="slot": every token-slot travels (as
    k2mini.parallel does); per="rank": a token travels once to each rank holding any of its experts, and
    the owner sums its experts' outputs before the combine (DeepEP), for experts chosen uniformly at random.
    """
    from .groups import check_degree

    E, k, H = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    check_degree(E, degree, degree)
    T = tokens / degree
    if per == "slot":
        pairs = T * k  # token-slots leaving each rank, spread evenly over the degree ranks
    elif per == "rank":
        pairs = T * distinct_ranks_per_token(E, k, degree)
    else:
        raise ValueError(f"per must be 'slot' or 'rank', got {per!r}")
    slots = torch.full((degree, degree), pairs / degree, dtype=torch.float64)
    return traffic_from_slots(slots, H, dtype, dispatch_dtype, E)
