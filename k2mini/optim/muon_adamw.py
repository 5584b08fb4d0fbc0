"""MuonAdamW: one ``torch.optim.Optimizer`` that steps Muon groups with Muon and the others with AdamW.

K2 and Moonlight train the hidden layers' weight matrices with Muon and the embedding, the lm_head and
the vectors with AdamW; ``build_optimizer`` (build.py) decides which parameter is which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as adamw_functional

from ..checks import check_real
from .max_logits import TakesMaxLogits, max_logit_metrics
from .muon import WEIGHT_DECAY, Muon, MuonSettings, sequential_sum

__all__ = ["MuonAdamW"]


class MuonAdamW(Muon, TakesMaxLogits):
    """One ``torch.optim.Optimizer``: groups with ``use_muon=True`` take Muon steps, the others AdamW.

    The AdamW math is torch's own (``torch.optim.adamw.adamw``, the functional form ``torch.optim.AdamW``
    calls, with the same state layout), so an all-AdamW ``MuonAdamW`` steps bit-identically to
    ``torch.optim.AdamW``. One optimizer rather than two means one ``state_dict``, one ``zero_grad``,
    and LR schedulers that see every group.

    Every param group must say ``use_muon``; Muon groups default to the ``MuonSettings`` given as
    keywords (momentum, nesterov, ns_steps, adjust_lr, ns_dtype, eps: Newton-Schulz's floor), AdamW
    groups to ``betas`` and ``adamw_eps``. ``step(max_logits=...)`` is accepted so a training loop can
    pass the model's telemetry whatever the kind (it is a ``TakesMaxLogits``): here it is only recorded
    (``max_logit/...`` metrics).
    """

    _PICKLED_ATTRS = Muon._PICKLED_ATTRS + ("_kind_defaults",)

    def __init__(
        self,
        param_groups: Iterable[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float = WEIGHT_DECAY,
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        check_finite: bool = True,
        **settings: Any,
    ) -> None:
        self._kind_defaults = {
            True: MuonSettings.from_keywords(settings, "MuonAdamW").group_defaults(),
            False: dict(betas=betas, eps=adamw_eps, amsgrad=False, maximize=False, foreach=None),
        }
        self.check_finite = check_finite
        self._pending_metrics = {}
        # Muon.__init__ would install Muon-only defaults; the per-kind ones are filled in add_param_group.
        Optimizer.__init__(self, param_groups, dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            raise ValueError(
                "MuonAdamW needs param groups that say use_muon=True or False, e.g. "
                "[{'params': matrices, 'use_muon': True}, {'params': others, 'use_muon': False}]; "
                "k2mini.optim.build_optimizer(model, ...) builds them for a K2 model"
            )
        self._fill_group_defaults(param_group)
        super().add_param_group(param_group)

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        if "use_muon" in group:
            for key, value in self._kind_defaults[bool(group["use_muon"])].items():
                group.setdefault(key, value)
        super()._fill_group_defaults(group)

    def _validate_group(self, group: dict[str, Any], group_index: int) -> None:
        if group["use_muon"]:
            return super()._validate_group(group, group_index)
        beta1, beta2 = group["betas"]
        lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) and group["lr"].numel() == 1 else group["lr"]
        check_real(lr, "lr", low=0)
        check_real(group["weight_decay"], "weight_decay", low=0)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {group['betas']!r}")
        if not group["eps"] >= 0:
            raise ValueError(f"adamw eps must be >= 0, got {group['eps']!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, max_logits: torch.Tensor | None = None) -> Any:
        if max_logits is not None and not (isinstance(max_logits, torch.Tensor) and max_logits.ndim == 2):
            raise ValueError(
                "max_logits must be a (layers, heads) tensor such as out.telemetry.max_logits, got "
                + (f"shape {tuple(max_logits.shape)}" if isinstance(max_logits, torch.Tensor) else type(max_logits).__name__)
            )
        loss = self._take_step(closure)
        if max_logits is not None:
            self._pending_metrics.update(max_logit_metrics(max_logits.detach()))
        return loss

    def _group_step(self, group, params, grads) -> torch.Tensor:
        if group["use_muon"]:
            return self._muon_group_step(group, params, grads)
        return self._adamw_group_step(group, params, grads)

    def _adamw_group_step(self, group, params, grads) -> torch.Tensor:
        """torch's AdamW on one group; returns the sum of squares of the gradient-driven update."""
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:  # torch.optim.AdamW's lazy state, step kept on the CPU as it does
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw_functional(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=group["foreach"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )
        return adamw_update_sumsq(exp_avgs, exp_avg_sqs, steps, float(group["lr"]), beta1, beta2, group["eps"])


def adamw_update_sumsq(exp_avgs, exp_avg_sqs, steps, lr: float, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """Sum over parameters of ||lr m_hat / (sqrt(v_hat) + eps)||^2: the squared size of the update AdamW just
    applied (decay excluded), rebuilt from its state, as a float32 scalar on the parameters' device.

    One multi-tensor op per stage instead of one op per parameter per stage, and one read of the step
    counters instead of one per parameter; each parameter's figure is the per-tensor ops' own (torch's
    foreach ops on CPU run them tensor by tensor) and the total adds them in parameter order in float32,
    as a loop of `+=` would (`sequential_sum`): bit for bit the number the per-parameter loop gave.
    """
    same = len({(t.device, t.dtype) for t in steps}) == 1
    ts = torch.stack(steps).tolist() if same else [float(t) for t in steps]  # = float(t) each
    step_sizes = [lr / (1 - beta1**t) for t in ts]
    denoms = torch._foreach_sqrt(exp_avg_sqs)  # sqrt(v) / sqrt(1 - beta2^t) + eps, as torch's AdamW forms it
    torch._foreach_div_(denoms, [math.sqrt(1 - beta2**t) for t in ts])
    torch._foreach_add_(denoms, eps)
    norms = torch._foreach_norm(torch._foreach_div(exp_avgs, denoms), 2, dtype=torch.float32)
    squares = torch._foreach_mul(norms, norms)  # x.square() is x * x
    torch._foreach_mul_(squares, [s**2 for s in step_sizes])
    return sequential_sum(squares, exp_avgs[0].device)
