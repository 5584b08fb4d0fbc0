"""Expert-parallel dispatch and combine as a diagram, drawn from a K2Config so that every label is that
config's size.

Every rank routes its own tokens with the same (replicated) router; its token-slots, sorted by expert,
travel in one all-to-all to the ranks that hold those experts (dispatch); each rank runs its E/d experts
on what it received; a second all-to-all sends the results back (combine), where each token's k results
are weighted and summed. Slots whose expert lives on the token's own rank never leave it.
"""

from __future__ import annotations

from functools import partial

from ...config import K2Config
from .shapes import arrow, box, canvas

TOKEN_COLOR = "#dbe8f5"  # where a token lives: routing, weighting, summing
EXPERT_COLOR = "#fbe3c8"  # where an expert lives
DISPATCH, COMBINE, HOME = "tab:blue", "tab:orange", "0.45"


_box = partial(box, h=1.1, size=7)


def _arrow(ax, a, b, color, ls="-", lw=1.0):
    arrow(ax, a, b, color=color, lw=lw, ls=ls, shrink=2)


def draw_dispatch(config: K2Config, degree: int = 4, ax=None):
    """One MoE layer of `config` split over `degree` ranks: route, dispatch, experts, combine. -> Figure.

    At most four ranks are drawn (the first two and the last two, with the rest elided).
    """
    c = config
    E, k, H, I = c.n_routed_experts, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size
    if degree < 1 or E % degree:
        raise ValueError(f"draw_dispatch: degree must divide n_routed_experts={E} (got {degree})")
    n_local = E // degree
    shown = list(range(degree)) if degree <= 4 else [0, 1, degree - 2, degree - 1]
    width = 12.8  # drawing units; the labels of the all-to-alls sit left of the first rank
    ax = canvas(ax, (12, 6.2), (0, width), (0, 7.4))
    if len(shown) < degree:  # a gap in the middle for the elided ranks
        xs = [2.4, 4.9, 9.0, 11.5]
    elif len(shown) > 1:
        xs = [2.4 + i * 9.1 / (len(shown) - 1) for i in range(len(shown))]
    else:
        xs = [6.95]
    w = 2.3
    top, mid, bottom = 6.0, 3.6, 1.2
    for x, r in zip(xs, shown):
        first, last = r * n_local, (r + 1) * n_local - 1
        _box(ax, (x, top), f"rank {r}: tokens (T, {H})\nroute: top-{k} of {E}\nsort its T x {k} slots\nby expert",
             TOKEN_COLOR, w)
        _box(ax, (x, mid), f"experts {first}..{last} ({n_local} of {E})\nSwiGLU {H} -> {I} -> {H}\n"
             "on the rows received", EXPERT_COLOR, w)
        _box(ax, (x, bottom), f"rank {r}: weight each\nslot by $g_{{t,i}}$, sum each\ntoken's {k} slots: (T, {H})",
             TOKEN_COLOR, w)
    for i, xa in enumerate(xs):  # dispatch: every rank to every rank; combine: the mirror image
        for j, xb in enumerate(xs):
            home, dx = i == j, 0.12 * (j - i) / max(len(shown) - 1, 1)
            style = dict(ls=":" if home else "-", lw=0.8)
            _arrow(ax, (xa + dx, top - 0.58), (xb - dx, mid + 0.58), HOME if home else DISPATCH, **style)
            _arrow(ax, (xb + dx, mid - 0.58), (xa - dx, bottom + 0.58), HOME if home else COMBINE, **style)
    if len(shown) < degree:
        for y in (top, mid, bottom):
            ax.text((xs[1] + xs[2]) / 2, y, f"... {degree - 4} more\nranks ...", ha="center", va="center",
                    fontsize=8, bbox=dict(fc="white", ec="none"))
    ax.text(0.05, (top + mid) / 2 + 0.1, f"dispatch (all-to-all):\nrows of {H}\nnumbers, one\nper token-slot",
            fontsize=7.5, color=DISPATCH, va="center")
    ax.text(0.05, (mid + bottom) / 2, f"combine (all-to-all):\nthe results\n({H} numbers)\nback to their\ntokens",
            fontsize=7.5, color=COMBINE, va="center")
    ax.text(6.95, 0.25, f"dotted: slots whose expert is on the token's own rank stay home; "
            f"a fraction ({degree} - 1)/{degree} leaves under even routing", ha="center", fontsize=7.5, color=HOME)
    ax.set_title(f"Expert parallelism: {E} routed experts over {degree} ranks ({n_local} each), top-{k}, hidden {H}",
                 fontsize=10)
    return ax.figure
