"""The differentiable all-to-all that moves token rows between ranks, and counts the bytes it moves.

Forward sends `send_splits[r]` rows to rank r and receives `recv_splits[r]` from it; backward is the
same exchange reversed (the gradient of a row goes back to where the row came from), so it moves the
same bytes the other way. Rows a rank "sends" to itself are a local copy and are not counted.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist


class Traffic:
    """Bytes this rank sent to and received from other ranks, per (phase, pass), e.g. ("dispatch", "forward")."""

    def __init__(self):
        self.sent: dict[tuple[str, str], int] = defaultdict(int)
        self.received: dict[tuple[str, str], int] = defaultdict(int)

    def record(self, key, row_bytes: int, send_splits, recv_splits, me: int) -> None:
        self.sent[key] += row_bytes * (sum(send_splits) - send_splits[me])
        self.received[key] += row_bytes * (sum(recv_splits) - recv_splits[me])

    def total(self) -> tuple[int, int]:
        """(bytes sent, bytes received), all phases and passes."""
        return sum(self.sent.values()), sum(self.received.values())

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()


def _exchange(x, send_splits, recv_splits, group, traffic, key):
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
    if traffic is not None:
        row_bytes = math.prod(x.shape[1:]) * x.element_size()  # (a rank may send no rows at all)
        traffic.record(key, row_bytes, send_splits, recv_splits, dist.get_rank(group))
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, traffic, phase):
        ctx.args = (send_splits, recv_splits, group, traffic, phase)
        return _exchange(x, send_splits, recv_splits, group, traffic, (phase, "forward"))

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits, group, traffic, phase = ctx.args
        return _exchange(grad, recv_splits, send_splits, group, traffic, (phase, "backward")), None, None, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
               traffic: Traffic | None = None, phase: str = "dispatch") -> torch.Tensor:
    """Rows of x (sum(send_splits), ...) out to the ranks of `group`, rows from them back: (sum(recv_splits), ...)."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group, traffic, phase)
