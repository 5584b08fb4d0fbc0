"""What every schematic is drawn with: a blank canvas, a rounded box with its label, an arrow with an optional label."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch


def canvas(ax, figsize, xlim, ylim):
    """`ax` (a new figure of `figsize` when None) with the drawing's limits and no axes drawn."""
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.axis("off")
    return ax


def box(ax, xy, text, color, w, h, size=8):
    """A rounded box of width w and height h centred at xy, filled with `color`, `text` in its middle."""
    x, y = xy
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04", fc=color, ec="0.3", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, a, b, text=None, color="0.25", lw=1.0, ls="-", shrink=None, offset=(0.08, 0.0), va="center"):
    """An arrow from a to b; `text` beside its middle (moved by `offset`); `shrink` points short of both ends."""
    props = dict(arrowstyle="->", color=color, lw=lw, ls=ls)
    if shrink is not None:
        props.update(shrinkA=shrink, shrinkB=shrink)
    ax.annotate("", xy=b, xytext=a, arrowprops=props)
    if text:
        ax.text((a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1], text, fontsize=7, color="0.2", va=va)
