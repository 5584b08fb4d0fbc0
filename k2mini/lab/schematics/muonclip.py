"""One MuonClip step as a diagram, drawn from a K2Config so that every label is that config's size.

The step has three stages: the forward pass records each head's largest attention logit S[l, h]; Muon
orthogonalizes every weight matrix's momentum (Newton-Schulz) and scales it to AdamW's update size, while
AdamW updates the vectors and embeddings; then QK-Clip rescales, in every head with S > tau, the rows of
that head's query and key maps. The rotary key is one vector shared by all heads, so it cannot be
rescaled per head: the rotary query rows take the whole factor gamma, the content query and key rows
sqrt(gamma) each, and the value rows nothing.
"""

from __future__ import annotations

from functools import partial

from ...config import K2Config
from .shapes import arrow, box, canvas

__all__ = ["draw_muonclip"]

STEP_COLOR = "#dbe8f5"  # the optimizer's stages
SCALED_COLOR = "#f9d5cf"  # rows QK-Clip rescales
KEPT_COLOR = "#e4f1e1"  # rows it leaves alone


def _box(ax, x, y, text, color, w, h=0.7, size=8):
    box(ax, (x, y), text, color, w, h, size)


_arrow = partial(arrow, offset=(0.1, 0.0))


def draw_muonclip(config: K2Config, ax=None):
    """One MuonClip step on a model of `config`: what is measured, updated and rescaled. -> Figure."""
    c = config
    L, H = c.num_hidden_layers, c.num_attention_heads
    dn, dr, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    q_in = c.q_lora_rank or c.hidden_size  # q_b_proj reads the query latent; without one, q_proj reads x
    q_name = "q_b_proj" if c.q_lora_rank else "q_proj"
    ax = canvas(ax, (12, 6.2), (0, 12), (0.4, 7.7))

    # 1. forward: the max logit of every head; 2. the optimizer step
    _box(ax, 1.75, 6.75, f"1. forward pass on the batch:\nmax logit $S_{{l,h}}$ of {L} layers x {H} heads", STEP_COLOR, 3.1,
         h=0.8)
    A, B = H * (dn + dr), q_in
    _box(ax, 6.0, 6.75, f"2. Muon on each matrix [A, B], e.g. {q_name} [{A}, {B}]:\n"
         "momentum, then Newton-Schulz (5 steps: singular values ~1),\n"
         f"then x 0.2 sqrt(max(A, B)) = x {0.2 * max(A, B) ** 0.5:.1f}: update RMS ~ 0.2 lr", STEP_COLOR, 4.9, h=1.0)
    _box(ax, 10.35, 6.75, "2. AdamW on the rest:\nnorms, biases,\nembedding, lm_head", STEP_COLOR, 2.6, h=1.0)
    # 3. QK-Clip
    _box(ax, 6.0, 5.2, r"3. QK-Clip, after the step: every head with $S_{l,h} > \tau$ gets $\gamma_h = \tau / S_{l,h}$",
         "white", 9.0, h=0.55, size=9)
    _arrow(ax, (1.75, 6.35), (1.75, 5.48))
    _arrow(ax, (6.0, 6.25), (6.0, 5.48))

    # the rows of one head, as QK-Clip treats them
    y = 3.7
    cols = (1.65, 4.55, 7.45, 10.35)
    _box(ax, cols[0], y, f"{q_name}, head h:\ncontent query rows ({dn})\n" + r"x $\sqrt{\gamma_h}$", SCALED_COLOR, 2.7, h=1.0)
    _box(ax, cols[1], y, f"{q_name}, head h:\nrope query rows ({dr})\n" + r"x $\gamma_h$, the whole factor", SCALED_COLOR,
         2.7, h=1.0)
    _box(ax, cols[2], y, f"kv_b_proj, head h:\ncontent key rows ({dn})\n" + r"x $\sqrt{\gamma_h}$", SCALED_COLOR, 2.7, h=1.0)
    _box(ax, cols[3], y, f"kv_b_proj, head h:\nvalue rows ({dv})\nuntouched", KEPT_COLOR, 2.7, h=1.0)
    for x in cols[:3]:
        _arrow(ax, (x, 4.92), (x, 4.22))
    _box(ax, 6.0, 1.95, f"kv_a_proj_with_mqa: KV latent ({c.kv_lora_rank}) + rope key ({dr}), ONE key shared by all "
         f"{H} heads:\nuntouched, since scaling it would change every head's logits, clipped or not", KEPT_COLOR, 8.4,
         h=0.8)
    _arrow(ax, (cols[1], 2.35), (cols[1], 3.18), "rope logit = $q^R_h \\cdot k^R$")
    ax.text(6.0, 0.9, r"content logit x $\sqrt{\gamma}\sqrt{\gamma} = \gamma$,   rope logit x $\gamma \cdot 1 = \gamma$:"
            r"   on the step's batch the head's max logit becomes $\tau$", ha="center", fontsize=9)
    ax.set_title(f"MuonClip: {L} layers x {H} heads, head dims content {dn} / rope {dr} / value {dv}, "
                 f"KV latent {c.kv_lora_rank}, hidden {c.hidden_size}", fontsize=10)
    return ax.figure
