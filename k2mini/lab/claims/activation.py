"""Notebook 03's checked claims about a trained checkpoint's routing and about quantized storage.

Each takes figures the notebook computed (per-layer arrays, the quantization study's tables) and returns a
`Verdict`; the statistics of a trained model are judged against their controls (an untrained model on the
same tokens, a within-class split, routing redrawn independently per token, the quantization arms swapped
or a much coarser grid), never on their own.
"""

from __future__ import annotations

import numpy as np

from . import Verdict, claim

__all__ = ["domains_use_different_experts", "experts_pair_beyond_chance", "load_even_beyond_untrained",
           "bias_learned", "int4_moves_experts_further", "format_keeps_routing_and_loss",
           "int4_reroutes_fewer_in_first_layer"]


def _arr(x) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)


@claim("03", control="an untrained model on the same tokens, or the rows' prose / code labels shuffled")
def domains_use_different_experts(trained: dict, untrained: dict | None, factor: float = 2.0,
                                  excess: float = 0.05) -> Verdict:
    """Prose and code use different experts: in every MoE layer the JS divergence between the classes is over
    `factor` times that between two random halves of one class, and exceeds that within-class floor by at least
    `excess` bits more than an untrained model's does on the same tokens.

    trained, untrained: {"between": (L,), "within": (L,)} from `activation_controls.domain_divergences`
    (untrained None: no untrained model at this size; the first test alone decides).
    """
    b, w = _arr(trained["between"]), _arr(trained["within"])
    gap = b - w
    by_factor = b - factor * w  # > 0: beyond the sampling floor
    margins = [by_factor.min()]
    detail = (f"between {np.round(b, 3).tolist()} bits, within a class {np.round(w, 3).tolist()}")
    if untrained is not None:
        ub, uw = _arr(untrained["between"]), _arr(untrained["within"])
        over = gap - (ub - uw) - excess  # > 0: specialization beyond what token identity alone gives
        margins.append(over.min())
        detail += f"; untrained: between {np.round(ub, 3).tolist()}, within {np.round(uw, 3).tolist()}"
    margin = float(min(margins))
    return Verdict("prose and code use different experts, beyond the within-class split and the untrained model",
                   margin > 0, margin, detail)


@claim("03", control="routing redrawn per token with the same loads (independent choices), or an untrained model")
def experts_pair_beyond_chance(observed: tuple, null: tuple, untrained: tuple | None = None,
                               untrained_null: tuple | None = None, never_gap: float = 0.25,
                               lift_factor: float = 3.0) -> Verdict:
    """Experts form teams beyond what their loads explain: in every MoE layer, at least `never_gap` more of the
    expert pairs never meet than when every token draws its experts independently with the same loads, the
    strongest pair (>= 20 tokens together) meets over `lift_factor` times as often above chance as the
    null's strongest, and (given the untrained model on the same tokens and its own null) the excess of
    never-meeting pairs over the null is at least `never_gap` larger than the untrained model's.

    observed, null, untrained, untrained_null: (never, strongest lift), each (L,), from
    `activation_controls.coactivation_figures`.
    """
    on, ol = map(_arr, observed)
    nn, nl = map(_arr, null)
    excess = on - nn
    parts = [(excess - never_gap).min(), np.nanmin(np.log(ol / (lift_factor * nl)))]  # log-ratio > 0 beyond it
    detail = (f"never met {np.round(on, 3).tolist()} vs null {np.round(nn, 3).tolist()}; strongest lift "
              f"{np.round(ol, 1).tolist()} vs null {np.round(nl, 2).tolist()}")
    if untrained is not None:
        un, ul = map(_arr, untrained)
        unn, _ = map(_arr, untrained_null)
        parts.append((excess - (un - unn) - never_gap).min())
        detail += (f"; untrained: never met {np.round(un, 3).tolist()} vs its null {np.round(unn, 3).tolist()}, "
                   f"strongest lift {np.round(ul, 1).tolist()}")
    ok = all(np.isfinite(p) and p > 0 for p in parts)
    margin = float(min(p if np.isfinite(p) else -np.inf for p in parts))
    return Verdict("experts pair up beyond what their loads explain, and beyond the untrained router", ok, margin,
                   detail)


