"""Notebook 07's checked claims: a model trained short reads long with YaRN and continued training.

Each argument maps a seed to a per-position loss (nats/byte): at the long length for an arm, and the
trained model at its own trained length for `short`. The gap of an arm is
`k2mini.lab.long_context.long_read_gap`: its mean loss past the trained length minus the trained
length's loss.
"""

from __future__ import annotations

from ..long_context import TRAINED_LEN, long_read_gap
from . import Verdict, claim


def _gaps(arm: dict, short: dict, trained_len: int) -> list[float]:
    return [long_read_gap(arm[s], short[s], trained_len) for s in sorted(short)]


def _same_seeds(name: str, short: dict, *arms: dict) -> None:
    if not short or any(set(a) != set(short) for a in arms):
        raise ValueError(f"{name}: every arm needs the same seeds as `short`")


@claim("07", control="the two arms made identical, or swapped, or a flat-loss (untrained) arm as the method")
def yarn_reads_long(method_long: dict, plain_long: dict, short: dict, margin: float = 0.3,
                    trained_len: int = TRAINED_LEN) -> Verdict:
    """YaRN with continued training reads 8x within `margin` nats of the trained length, where plain extrapolation does not.

    Holds when, in every seed, the method's gap <= margin < plain's gap. The margin of the verdict is
    the smaller of (margin - worst method gap) and (best plain gap - margin)."""
    _same_seeds("yarn_reads_long", short, method_long, plain_long)
    method, plain = _gaps(method_long, short, trained_len), _gaps(plain_long, short, trained_len)
    slack = min(margin - max(method), min(plain) - margin)
    return Verdict(f"YaRN + continued training reads within {margin:g} nats of the trained length, plain extrapolation"
                   " does not", slack > 0, slack,
                   f"gaps: method {[round(g, 3) for g in method]}, plain {[round(g, 3) for g in plain]} nats")


@claim("07", control="the two arms made identical or swapped, or one seed without the gap")
def yarn_beats_plain_after_continued(method_long: dict, other_long: dict, short: dict, margin: float = 0.05,
                                     trained_len: int = TRAINED_LEN) -> Verdict:
    """After the same continued training, YaRN's gap is below plain RoPE's by more than `margin` nats in every seed."""
    _same_seeds("yarn_beats_plain_after_continued", short, method_long, other_long)
    method, other = _gaps(method_long, short, trained_len), _gaps(other_long, short, trained_len)
    diffs = [o - m for m, o in zip(method, other)]
    return Verdict(f"after the same continued training, YaRN's gap is below plain RoPE's by > {margin:g} nats in every"
                   " seed", min(diffs) > margin, min(diffs) - margin,
                   f"differences {[round(d, 3) for d in diffs]} nats")
