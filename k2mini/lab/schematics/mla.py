"""Multi-head latent attention as a diagram, drawn from a K2Config so that every label is that config's size.

Two low-rank paths leave the hidden state: the query path (down to the query latent, normed, up to every
head's content and rotary query) and the key/value path (down to the KV latent plus one rotary key shared
by all heads). Only the KV latent and the shared rotary key are cached; the up-projection recovers every
head's content key and value from the latent.
"""

from __future__ import annotations

from functools import partial

from matplotlib.patches import FancyBboxPatch

from ...config import K2Config
from .shapes import arrow, box, canvas

CACHE_COLOR = "#f6d7a7"  # what decoding keeps per token
PATH_COLOR = "#dbe8f5"  # computed per token, never kept
HEAD_COLOR = "#e4f1e1"  # per head


_box = partial(box, w=2.1, h=0.62)
_arrow = partial(arrow, offset=(0.08, 0.0))


def draw_mla(config: K2Config, ax=None):
    """One MLA layer of `config`: its projections, their output sizes, and the latent cache. -> Figure."""
    c = config
    H, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    ax = canvas(ax, (10, 5.6), (0, 10.6), (0, 7.4))

    x, q_col, kv_col = (5.3, 0.5), 2.2, 7.4
    _box(ax, x, f"hidden state $x_t$\n{c.hidden_size}", "white", w=2.4)
    if c.q_lora_rank:  # query path: down, norm, up
        _box(ax, (q_col, 1.9), f"query latent $c^Q_t$\n{c.q_lora_rank} (RMSNorm)", PATH_COLOR)
        _arrow(ax, (x[0] - 0.6, 0.82), (q_col, 1.58), "$W^{DQ}$ (q_a_proj)")
        q_from = (q_col, 2.22)
        q_label = "$W^{UQ}$ (q_b_proj)"
    else:
        q_from, q_label = (x[0] - 0.6, 0.82), "$W^{Q}$ (q_proj)"
    _box(ax, (q_col - 1.15, 3.5), f"content query $q^C$\n{H} heads x {dn}", HEAD_COLOR, w=2.0)
    _box(ax, (q_col + 1.15, 3.5), f"rope query $q^R$ (RoPE)\n{H} heads x {dr}", HEAD_COLOR, w=2.0)
    _arrow(ax, q_from, (q_col - 1.15, 3.18), None)
    _arrow(ax, q_from, (q_col + 1.15, 3.18), q_label)

    # key/value path: one down-projection gives the latent and the shared rope key
    _box(ax, (kv_col - 1.05, 1.9), f"KV latent $c^{{KV}}_t$\n{c.kv_lora_rank} (RMSNorm)", CACHE_COLOR, w=1.95)
    _box(ax, (kv_col + 1.6, 1.9), f"rope key $k^R_t$\n{dr}, shared by all heads", CACHE_COLOR, w=2.3)
    _arrow(ax, (x[0] + 0.6, 0.82), (kv_col + 0.3, 1.40), "$W^{DKV}$ (kv_a_proj_with_mqa)")
    ax.add_patch(FancyBboxPatch((kv_col - 2.15, 1.42), 5.05, 0.96, boxstyle="round,pad=0.03", fc="none",
                                ec="tab:orange", lw=1.6, ls="--"))
    ax.text(10.5, 0.45, f"latent cache: {c.kv_lora_rank} + {dr} = {c.kv_lora_rank + dr}\nnumbers per token per layer",
            ha="right", fontsize=8, color="tab:orange")
    _box(ax, (kv_col - 1.05, 3.5), f"content key $k^C$ {H} x {dn}\nvalue $v$ {H} x {dv}", HEAD_COLOR, w=2.2)
    _arrow(ax, (kv_col - 1.05, 2.22), (kv_col - 1.05, 3.18), "$W^{UKV}$ (kv_b_proj)")

    # per head: logits from the content pair and the rope pair, softmax, values, output projection
    _box(ax, (5.3, 5.1), f"per head: $(q^C \\cdot k^C + q^R \\cdot k^R)$ x scale\ncausal softmax, "
         f"x $v$  ->  {H} x {dv} = {H * dv}", "white", w=4.6, h=0.7)
    for a in [(q_col - 1.15, 3.82), (q_col + 1.15, 3.82), (kv_col - 1.05, 3.82)]:
        _arrow(ax, a, (5.3 + (a[0] - 5.3) * 0.35, 4.74))
    _arrow(ax, (kv_col + 1.6, 2.22), (6.9, 4.74), "RoPE, one key for every head")
    _box(ax, (5.3, 6.6), f"output $u_t$\n{c.hidden_size}", "white", w=2.4)
    _arrow(ax, (5.3, 5.46), (5.3, 6.28), "$W^O$ (o_proj)")
    q_latent = f"query latent {c.q_lora_rank}" if c.q_lora_rank else "no query latent"
    ax.set_title(f"MLA: hidden {c.hidden_size}, {H} heads, {q_latent}, KV latent {c.kv_lora_rank}, rope {dr}", fontsize=10)
    return ax.figure
