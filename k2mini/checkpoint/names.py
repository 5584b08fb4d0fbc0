"""Hugging Face tensor names <-> k2mini parameter names.

k2mini mirrors HF names one to one, except routed experts: HF stores
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` per expert, k2mini one stacked tensor
`model.layers.{i}.mlp.experts.{gate,up,down}_proj` of shape (E, out, in).
"""

from __future__ import annotations

import re

EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
STACKED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def expert_hf_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def hf_names_for(name: str, n_experts: int) -> list[str]:
    """HF tensors that make up k2mini tensor `name` (several for a stacked expert tensor)."""
    m = STACKED_RE.match(name)
    if m:
        layer, proj = int(m.group(1)), m.group(2)
        return [expert_hf_name(layer, e, proj) for e in range(n_experts)]
    return [name]


def is_ignored(hf_name: str, num_hidden_layers: int) -> bool:
    """Keys a loader skips: rotary caches and layers past the model (DeepSeek-V3's MTP layer)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True
    m = LAYER_RE.match(hf_name)
    return bool(m) and int(m.group(1)) >= num_hidden_layers


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None
