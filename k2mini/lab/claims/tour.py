"""The claims of notebooks 00 (the tour) and 01 (MLA), each with the control that makes it False.

Most of what these notebooks check is exact (parameter counts, cache sizes, parity of two forms of
the same computation) and stays an exact check in the notebook. What is measured is here: where an
untrained router's uneven loads come from (00), and what the absorbed form buys per decoded token (01).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import Verdict, claim

__all__ = ["text_leaves_experts_unused", "absorbed_decode_faster"]


@claim("00", control="uniformly random bytes in place of the text (both arms the same kind of input)")
def text_leaves_experts_unused(unused_text: Sequence[int], unused_random: Sequence[int]) -> Verdict:
    """An untrained router leaves more experts unused on text than on random bytes, in every MoE layer.

    Its uneven loads come from the text's few, repeated bytes, not from learning. Arguments: experts with no token-slot per MoE layer, for the text and for the random
    bytes (same model, same number of tokens). The margin is the smallest per-layer difference (experts)."""
    a, b = np.asarray(unused_text), np.asarray(unused_random)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"one count per MoE layer for both inputs, got {a.shape} and {b.shape}")
    margin = float((a - b).min())
    return Verdict("an untrained router leaves more experts unused on text than on random bytes, in every MoE layer",
                   margin > 0, margin, f"unused experts per layer: text {a.tolist()}, random bytes {b.tolist()}")


@claim("01", control="the naive form timed against itself (the two arms identical), or the arms swapped")
def absorbed_decode_faster(contexts: Sequence[int], naive_s: Sequence[float], absorbed_s: Sequence[float], *,
                           min_speedup: float = 2.0) -> Verdict:  # fmt: skip
    """Absorbed decoding is >= `min_speedup` x as fast as naive at the longest context, and its lead grows.

    The naive / absorbed time ratio is larger at the longest context than at the shortest (the naive
    step's cost grows with the cached positions faster). Times in seconds, one per context. The margin is the
    speed-up at the longest context minus `min_speedup`."""
    c, n, a = np.asarray(contexts), np.asarray(naive_s, dtype=float), np.asarray(absorbed_s, dtype=float)
    if not (len(c) == len(n) == len(a) >= 2) or (n <= 0).any() or (a <= 0).any():
        raise ValueError("one positive time per context for each form, at >= 2 contexts")
    order = np.argsort(c)
    ratio = n[order] / a[order]
    margin = float(ratio[-1] - min_speedup)
    holds = margin >= 0 and ratio[-1] > ratio[0]
    return Verdict(f"absorbed decoding >= {min_speedup:g}x as fast as naive at {int(c[order][-1]):,} positions, and "
                   f"its advantage grows with the context", bool(holds), margin,
                   f"naive / absorbed {ratio[0]:.2f}x at {int(c[order][0]):,}, {ratio[-1]:.2f}x at {int(c[order][-1]):,}")  # fmt: skip
