"""Which parameters get Muon, which get AdamW, and the one optimizer object that steps them all.

The split K2 and Moonlight use: Muon for every weight matrix of the hidden layers (attention
projections, dense FFNs, shared and routed experts, the router), AdamW with betas (0.9, 0.95) for the
token embedding and the lm_head (their rows are per-token lookups, not linear maps to orthogonalize)
and for vectors (RMSNorm gains, biases). The router's correction bias is a buffer moved by the
balancing rule, never a parameter, so no optimizer sees it.

The router weight ``[E, hidden]`` goes to Muon by default: Moonlight's reference split gives Muon
every matrix parameter except the embedding and the head, and nothing about the router breaks the
reason Muon works (it is a linear map of the hidden state whose gradient is low-rank-dominated like any
projection's). ``router="adamw"`` moves it to AdamW for the ablation.

Param groups are named by role, whatever the optimizer kind, so metrics line up across runs:
``matrices``, ``router``, ``embeddings`` (all with weight decay) and ``vectors`` (no weight decay,
as in nanoGPT and most LLM recipes).

Learning rates: with ``adjust_lr="match_rms_adamw"`` (the default) Muon's update RMS is ~0.2 lr, the
RMS of a typical AdamW update, so ONE ``lr`` (and one weight decay) serves both halves; that is
Moonlight's point and the reason ``adamw_lr`` defaults to ``lr``. With ``adjust_lr="original"`` Muon
wants a ~20-50x larger lr than AdamW; pass ``adamw_lr`` then. LR schedulers work as usual (the returned
object is a ``torch.optim.Optimizer`` and every group's ``lr`` is scaled by the same factor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw as adamw_functional

from .max_logits import TakesMaxLogits, max_logit_metrics
from .muon import Muon, adjusted_lr  # noqa: F401  (adjusted_lr re-exported for notebooks)
from .qk_clip import attention_modules, check_max_logits, check_tau, qk_clip_

__all__ = ["MuonAdamW", "MuonClip", "build_optimizer", "split_parameters", "KINDS"]

KINDS = ("muonclip", "muon", "adamw")
ROLES = ("matrices", "router", "embeddings", "vectors")


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable (name, parameter) pairs of a K2 model by role: matrices, router, embeddings, vectors."""
    router = {f"{m_name}.{p_name}".lstrip(".") for m_name, m in model.named_modules()
              if hasattr(m, "e_score_correction_bias") for p_name, _ in m.named_parameters(recurse=False)}
    embedding = {f"{m_name}.{p_name}".lstrip(".") for m_name, m in model.named_modules()
                 if isinstance(m, nn.Embedding) or m_name.split(".")[-1] == "lm_head"
                 for p_name, _ in m.named_parameters(recurse=False)}
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            roles["vectors"].append((name, p))
        elif name in embedding:
            roles["embeddings"].append((name, p))
        elif name in router:
            roles["router"].append((name, p))
        else:
            roles["matrices"].append((name, p))
    return roles


