"""Static analysis from the weights alone: what the routers and their correction biases look like.

`router_summary(source)` reads, per MoE layer, only the router matrix `mlp.gate.weight` (E, hidden) and
its `e_score_correction_bias` (E,): for Kimi-K2 about 0.03% of the checkpoint's bytes, so the remote
summary of a 1 TB checkpoint fetches ~330 MB. With `experts=True` it also reads every routed expert,
dequantized, one at a time, for their weight norms: that is the whole checkpoint, so it is opt-in.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint.names import expert_hf_name
from .source import checkpoint_bytes, checkpoint_config, open_reader, resolve_layers
from .routing_stats import centred, cosine_matrix, off_diagonal


def router_names(layer: int) -> tuple[str, str]:
    """HF names of a MoE layer's router matrix and correction bias."""
    return f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


def router_stats(gate_weight: torch.Tensor, correction_bias: torch.Tensor, top: int = 5) -> dict:
    """One layer's summary from its router (E, hidden) and correction bias (E,): pure, no I/O.

    The bias is reported centred (minus the layer mean, `bias_offset`): a common offset changes no
    routing decision. `bias_favoured` lists the experts the bias pushes hardest, strongest first.
    """
    b = centred(correction_bias)
    norms = gate_weight.to(torch.float64).norm(dim=-1)
    cos = off_diagonal(cosine_matrix(gate_weight)) if gate_weight.shape[0] > 1 else torch.zeros(1)
    favoured = torch.argsort(b, descending=True, stable=True)[:top]
    return {
        "n_experts": int(gate_weight.shape[0]),
        "bias_offset": float(correction_bias.to(torch.float64).mean()),
        "bias_std": float(b.std(correction=0)),
        "bias_min": float(b.min()),
        "bias_max": float(b.max()),
        "bias_favoured": favoured.tolist(),
        "router_norm_mean": float(norms.mean()),
        "router_norm_min": float(norms.min()),
        "router_norm_max": float(norms.max()),
        "router_cos_mean": float(cos.mean()),
        "router_cos_max": float(cos.max()),
        "bias_centred": b.numpy(),
        "router_norms": norms.numpy(),
    }


def expert_norms(reader, layer: int, n_experts: int) -> np.ndarray:
    """Frobenius norm of each routed expert's three matrices together (E,), dequantized, one at a time."""
    out = np.empty(n_experts)
    for e in range(n_experts):
        sq = 0.0
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = reader.get(expert_hf_name(layer, e, proj), torch.float32)
            sq += float(w.double().pow(2).sum())
            del w
        out[e] = sq**0.5
    return out


def router_summary(source, layers=None, experts: bool = False, top: int = 5, progress: bool = True, fs=None):
    """pandas DataFrame, one row per MoE layer, of the routers and correction biases of a checkpoint.

    source: a checkpoint directory, `hf://owner/repo`, an http(s) URL, or an open CheckpointReader.
    layers: restrict to these layers (None: every MoE layer; dense layers in a selection are skipped).
    experts: also read every routed expert (dequantized, one at a time) for per-expert weight norms
        (columns `expert_norm_*` and the array column `expert_norms`). This reads nearly all bytes.
    Columns: bias_offset (layer mean of the bias), bias_std / bias_min / bias_max of the CENTRED bias,
    bias_favoured (expert ids, most favoured first), router_norm_{mean,min,max}, router_cos_{mean,max}
    (pairwise cosine similarity of router vectors, off-diagonal), and the per-expert arrays
    bias_centred and router_norms. `df.attrs` holds source, bytes_read (JSON files and shard headers included), router_bytes (the
    router tensors alone), checkpoint_bytes and read_fraction.
    """
    import pandas as pd

    reader, own = open_reader(source, fs)
    try:
        config = checkpoint_config(reader)
        chosen = resolve_layers(config, layers, moe_only=True)
        E, H = config.n_routed_experts, config.hidden_size
        router_bytes = 0
        for i in chosen:  # every shape and dtype checked before any tensor data is read
            w_name, b_name = router_names(i)
            router_bytes += reader.check(w_name, shape=(E, H), floating=True).nbytes
            router_bytes += reader.check(b_name, shape=(E,), floating=True).nbytes
        rows = []
        for i in tqdm(chosen, desc="routers", unit="layer", disable=not progress):
            w_name, b_name = router_names(i)
            row = {"layer": i, **router_stats(reader.get(w_name), reader.get(b_name), top)}
            if experts:
                norms = expert_norms(reader, i, E)
                row.update(
                    expert_norm_mean=float(norms.mean()),
                    expert_norm_std=float(norms.std()),
                    expert_norm_min=float(norms.min()),
                    expert_norm_max=float(norms.max()),
                    expert_norms=norms,
                )
            rows.append(row)
        df = pd.DataFrame(rows).set_index("layer")
        total = checkpoint_bytes(reader)
        df.attrs.update(
            source=str(reader.source),
            bytes_read=reader.bytes_read,
            router_bytes=router_bytes,
            checkpoint_bytes=total,
            read_fraction=reader.bytes_read / total if total else float("nan"),
            experts_read=experts,
        )
        return df
    finally:
        if own:
            reader.close()
