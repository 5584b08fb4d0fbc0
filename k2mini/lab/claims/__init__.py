"""Checked claims: every trained or measured result a notebook checks is a function here that a control can fail.

A claim takes the results of a study and returns a `Verdict`: whether it holds, by how much (the margin,
positive inside the bound), and what was compared. The notebook prints `str(verdict)` in a checked cell
(the sentence and holds / FAILS, nothing trained) and the margin in a cell nbval ignores. Each claim is
registered with the notebook it serves and the negative control that must make it False; its tests,
named ``test_claim_...`` (``pytest -m claim``), run that control and a positive one.

    @claim("02", control="an untrained router on the same tokens")
    def loss_free_beats_aux(...) -> Verdict: ...

`registry()` lists every claim; `python -m k2mini.lab.claims` prints them as the README's table.
One module per notebook: `tour` (00), `routing` (02), `activation` (03), `stability` (04),
`sparsity` (05), `dispatch` (06), `long_context` (07).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Verdict", "claim", "registry", "Claim"]

MODULES = ("tour", "routing", "activation", "stability", "sparsity", "dispatch", "long_context")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim: `holds`, the `margin` by which it holds (negative: by which it fails, in
    the unit `detail` names) and the figures compared, for the reader (`detail`, printed unchecked)."""

    statement: str
    holds: bool
    margin: float
    detail: str = ""

    def __bool__(self) -> bool:
        return bool(self.holds)

    def __str__(self) -> str:
        return f"{self.statement}: {'holds' if self.holds else 'FAILS'}"

    def explain(self) -> str:
        """The checked line plus the measured figures (for a cell nbval ignores)."""
        return f"{self}  (margin {self.margin:+.4g}; {self.detail})" if self.detail else f"{self}  (margin {self.margin:+.4g})"


@dataclass(frozen=True)
class Claim:
    name: str
    notebook: str
    control: str
    doc: str
    fn: Callable = field(repr=False, compare=False)


_REGISTRY: dict[str, Claim] = {}


def claim(notebook: str, *, control: str):
    """Register a claim function of `notebook` ("02") with the negative `control` that makes it False."""
    if not control:
        raise ValueError("a claim needs the negative control that can make it False")

    def register(fn):
        key = f"{fn.__module__}.{fn.__qualname__}"
        doc = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        _REGISTRY[key] = Claim(fn.__name__, notebook, control, doc, fn)
        return fn

    return register


def registry() -> list[Claim]:
    """Every registered claim, by notebook (imports every claims module first)."""
    for name in MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    return sorted(_REGISTRY.values(), key=lambda c: (c.notebook, c.name))
