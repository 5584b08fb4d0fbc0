"""MuonClip: Muon (+ AdamW for the rest), then QK-Clip on the heads whose max logit passed ``tau``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .max_logits import max_logit_metrics
from .muon_adamw import MuonAdamW
from .qk_clip import attention_modules, check_finite_max_logits, check_max_logits, check_tau, qk_clip_

__all__ = ["MuonClip"]


class MuonClip(MuonAdamW):
    """Muon (+ AdamW for the rest), then QK-Clip: K2's optimizer.

    Call ``opt.step(max_logits=out.telemetry.max_logits)`` with the max logits of the forward pass
    whose gradients are being applied. The step validates max_logits first (nothing changes on a bad
    shape or an inf/nan entry), runs Muon/AdamW, then ``qk_clip_(model, max_logits, tau)``.

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
        max_logits = check_finite_max_logits(check_max_logits(self.model, max_logits))  # before anything moves
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
