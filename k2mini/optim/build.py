"""build_optimizer: which parameters get Muon, which get AdamW, and the optimizer that steps them all.

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

from typing import Any

from torch import nn

from .muon_adamw import MuonAdamW
from .muon_clip import MuonClip

__all__ = ["build_optimizer", "split_parameters", "KINDS", "ROLES"]

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


def build_optimizer(
    model: nn.Module,
    kind: str = "muonclip",
    *,
    lr: float,
    adamw_lr: float | None = None,
    tau: float = 100.0,
    router: str = "muon",
    **settings: Any,
) -> MuonAdamW:
    """The optimizer for a K2 model; runs that compare optimizers differ only in ``kind``.

    kind:
        ``"muonclip"``  Muon for matrices + AdamW for the rest, then QK-Clip at ``tau`` (K2).
        ``"muon"``      the same without the clip (the max-logit explosion baseline).
        ``"adamw"``     AdamW for every parameter, same groups and hyperparameters (the baseline).
    All three take ``step(max_logits=...)``; only ``"muonclip"`` requires it.

    lr: the learning rate of every group (AdamW groups use ``adamw_lr`` when given).
    router: ``"muon"`` (default, Moonlight's split) or ``"adamw"``: which rule trains the router weight.
    settings: MuonAdamW's keywords: ``weight_decay`` (0.1; the vectors get none), ``betas``,
        ``adamw_eps``, ``check_finite``, and the ``MuonSettings`` (momentum, nesterov, ns_steps,
        adjust_lr, ns_dtype, eps).
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
    if kind == "muonclip":
        return MuonClip(groups, model, tau=tau, lr=lr, **settings)
    return MuonAdamW(groups, lr=lr, **settings)