class MuonAdamW(Muon, TakesMaxLogits):
    """One ``torch.optim.Optimizer``: groups with ``use_muon=True`` take Muon steps, the others AdamW.

    The AdamW math is torch's own (``torch.optim.adamw.adamw``, the functional form ``torch.optim.AdamW``
    calls, with the same state layout), so an all-AdamW ``MuonAdamW`` steps bit-identically to
    ``torch.optim.AdamW``. One optimizer rather than two means one ``state_dict``, one ``zero_grad``,
    and LR schedulers that see every group.

    Every param group must say ``use_muon``; Muon groups default to the Muon arguments below, AdamW
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
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str = "match_rms_adamw",
        ns_dtype: torch.dtype | None = None,
        ns_eps: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        check_finite: bool = True,
    ) -> None:
        self._kind_defaults = {
            True: dict(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, adjust_lr=adjust_lr,
                       ns_dtype=ns_dtype, eps=ns_eps),
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
        if not (0.0 <= float(group["lr"]) < math.inf):
            raise ValueError(f"lr must be a finite number >= 0, got {group['lr']!r}")
        if not 0.0 <= group["weight_decay"] < math.inf:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {group['betas']!r}")
        if not group["eps"] >= 0:
            raise ValueError(f"adamw eps must be >= 0, got {group['eps']!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, max_logits: torch.Tensor | None = None) -> Any:
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
        # The update AdamW just applied (decay excluded), rebuilt from its state: lr m_hat / (sqrt(v_hat) + eps).
        sumsq = torch.zeros((), dtype=torch.float32, device=params[0].device)
        for m, v, t in zip(exp_avgs, exp_avg_sqs, steps):
            t = float(t)
            step_size = float(group["lr"]) / (1 - beta1**t)
            denom = v.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
            sumsq += step_size**2 * torch.linalg.vector_norm(m / denom, dtype=torch.float32).square().to(sumsq.device)
        return sumsq


class MuonClip(MuonAdamW):
    """Muon (+ AdamW for the rest), then QK-Clip: K2's optimizer.

    Call ``opt.step(max_logits=out.telemetry.max_logits)`` with the max logits of the forward pass
    whose gradients are being applied. The step validates max_logits first (nothing changes on a bad
    shape), runs Muon/AdamW, then ``qk_clip_(model, max_logits, tau)``.

    Metrics (``last_metrics``), besides the optimizer's: ``max_logit`` and ``max_logit/layer{l}``
    (before the clip), ``qk_clip/heads_clipped`` this step, ``qk_clip/frac_heads_ever_clipped``.
    ``clip_counts`` [layers, heads] counts the steps each head was clipped; it and ``tau`` travel
    in ``state_dict()`` under ``"qk_clip"``.
    """

    _PICKLED_ATTRS = MuonAdamW._PICKLED_ATTRS + ("model", "tau", "clip_counts", "last_gamma")

    def __init__(self, param_groups: Iterable[dict[str, Any]], model: nn.Module, *, tau: float = 100.0, **kwargs: Any):
        check_tau(tau)
        super().__init__(param_groups, **kwargs)
        self.model = model
        self.tau = float(tau)
        layers = attention_modules(model)
        self.clip_counts = torch.zeros(len(layers), layers[0].num_heads, dtype=torch.int64)
        self.last_gamma: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, max_logits: torch.Tensor | None = None) -> Any:
        if max_logits is None:
            raise ValueError(
                "MuonClip.step needs max_logits: run the forward as model(input_ids, telemetry=True) and "
                "call opt.step(max_logits=out.telemetry.max_logits)"
            )
        max_logits = check_max_logits(self.model, max_logits)
        loss = self._take_step(closure)
        self._pending_metrics.update(max_logit_metrics(max_logits))
        gamma = qk_clip_(self.model, max_logits, self.tau)
        clipped = (gamma < 1).cpu()
        self.clip_counts += clipped
        self.last_gamma = gamma
        self._pending_metrics["qk_clip/heads_clipped"] = int(clipped.sum())
        self._pending_metrics["qk_clip/frac_heads_ever_clipped"] = float((self.clip_counts > 0).float().mean())
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["qk_clip"] = {"tau": self.tau, "clip_counts": self.clip_counts.clone()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        clip = state_dict.pop("qk_clip", None)
        super().load_state_dict(state_dict)
        if clip is not None:
            if tuple(clip["clip_counts"].shape) != tuple(self.clip_counts.shape):
                raise ValueError(
                    f"qk_clip state is for {tuple(clip['clip_counts'].shape)} (layers, heads), this model has "
                    f"{tuple(self.clip_counts.shape)}"
                )
            self.tau = float(clip["tau"])
            self.clip_counts = clip["clip_counts"].clone().to(torch.int64)


def build_optimizer(
    model: nn.Module,
    kind: str = "muonclip",
    *,
    lr: float,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adjust_lr: str = "match_rms_adamw",
    ns_dtype: torch.dtype | None = None,
    tau: float = 100.0,
    router: str = "muon",
    check_finite: bool = True,
) -> MuonAdamW:
    """The optimizer for a K2 model; runs that compare optimizers differ only in ``kind``.

    kind:
        ``"muonclip"``  Muon for matrices + AdamW for the rest, then QK-Clip at ``tau`` (K2).
        ``"muon"``      the same without the clip (the max-logit explosion baseline).
        ``"adamw"``     AdamW for every parameter, same groups and hyperparameters (the baseline).
    All three take ``step(max_logits=...)``; only ``"muonclip"`` requires it.

    lr: the learning rate of every group (AdamW groups use ``adamw_lr`` when given).
    router: ``"muon"`` (default, Moonlight's split) or ``"adamw"``: which rule trains the router weight.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if router not in ("muon", "adamw"):
        raise ValueError(f"router must be 'muon' or 'adamw', got {router!r}")
    if adamw_lr is not None and not adamw_lr >= 0:
        raise ValueError(f"adamw_lr must be >= 0, got {adamw_lr!r}")
    roles = split_parameters(model)
    muon = kind != "adamw"
    use_muon = {"matrices": muon, "router": muon and router == "muon", "embeddings": False, "vectors": False}
    groups = []
    for role, named in roles.items():
        if not named:
            continue
        group: dict[str, Any] = {"params": named, "name": role, "use_muon": use_muon[role]}
        if not use_muon[role] and adamw_lr is not None:
            group["lr"] = adamw_lr
        if role == "vectors":
            group["weight_decay"] = 0.0
        groups.append(group)
    kwargs = dict(
        lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
        adjust_lr=adjust_lr, ns_dtype=ns_dtype, betas=betas, adamw_eps=adamw_eps, check_finite=check_finite,
    )
    if kind == "muonclip":
        return MuonClip(groups, model, tau=tau, **kwargs)
    return MuonAdamW(groups, **kwargs)
