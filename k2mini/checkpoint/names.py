"""Hugging Face tensor names <-> k2mini parameter names.

k2mini mirrors HF names one to one, except routed experts: HF stores
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` per expert, k2mini one stacked tensor
`model.layers.{i}.mlp.experts.{gate,up,down}_proj` of shape (E, out, in).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


SCALE_SUFFIX = "_scale_inv"
# The Linear weights K2 / DeepSeek-V3 publish in fp8: attention projections and every FFN matrix (dense,
# routed and shared experts). The router (`mlp.gate.weight`), norms, embeddings and lm_head are not.
FP8_WEIGHT_RE = re.compile(
    r"^model\.layers\.\d+\."
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def scale_name(weight_name: str) -> str:
    """`...q_a_proj.weight` -> `...q_a_proj.weight_scale_inv`."""
    return weight_name + SCALE_SUFFIX


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def is_fp8_quantized(hf_name: str) -> bool:
    """Whether an fp8 K2 checkpoint stores this tensor as float8 with a block scale."""
    return bool(FP8_WEIGHT_RE.match(hf_name))


def hf_tensor_names(k2_names, n_experts: int) -> list[tuple[str, str, int | None]]:
    """(hf_name, k2_name, expert index or None) for every HF tensor behind the given k2mini names."""
    out = []
    for name in k2_names:
        parts = hf_names_for(name, n_experts)
        stacked = STACKED_RE.match(name) is not None
        out.extend((hf, name, e if stacked else None) for e, hf in enumerate(parts))
    return out


def hf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of everything a checkpoint of `model` holds, in the model's order: each
    parameter (one expert's slice of a stacked one, a view sharing its storage) and the routers'
    correction biases. Detached: loading writes into these tensors, saving reads them."""
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    names = hf_tensor_names(tensors, model.config.n_routed_experts)
    return [(hf, tensors[name] if expert is None else tensors[name][expert]) for hf, name, expert in names]
