"""K2's router as a diagram, drawn from a K2Config so that every label is that config's size.

Score every expert with a sigmoid; add the correction bias for the choice only; with expert groups keep
the best groups first; take the top k; weight the chosen experts by their unbiased scores, normalized and
scaled; add the shared expert, which every token passes through.
"""

from __future__ import annotations

from functools import partial

from ...config import K2Config
from .shapes import arrow, box, canvas

CHOICE_COLOR = "#e9dcf2"  # where the bias acts: which experts, never how much
WEIGHT_COLOR = "#dbe8f5"  # from the unbiased scores


_box = partial(box, w=2.6, h=0.7)
_arrow = partial(arrow, offset=(0.08, 0.05), va="baseline")


def draw_routing(config: K2Config, ax=None):
    """One MoE layer's routing of `config`: scores, bias for the choice, group limit, top-k, weights. -> Figure."""
    c = config
    E, k, G, kg = c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group
    ax = canvas(ax, (10, 5.2), (0, 11), (0, 6.6))

    _box(ax, (1.5, 5.8), f"token $x_t$\nhidden {c.hidden_size}", "white", w=2.2)
    _box(ax, (1.5, 4.3), f"scores $s_{{t,i}} = \\sigma(w_i \\cdot x_t)$\n{E} experts, each in (0, 1)", WEIGHT_COLOR,
         w=2.8)
    _arrow(ax, (1.5, 5.45), (1.5, 4.65), f"router weight {E} x {c.hidden_size}")

    # the choice: biased scores, group limit, top-k
    _box(ax, (5.0, 4.3), f"$s_{{t,i}} + b_i$\ncorrection bias b: {E}, no gradient", CHOICE_COLOR, w=2.8)
    _arrow(ax, (2.9, 4.3), (3.6, 4.3))
    if G > 1:
        group_text = (f"group limit: {G} groups of {E // G};\nkeep the best {kg} (sum of each group's top 2)")
    else:
        group_text = "group limit: off\n(n_group = 1, one group of all experts)"
    _box(ax, (5.0, 2.8), group_text, CHOICE_COLOR, w=3.2)
    _arrow(ax, (5.0, 3.95), (5.0, 3.15))
    _box(ax, (5.0, 1.3), f"top-{k} of {E}\nthe chosen experts $\\mathcal{{K}}_t$", CHOICE_COLOR, w=2.8)
    _arrow(ax, (5.0, 2.45), (5.0, 1.65))

    # the weights: the chosen experts' unbiased scores, over the choice column
    scale = f"x {c.routed_scaling_factor:g}"
    norm = "/ their sum, " if c.norm_topk_prob else ""
    _box(ax, (8.9, 4.3), f"weights $g_{{t,i}}$: unbiased $s_{{t,i}}$, $i \\in \\mathcal{{K}}_t$\n{norm}{scale}",
         WEIGHT_COLOR, w=3.4)
    ax.annotate("", xy=(8.4, 4.67), xytext=(2.2, 4.67),
                arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.2, connectionstyle="arc3,rad=-0.28"))
    ax.text(5.3, 6.05, "unbiased scores: the bias never reaches the weights", color="tab:blue", ha="center", fontsize=7.5)
    _arrow(ax, (6.4, 1.45), (8.2, 3.93), "which ones", color="tab:purple")
    shared = (f"+ {c.n_shared_experts} shared expert{'s' if c.n_shared_experts != 1 else ''} (every token)"
              if c.n_shared_experts else "no shared expert")
    _box(ax, (8.9, 1.3), f"$y_t = \\sum_{{i \\in \\mathcal{{K}}_t}} g_{{t,i}}\\,\\mathrm{{FFN}}_i(x_t)$\n{shared}",
         "white", w=3.4)
    _arrow(ax, (9.6, 3.93), (9.6, 1.67))
    ax.text(0.2, 2.0, "purple: the bias picks the experts\nblue: the unbiased scores weight them", fontsize=8,
            va="center", color="0.2")
    ax.set_title(f"Routing: {E} experts, top-{k}, {G} group{'s' if G != 1 else ''} (keep {kg}), "
                 f"scaling factor {c.routed_scaling_factor:g}", fontsize=10)
    return ax.figure
