"""Parameter and checkpoint-byte accounting by component: what a token activates, what a file holds.

`active_share(config)` is the per-component view of `K2Config.param_breakdown()` (docs/K2_FACTS.md section 1's
convention). `layout_bytes(config)` sizes every tensor of the HF checkpoint layout (section 2) as K2
publishes it: fp8 attention and FFN matrices with float32 128x128 block scales, bf16 for the rest, the
router's correction bias in float32. The static router summary reads only the "router" row of it.
"""

from __future__ import annotations

import math
import re

import torch

from ..checkpoint.fp8 import scale_shape
from ..checkpoint.names import hf_tensors, is_fp8_quantized
from ..config import K2Config

COMPONENTS = ("embedding", "lm_head", "attention", "norms", "dense_ffn", "router", "shared_experts", "routed_experts")

_COMPONENT_RES = (
    ("router", re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")),
    ("routed_experts", re.compile(r"\.mlp\.experts\.")),
    ("shared_experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("dense_ffn", re.compile(r"\.mlp\.(gate|up|down)_proj\.weight$")),
    ("norms", re.compile(r"norm\.weight$")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("embedding", re.compile(r"^model\.embed_tokens\.")),
    ("lm_head", re.compile(r"^lm_head\.")),
)


def component_of(hf_name: str) -> str:
    """Which component of the model a HF tensor name belongs to (one of COMPONENTS)."""
    for component, pattern in _COMPONENT_RES:
        if pattern.search(hf_name):
            return component
    raise ValueError(f"component_of: {hf_name!r} is not a tensor of the DeepseekV3 layout")


def active_share(config: K2Config):
    """pandas DataFrame, one row per component plus "total": parameters, active per token, and share."""
    import pandas as pd

    b = config.param_breakdown()
    rows = [(c, b["total"][c], b["active"][c]) for c in COMPONENTS if b["total"][c]]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    df = pd.DataFrame(rows, columns=["component", "total", "active"]).set_index("component")
    df["active_share"] = df["active"] / df["total"]
    return df


def hf_tensor_shapes(config: K2Config) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of the checkpoint layout, in the model's order (no I/O)."""
    from ..model import K2ForCausalLM

    with torch.device("meta"):
        model = K2ForCausalLM(config)
    return [(hf, tuple(t.shape)) for hf, t in hf_tensors(model)]


def layout_bytes(config: K2Config, fp8: bool = True, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of tensor data per component in the HF layout, as K2 publishes it (fp8=True) or unquantized.

    fp8: attention and FFN matrices are 1 byte per weight plus a float32 scale per 128x128 block;
    everything else is `dtype` (K2: bf16), except the correction bias (float32). Headers and the JSON
    files are not counted (they are a few MB at K2's size).
    """
    out = dict.fromkeys(COMPONENTS, 0)
    for hf, shape in hf_tensor_shapes(config):
        n = math.prod(shape)
        if fp8 and is_fp8_quantized(hf):
            size = n + 4 * math.prod(scale_shape(shape))
        elif hf.endswith("e_score_correction_bias"):
            size = 4 * n
        else:
            size = n * dtype.itemsize
        out[component_of(hf)] += size
    return out
