"""What quantization does to a K2 model: the same trained weights stored as Kimi-K2 publishes them (fp8
blocks on every Linear) and as Kimi-K2-Thinking does (INT4 routed experts, the rest bf16), against the
unquantized weights, on the same tokens.

    study = quantization_study({"float32": ref, "fp8": m8, "int4": m4}, token_ids)

`study.expert_error` (per layer and expert), `study.routing` (per layer), `study.max_logits` (per layer)
and `study.summary` (per format) are DataFrames; every comparison is against the first model given.

The controls beside the formats, each a copy of a model with only its routed experts changed:
`round_experts(model, bits)` (symmetric round-to-nearest, one scale per group of columns: bits=4 is
INT4's grid, bits=2 a much coarser one that must show what harm looks like), and
`perturb_experts(model, errors)` (each expert moved by the same relative amount as a given format
moved it, in a random direction), and `zero_experts(model)` (no routed experts at all: their whole
contribution).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from einops import rearrange

from ..checkpoint import CheckpointReader

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


def stored_bytes(source) -> dict[str, int]:
    """Bytes a checkpoint stores for its routed experts (packed words, scales and shapes included) and
    for everything else, from the shard headers alone."""

    out = {"experts": 0, "other": 0}
    with CheckpointReader(source) as reader:
        for name in reader.stored_keys():
            out["experts" if ROUTED_EXPERT.search(name) else "other"] += reader.info(name).nbytes
    return out


@dataclass
class QuantizationStudy:
    expert_error: pd.DataFrame  # (layer, expert) -> per format: ||W_q - W|| / ||W||, three matrices together
    routing: pd.DataFrame  # layer -> per format: share of tokens whose top-k set changed, mean overlap / k
    max_logits: pd.DataFrame  # layer -> per model: the largest attention logit over heads and tokens
    summary: pd.DataFrame  # format -> loss, loss_change, max_logit_change, output_logit_change, routing


def expert_errors(reference, model) -> pd.DataFrame:
    """Relative Frobenius error of each routed expert (its three matrices together), per MoE layer."""
    rows = []
    for ref_layer, layer in zip(reference.moe_layers(), model.moe_layers()):
        num = den = 0
        for p in PROJECTIONS:
            w = getattr(ref_layer.mlp.experts, p).detach().double()  # (E, out, in)
            d = getattr(layer.mlp.experts, p).detach().double() - w
            num = num + d.pow(2).sum((1, 2))
            den = den + w.pow(2).sum((1, 2))
        err = (num / den).sqrt()
        rows += [{"layer": ref_layer.index, "expert": e, "error": float(v)} for e, v in enumerate(err)]
    return pd.DataFrame(rows).set_index(["layer", "expert"])["error"]


def topk_overlap(a: torch.Tensor, b: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(..., k) expert choices, two routings of the same tokens -> (...) experts chosen by both."""
    both = F.one_hot(a, n_experts).sum(-2) * F.one_hot(b, n_experts).sum(-2)  # (..., E): 1 where both chose
    return both.sum(-1)


def routing_changes(reference, telemetry, n_experts: int) -> pd.DataFrame:
    """Per MoE layer: the share of tokens whose top-k set differs from the reference's, and the mean
    per-token overlap |S ∩ S_ref| / k (1: the same experts)."""
    rows = []
    for r, q in zip(reference.routers, telemetry.routers):
        k = r.indices.shape[-1]
        overlap = topk_overlap(r.indices, q.indices, n_experts)  # (B, T)
        rows.append({"layer": r.layer, "changed": float((overlap < k).double().mean()),
                     "overlap": float(overlap.double().mean() / k)})
    return pd.DataFrame(rows).set_index("layer")


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of predicting ids[:, 1:] from logits[:, :-1]."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()))


