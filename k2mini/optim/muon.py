"""Muon: momentum, then Newton-Schulz orthogonalization, for 2-D weights and stacked 3-D experts.

One step for a weight ``W`` of shape ``[A, B]`` (or ``[E, A, B]``, each expert its own matrix):

    B_t = mu * B_{t-1} + (1 - mu) * G                  EMA momentum (torch.optim.Muon's buffer)
    U   = (1 - mu) * G + mu * B_t   (Nesterov)   or   B_t
    O   = newton_schulz(U)                           per matrix; experts as one batched call
    W  <- W * (1 - lr * wd) - lr * adjust(A, B) * O
    adjust = 0.2 * sqrt(max(A, B))  ("match_rms_adamw", Moonlight/K2)  or  sqrt(max(1, A / B))  ("original")

docs/K2_FACTS.md writes the momentum heavy-ball style, ``M_t = mu M_{t-1} + G`` and ``U = G + mu M_t``. By
induction ``B_t = (1 - mu) M_t`` and hence ``U_ema = (1 - mu) U_heavy``: the two differ by a constant
factor only, and ``newton_schulz`` divides by the Frobenius norm first, so the orthogonalized update
``O`` is the same. The one place the factor survives is the ``eps`` floor of that division,
``U / max(||U||_F, eps)``: the EMA form reaches the floor at a gradient 1 / (1 - mu) = 20x larger
(at ``||U_heavy||_F < 2e-6`` instead of ``1e-7``), where the update stops being unit-scale and shrinks
with the gradient. That only happens for an all-but-zero gradient, where shrinking is harmless. We
keep the EMA form so the state (``momentum_buffer``) and the numerics are torch.optim.Muon's; a
torch.optim.Muon state dict of 2-D weights loads here (its groups get our adjust_lr and ns_dtype).

Weight decay uses the un-adjusted ``lr`` (decoupled, as in torch and Moonlight), the update the
adjusted one. With ``"match_rms_adamw"`` the update RMS is about ``0.2 * lr`` (a touch less, since
Newton-Schulz leaves singular values in ``[0.68, 1.13]`` rather than at 1), which is the RMS of a
typical AdamW update: Muon and AdamW can then share one learning rate and one weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from ..checks import check_int, check_real
from .newton_schulz import NS_COEFFICIENTS, default_ns_dtype, newton_schulz

__all__ = ["Muon", "MuonSettings", "WEIGHT_DECAY", "adjusted_lr", "NonFiniteGradientError", "sequential_sum",
           "read_scalars"]

ADJUST_LR_MODES = ("match_rms_adamw", "original")
NS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WEIGHT_DECAY = 0.1  # the default decoupled weight decay of Muon, MuonAdamW and build_optimizer


@dataclass(frozen=True)
class MuonSettings:
    """Muon's hyperparameters besides lr and weight decay, with their defaults: the one list of them.

    `Muon`, `MuonAdamW` (for its Muon groups) and `build_optimizer` take these names as keywords; each
    becomes a key of a Muon param group (the keys torch.optim.Muon's groups have, plus adjust_lr and
    ns_dtype).

        momentum, nesterov  EMA momentum coefficient and Nesterov look-ahead (torch.optim.Muon's)
        ns_steps            Newton-Schulz iterations
        adjust_lr           "match_rms_adamw" (K2, Moonlight; update RMS ~ 0.2 lr) or "original" (Keller
                            Jordan's sqrt(max(1, A / B)), torch's default; wants a ~50x larger lr)
        ns_dtype            dtype of the Newton-Schulz matmuls; None: bfloat16 on CUDA, float32 elsewhere
        eps                 floor of the Frobenius norm Newton-Schulz divides by (AdamW's is adamw_eps)
    """

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: str = "match_rms_adamw"
    ns_dtype: torch.dtype | None = None
    eps: float = 1e-7

    @classmethod
    def from_keywords(cls, keywords: dict[str, Any], where: str) -> MuonSettings:
        """The settings given as keywords to `where`; TypeError naming a keyword that is not one of them."""
        unknown = sorted(set(keywords) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{where} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"Muon's settings are {', '.join(f.name for f in fields(cls))}")
        return cls(**keywords)

    def group_defaults(self) -> dict[str, Any]:
        """The settings as param-group entries."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or nan; the step was not taken and no state was changed."""


def adjusted_lr(lr: float, shape: torch.Size | tuple[int, ...], adjust_lr: str) -> float:
    """The learning rate Muon applies to the orthogonalized update of a matrix ``[..., A, B]``."""
    A, B = shape[-2:]
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    if adjust_lr == "original":
        return lr * math.sqrt(max(1.0, A / B))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR_MODES}, got {adjust_lr!r}")


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """ValueError for a Muon group with an impossible hyperparameter."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("a tensor lr must have one element")
        lr = lr.item()
    check_real(lr, "lr", low=0)
    check_real(group["weight_decay"], "weight_decay", low=0)
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
    check_int(group["ns_steps"], "ns_steps", low=1, high=99)
    if not group["eps"] > 0:
        raise ValueError(f"eps must be > 0, got {group['eps']!r}")
    if group["adjust_lr"] not in ADJUST_LR_MODES:
        raise ValueError(f"adjust_lr must be one of {ADJUST_LR_MODES}, got {group['adjust_lr']!r}")
    if group["ns_dtype"] is not None and group["ns_dtype"] not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be None or one of {NS_DTYPES}, got {group['ns_dtype']!r}")


def sequential_sum(terms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0 + terms[0] + terms[1] + ... in float32, left to right, as a float32 scalar on `device`: bit for bit
    the total of a loop `total += term` (a tensor's `.sum()` adds in another order, pairwise). On the CPU the
    0-dim terms are read once and added as numpy float32 scalars (IEEE float32 additions, like torch's); on
    other devices the loop runs there, so that nothing waits for the device."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    if device.type != "cpu":
        for term in terms:
            total += term.to(device)
        return total
    if terms:
        acc = np.float32(0.0)
        for value in torch.stack(terms).to(torch.float32).numpy():
            acc = np.float32(acc + value)
        total.fill_(float(acc))
    return total


def orthogonalized(updates: list[torch.Tensor], group: dict[str, Any]) -> list[torch.Tensor]:
    """newton_schulz of each update with the group's settings. On the CPU in float32 / float64, the 2-D updates
    of one shape go through one batched call: the per-call ops (norm, three products and a diagonal add
    per iteration) then run once per shape instead of once per matrix, and each matrix's result is the one
    its own call gives (on this project's CI CPU measured bit for bit; a batched kernel that blocked
    differently would differ in the last bits, which tests/test_optim_muon.py bounds by 1e-6)."""
    def ns(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return newton_schulz(u, steps=group["ns_steps"], eps=group["eps"], dtype=dtype, coefficients=NS_COEFFICIENTS)

    out: list[torch.Tensor | None] = [None] * len(updates)
    same_shape: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        dtype = group["ns_dtype"] or default_ns_dtype(u.device)
        if u.ndim == 2 and u.device.type == "cpu" and dtype in (torch.float32, torch.float64):
            same_shape.setdefault((tuple(u.shape), u.dtype, dtype), []).append(i)
        else:
            out[i] = ns(u, dtype)
    for (_, _, dtype), members in same_shape.items():
        if len(members) == 1:
            out[members[0]] = ns(updates[members[0]], dtype)
            continue
        batch = ns(torch.stack([updates[i] for i in members]), dtype)  # (n, A, B)
        for i, ortho in zip(members, batch.unbind(0)):
            out[i] = ortho
    return out


def param_label(group: dict[str, Any], index: int, group_index: int) -> str:
    """The parameter's name if the group was built from named parameters, else where it sits."""
    names = group.get("param_names")
    if names is not None:
        return repr(names[index])
    return f"param_groups[{group_index}]['params'][{index}]"


class Muon(Optimizer):
    """Muon for 2-D weight matrices and stacked 3-D expert weights ``[E, out, in]``.

    Args:
        params: parameters, ``named_parameters()`` (then errors name the parameter) or param groups.
        lr: learning rate; with ``adjust_lr="match_rms_adamw"`` the same value AdamW would use.
        weight_decay: decoupled weight decay, ``W *= 1 - lr * weight_decay`` each step.
        check_finite: raise ``NonFiniteGradientError`` (naming the parameter) before touching anything
            when a gradient holds inf or nan. Costs one host sync per step.
        **settings: ``MuonSettings`` by name (momentum, nesterov, ns_steps, adjust_lr, ns_dtype, eps).

    After each step ``last_metrics`` holds, per param group name, ``update_rms/<name>`` (RMS of the
    step's gradient-driven update, weight decay excluded), ``grad_norm/<name>`` and ``lr/<name>``.
    The figures stay tensors until ``last_metrics`` is read, so recording them adds no sync.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        weight_decay: float = WEIGHT_DECAY,
        *,
        check_finite: bool = True,
        **settings: Any,
    ) -> None:
        muon = MuonSettings.from_keywords(settings, "Muon")
        defaults = dict(lr=lr, weight_decay=weight_decay, **muon.group_defaults())
        self.check_finite = check_finite
        self._pending_metrics: dict[str, torch.Tensor | float] = {}
        super().__init__(params, defaults)

    # attributes beyond torch's (defaults, state, param_groups) that copy/pickle must carry
    _PICKLED_ATTRS: tuple[str, ...] = ("check_finite", "_pending_metrics")

    # ---- construction -------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED_ATTRS if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also runs inside load_state_dict: groups saved without a key (e.g. by torch.optim.Muon,
        # which has no adjust_lr / ns_dtype) get this optimizer's default for it
        super().__setstate__(state)
        for group in self.param_groups:
            self._fill_group_defaults(group)

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any], group_index: int) -> None:
        _check_hyperparameters(group)
        for i, p in enumerate(group["params"]):
            if p.ndim not in (2, 3):
                raise ValueError(
                    f"Muon handles 2-D weights [out, in] and stacked experts [E, out, in]; "
                    f"{param_label(group, i, group_index)} has shape {tuple(p.shape)}. "
                    "Give vectors (norms, biases) and embeddings to AdamW, e.g. via k2mini.optim.build_optimizer."
                )
            if torch.is_complex(p):
                raise ValueError(f"Muon does not support complex parameters ({param_label(group, i, group_index)})")

    # ---- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; raises before changing anything if a gradient is not finite."""
        return self._take_step(closure)

    def _take_step(self, closure: Callable[[], Any] | None) -> Any:
        # Subclasses' step() call this rather than super().step(): torch wraps every class's step with
        # its hooks, and a super() chain would run them twice.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._validate_groups()  # a group's lr or decay may have been changed since construction
        work = self._collect()  # [(group_index, group, params, grads, grad_norms)]
        metrics: dict[str, torch.Tensor | float] = {}
        for gi, group, params, grads, grad_norms in work:
            name = group.get("name", f"group{gi}")
            update_sumsq = self._group_step(group, params, grads)
            numel = sum(p.numel() for p in params)
            metrics[f"update_rms/{name}"] = (update_sumsq / max(numel, 1)).sqrt()
            metrics[f"grad_norm/{name}"] = grad_norms.square().sum().sqrt()
            metrics[f"lr/{name}"] = float(group["lr"])
        self._pending_metrics = metrics
        return loss

    def _validate_groups(self) -> None:
        """ValueError naming the group whose hyperparameters are impossible, before any parameter moves."""
        for gi, group in enumerate(self.param_groups):
            try:
                self._validate_group(group, gi)
            except (ValueError, TypeError) as e:
                name = f" ({group['name']})" if "name" in group else ""
                raise ValueError(f"param_groups[{gi}]{name}: {e}; the step was not taken") from None

    def _collect(self) -> list[tuple[int, dict, list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
        """Params with a gradient per group, their gradient norms, and the finiteness check."""
        work = []
        for gi, group in enumerate(self.param_groups):
            params, grads, where = [], [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"sparse gradients are not supported ({param_label(group, i, gi)})")
                params.append(p)
                grads.append(p.grad)
                where.append(i)  # the label is only made if an error needs it
            if not params:
                continue
            # one multi-tensor op (tensor by tensor, as vector_norm each: the same numbers), on the first grad's device
            norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads, 2, dtype=torch.float32)])
            work.append((gi, group, params, grads, norms, where))

        if self.check_finite and work:
            all_finite = torch.stack([torch.isfinite(w[4]).all().cpu() for w in work]).all()
            if not all_finite:  # one sync; the slow search below runs only on failure
                bad = [
                    param_label(group, i, gi)
                    for gi, group, _, grads, norms, where in work
                    for g, n, i in zip(grads, norms, where)
                    if not torch.isfinite(n) and not torch.isfinite(g).all()
                ]
                if bad:  # (a finite gradient can still overflow its float32 norm; that is not an error)
                    raise NonFiniteGradientError(
                        f"non-finite gradient (inf or nan) in {', '.join(bad)}; the step was skipped and no "
                        "weight or optimizer state changed. Lower the learning rate, check the loss for "
                        "inf/nan, or clip gradients."
                    )
        return [w[:5] for w in work]

    def _group_step(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        return self._muon_group_step(group, params, grads)

    def _muon_group_step(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> torch.Tensor:
        """Muon on one group, in place; returns the sum of squares of the applied updates."""
        lr = float(group["lr"])
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        bufs = []
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        # multi-tensor ops run tensor by tensor on the CPU: each tensor's numbers are its own op's
        torch._foreach_lerp_(bufs, grads, 1 - momentum)  # B = mu B + (1 - mu) G
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs  # (1 - mu) G + mu B
        orthos = orthogonalized(updates, group)
        step_lrs = [adjusted_lr(lr, p.shape, group["adjust_lr"]) for p in params]
        for p, ortho, step_lr in zip(params, orthos, step_lrs):
            p.mul_(1 - lr * weight_decay)
            p.add_(ortho, alpha=-step_lr)
        squares = [n.to(params[0].device) for n in torch._foreach_norm(orthos, 2, dtype=torch.float32)]
        squares = torch._foreach_mul(squares, squares)  # x.square() is x * x
        torch._foreach_mul_(squares, [s**2 for s in step_lrs])
        return sequential_sum(squares, params[0].device)

    # ---- metrics ------------------------------------------------------------------------------

    @property
    def last_metrics(self) -> dict[str, float]:
        """Figures of the latest step as Python floats (reading them syncs once)."""
        return read_scalars(self._pending_metrics)


def read_scalars(values: dict) -> dict:
    """`values` with every one-element tensor as its Python number: `v.item()` each, read in one transfer per
    (device, dtype) (a stack and `tolist`, the same numbers); anything else as it is (a larger tensor raises,
    as `.item()` does)."""
    groups: dict[tuple, list[str]] = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                v.item()  # the error .item() gives
            groups.setdefault((v.device, v.dtype), []).append(k)
    out = dict(values)
    for keys in groups.values():
        out.update(zip(keys, torch.stack([values[k].reshape(()) for k in keys]).tolist()))
    return out
