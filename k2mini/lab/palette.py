"""The lab's one colour palette: the same thing gets the same colour in every notebook.

Optimizers and balancing methods have fixed colours (AdamW blue, Muon red, MuonClip green; no
balancing grey, aux loss orange, loss-free bias purple, loss-free + sequence loss brown); a second
MuonClip tau gets a colour of its own; anything else (expert counts, bias speeds) takes the next
unused tab10 colour in the order given.
"""

from __future__ import annotations

from typing import Sequence

from matplotlib import colors as mcolors

__all__ = ["colors", "FIXED"]

FIXED = {
    "adamw": "tab:blue",
    "muon": "tab:red",
    "muonclip": "tab:green",
    "none": "tab:gray",
    "aux_loss": "tab:orange",
    "loss_free": "tab:purple",
    "loss_free+seq_aux": "tab:brown",
}
_TAB10 = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan"]
_CLIP_EXTRA = ["tab:olive", "tab:cyan", "tab:pink", "tab:brown"]


def colors(labels: Sequence[str]) -> dict[str, tuple]:
    """{label: RGB}: fixed colours for known names, "muonclip tau=..." groups green then olive, cyan,
    ...; every other label the next tab10 colour not taken by a fixed one, in the order given."""
    labels = list(dict.fromkeys(str(label) for label in labels))
    out: dict[str, str] = {}
    # plain "muonclip" (if present) keeps green whatever the order; the tau groups come after it
    clips = sorted((label for label in labels if label.startswith("muonclip")), key=lambda label: label != "muonclip")
    for label in labels:
        if label in FIXED:
            out[label] = FIXED[label]
        elif label in clips:
            i = clips.index(label)
            out[label] = FIXED["muonclip"] if i == 0 else _CLIP_EXTRA[(i - 1) % len(_CLIP_EXTRA)]
    free = [c for c in _TAB10 if c not in out.values()] or _TAB10
    rest = [label for label in labels if label not in out]
    for i, label in enumerate(rest):
        out[label] = free[i % len(free)]
    return {label: mcolors.to_rgb(out[label]) for label in labels}