@torch.no_grad()
def quantization_study(models: dict, token_ids: torch.Tensor) -> QuantizationStudy:
    """Compare every model with the first (the unquantized reference) on the same tokens (B, T)."""
    names = list(models)
    ref_name, reference = names[0], models[names[0]]
    E = reference.config.n_routed_experts
    outputs = {n: m(token_ids, telemetry=True) for n, m in models.items()}
    ref_out = outputs[ref_name]
    errors, routing, summary = {}, {}, {}
    max_logits = pd.DataFrame({n: o.telemetry.max_logits.amax(-1).numpy() for n, o in outputs.items()})
    max_logits.index.name = "layer"
    ref_loss = next_token_loss(ref_out.logits, token_ids)
    for n in names[1:]:
        out = outputs[n]
        errors[n] = expert_errors(reference, models[n])
        r = routing_changes(ref_out.telemetry, out.telemetry, E)
        routing[(n, "changed")], routing[(n, "overlap")] = r["changed"], r["overlap"]
        loss = next_token_loss(out.logits, token_ids)
        summary[n] = {
            "loss": loss,
            "loss_change": loss - ref_loss,
            "max_logit_change": float((out.telemetry.max_logits - ref_out.telemetry.max_logits).abs().max()),
            "output_logit_change": float((out.logits - ref_out.logits).abs().max()),
            "tokens_rerouted": float(r["changed"].mean()),
            "expert_error_mean": float(errors[n].mean()),
        }
    summary = pd.DataFrame(summary).T
    summary.loc[ref_name] = {"loss": ref_loss, "loss_change": 0.0, "max_logit_change": 0.0, "output_logit_change": 0.0,
                             "tokens_rerouted": 0.0, "expert_error_mean": 0.0}
    summary = summary.loc[names]
    summary.index.name = "format"
    return QuantizationStudy(pd.DataFrame(errors), pd.DataFrame(routing), max_logits, summary)


def _int_round(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """w (..., out, in) rounded to a symmetric integer grid q * s, q in [-2^(bits-1), 2^(bits-1) - 1], one
    scale per `group_size` columns (absmax / (2^(bits-1) - 1), as compressed-tensors' minmax observer)."""

    if bits < 2:
        raise ValueError(f"bits must be >= 2 (a sign and a magnitude), got {bits}")
    if w.shape[-1] % group_size:
        raise ValueError(f"the input width {w.shape[-1]} is not a multiple of group_size {group_size}")
    qmax = 2 ** (bits - 1) - 1
    g = rearrange(w, "... (n g) -> ... n g", g=group_size)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    q = (g / scale).round().clamp(-qmax - 1, qmax)
    return rearrange(q * scale, "... n g -> ... (n g)")


@torch.no_grad()
def round_experts(model, bits: int, group_size: int = 32):
    """A copy of `model` whose routed experts are rounded to `bits`-bit integers per `group_size` columns
    (bits=4, group_size=32: the grid of K2-Thinking's INT4 experts); everything else unchanged."""
    out = copy.deepcopy(model)
    for layer in out.moe_layers():
        for p in PROJECTIONS:
            w = getattr(layer.mlp.experts, p)
            w.copy_(_int_round(w.detach(), bits, group_size))
    return out


@torch.no_grad()
def perturb_experts(model, errors: pd.Series, seed: int = 0):
    """A copy of `model` whose routed expert (layer, e) is moved by errors[(layer, e)] * ||W|| (its three
    matrices together, as `expert_errors` measures) in a random Gaussian direction: the same size of change
    as a format's rounding, without its structure."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for layer in out.moe_layers():
        mats = [getattr(layer.mlp.experts, p) for p in PROJECTIONS]  # each (E, out, in)
        noise = [torch.randn(m.shape, generator=gen, dtype=torch.float64) for m in mats]
        w_norm = sum(m.double().pow(2).sum((1, 2)) for m in mats).sqrt()  # (E,)
        n_norm = sum(n.pow(2).sum((1, 2)) for n in noise).sqrt()
        target = torch.tensor([errors[(layer.index, e)] for e in range(mats[0].shape[0])], dtype=torch.float64)
        factor = (target * w_norm / n_norm)[:, None, None]
        for m, n in zip(mats, noise):
            m.add_((n * factor).to(m.dtype))
    return out


@torch.no_grad()
def zero_experts(model):
    """A copy of `model` without its routed experts (every expert matrix zero): the whole contribution the
    experts make, the largest change a storage format of the experts could do."""
    out = copy.deepcopy(model)
    for layer in out.moe_layers():
        for p in PROJECTIONS:
            getattr(layer.mlp.experts, p).zero_()
    return out
