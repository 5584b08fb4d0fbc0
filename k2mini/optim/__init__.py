"""Muon, QK-Clip and MuonClip: the optimizer side of K2.

    opt = build_optimizer(model, "muonclip", lr=2e-3)     # or "muon", "adamw": runs differ in one name
    out = model(input_ids, telemetry=True)
    loss.backward()
    opt.step(max_logits=out.telemetry.max_logits)          # Muon/AdamW step, then QK-Clip
    opt.zero_grad(); opt.last_metrics                      # update RMS per group, max logits, heads clipped

    newton_schulz.py  the orthogonalization          muon.py        Muon (2-D weights, stacked experts);
                                                                    MuonSettings, its hyperparameters, once
    qk_clip.py        QK-Clip on the attention heads  muon_adamw.py  MuonAdamW: Muon + AdamW groups in one
    max_logits.py     TakesMaxLogits (step takes      muon_clip.py   MuonClip: MuonAdamW, then QK-Clip
                      max_logits), their metrics     build.py       split_parameters, build_optimizer, KINDS
"""

from .build import KINDS, build_optimizer, split_parameters
from .max_logits import TakesMaxLogits
from .muon import Muon, MuonSettings, NonFiniteGradientError, adjusted_lr
from .muon_adamw import MuonAdamW
from .muon_clip import MuonClip
from .newton_schulz import NS_COEFFICIENTS, default_ns_dtype, newton_schulz, ns_singular_value_map
from .qk_clip import attention_modules, clip_factors, qk_clip_

__all__ = [
    "Muon",
    "MuonAdamW",
    "MuonClip",
    "MuonSettings",
    "NonFiniteGradientError",
    "build_optimizer",
    "split_parameters",
    "KINDS",
    "TakesMaxLogits",
    "newton_schulz",
    "ns_singular_value_map",
    "NS_COEFFICIENTS",
    "default_ns_dtype",
    "adjusted_lr",
    "qk_clip_",
    "clip_factors",
    "attention_modules",
]