@claim("03", control="an untrained model on the same tokens")
def load_even_beyond_untrained(trained: dict, untrained: dict, max_unused: int = 2, min_entropy: float = 0.9,
                               hottest: tuple = (1.5, 5.0)) -> Verdict:
    """The balanced router uses its experts evenly: in every MoE layer at most `max_unused` experts go
    without a token, the load entropy is at least `min_entropy` of log E and the hottest expert takes between
    `hottest` times the uniform share, where the untrained router on the same tokens fails at least one.

    trained, untrained: {"unused": (L,), "load_entropy": (L,), "hottest_over_uniform": (L,)}.
    """

    def slack(d):
        u, h, x = _arr(d["unused"]), _arr(d["load_entropy"]), _arr(d["hottest_over_uniform"])
        # each term > 0 inside its bound; entropy and share in their own units, unused in experts / E-ish
        return min((max_unused + 0.5 - u).min() / (max_unused + 0.5), (h - min_entropy).min() / (1 - min_entropy),
                   np.log(x / hottest[0]).min(), np.log(hottest[1] / x).min())

    st, su = slack(trained), slack(untrained)
    margin = float(min(st, -su))
    return Verdict("the trained router uses its experts evenly (few unused, entropy high, hottest a few times "
                   "uniform) where the untrained router on the same tokens does not", margin > 0, margin,
                   f"trained: unused {_arr(trained['unused']).astype(int).tolist()}, load entropy "
                   f"{np.round(_arr(trained['load_entropy']), 3).tolist()}, hottest x uniform "
                   f"{np.round(_arr(trained['hottest_over_uniform']), 2).tolist()}; untrained: unused "
                   f"{_arr(untrained['unused']).astype(int).tolist()}, load entropy "
                   f"{np.round(_arr(untrained['load_entropy']), 3).tolist()}, hottest x uniform "
                   f"{np.round(_arr(untrained['hottest_over_uniform']), 2).tolist()}")


@claim("03", control="an untrained model's biases (all zero)")
def bias_learned(offset, spread, min_offset: float = 0.1) -> Verdict:
    """The loss-free rule left its mark on the biases: every MoE layer's correction bias carries a shared
    positive offset (layer mean > `min_offset`), and the last MoE layer's centred bias spreads widest.

    offset, spread: (L,) per MoE layer: the bias mean and the standard deviation of the centred bias.
    """
    o, s = _arr(offset), _arr(spread)
    m_off = (o - min_offset).min()
    m_last = s[-1] - s[:-1].max() if len(s) > 1 else 0.0
    margin = float(min(m_off, m_last))
    return Verdict("every layer's bias shares a positive offset, and the last MoE layer's spreads widest",
                   m_off > 0 and m_last > 0, margin,
                   f"offset {np.round(o, 3).tolist()}, centred std {np.round(s, 3).tolist()}")


@claim("03", control="the two formats swapped")
def int4_moves_experts_further(int4_error, fp8_error, lo: float = 2.5, hi: float = 5.0) -> Verdict:
    """INT4 (K2-Thinking's experts) moves every routed expert between `lo` and `hi` times as far as fp8 (K2's):
    relative Frobenius error per expert, ratio taken expert by expert."""
    r = _arr(int4_error) / _arr(fp8_error)
    margin = float(min(np.log(r.min() / lo), np.log(hi / r.max())))
    return Verdict(f"INT4 moves every expert {lo:g}x to {hi:g}x as far as fp8", margin > 0, margin,
                   f"ratio {r.min():.2f} to {r.max():.2f} over {r.size} experts (log-margin)")


@claim("03", control="the routed experts rounded to a 2-bit grid, or removed (the routing bound fails on both, "
                     "the loss bound at the mini's scale only on removal)")
def format_keeps_routing_and_loss(changed, loss_change, max_changed: float = 0.10,
                                  max_loss: float = 0.01, name: str = "the format") -> Verdict:
    """A storage format is harmless to routing and loss: in every MoE layer fewer than `max_changed` of the
    tokens change their top-k set, and the loss moves by less than `max_loss` nats.

    changed: (L,) share of tokens whose top-k set differs from the unquantized model's; loss_change: nats.
    """
    c = _arr(changed)
    m = min((max_changed - c.max()) / max_changed, (max_loss - abs(float(loss_change))) / max_loss)
    return Verdict(f"{name} reroutes fewer than {max_changed:.0%} of the tokens per layer and moves the loss "
                   f"less than {max_loss:g} nats", m > 0, float(m),
                   f"rerouted {np.round(c, 4).tolist()}, loss change {float(loss_change):+.5f} nats "
                   "(margin relative to the bounds)")


@claim("03", control="the two formats swapped")
def int4_reroutes_fewer_in_first_layer(int4_changed: float, fp8_changed: float) -> Verdict:
    """In the first MoE layer INT4 changes fewer routing decisions than fp8 (whose attention and dense layers
    before it are quantized too, where INT4 keeps them in bf16)."""
    margin = float(fp8_changed - int4_changed)
    return Verdict("in the first MoE layer INT4 reroutes fewer tokens than fp8", margin > 0, margin,
                   f"INT4 {int4_changed:.4f}, fp8 {fp8_changed:.4f} of the tokens")
