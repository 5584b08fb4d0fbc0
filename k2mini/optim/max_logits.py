"""The optimizer side of max-logit telemetry: which optimizers take ``max_logits`` in ``step``.

A forward pass with ``telemetry=True`` reports each attention head's largest pre-softmax logit
(``out.telemetry.max_logits``, shape (layers, heads)). An optimizer that uses them (QK-Clip) or records
them declares so by subclassing ``TakesMaxLogits``; a training loop passes them to such an optimizer,
``opt.step(max_logits=...)``, and calls any other optimizer's plain ``opt.step()``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TakesMaxLogits", "max_logit_metrics"]


class TakesMaxLogits(abc.ABC):
    """Declares ``step(closure=None, *, max_logits=None)``: ``max_logits`` are the (layers, heads) max
    attention logits of the forward pass whose gradients the step applies. Subclass it (or
    ``TakesMaxLogits.register(cls)``) to have ``k2mini.train`` pass them."""

    @abc.abstractmethod
    def step(self, closure: Callable[[], Any] | None = None, *, max_logits: torch.Tensor | None = None) -> Any:
        ...


def max_logit_metrics(max_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """``max_logit`` (over everything) and ``max_logit/layer{l}`` (per layer) of (layers, heads) logits."""
    per_layer = max_logits.float().amax(dim=1)
    metrics = {"max_logit": per_layer.max()}
    metrics.update({f"max_logit/layer{l}": v for l, v in enumerate(per_layer.unbind())})
    return metrics
