"""Prose that cannot drift: every run figure quoted in a notebook's text is printed by the notebook.

A number written in a markdown cell (a decimal such as ``0.047`` or a percentage such as ``12%``) must
appear as a number in the outputs or the code of the same notebook: printed by a cell, or a bound that
a checked cell states in its code. Facts about the released models (K2's sizes, figures of the K2
report) are allowed when ``docs/K2_FACTS.md`` states them; the few other constants a text may quote
(a formula's coefficient, a section number of a paper) are listed per notebook in ``ALLOWED`` with
their reason. A number quoted from a run that the notebook no longer prints fails here, so re-executing
a notebook cannot leave its prose behind.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks").glob("*/*.ipynb"))
FACTS = (ROOT / "docs" / "K2_FACTS.md").read_text()

# A decimal (0.047, 1.5) or a percentage (12%, 12.7%), optionally signed; thousands separators dropped.
QUOTED = re.compile(r"(?<![\w.,])[-+−]?(\d+\.\d+%?|\d+%)(?![\w]|\.\d)")

# Constants a notebook's text may quote that no cell prints, each with its reason.
ALLOWED: dict[str, dict[str, str]] = {}


def numbers(text: str) -> set[str]:
    """The quoted figures of `text`, normalized: no sign, no thousands separators, no percent sign."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return {m.group(1).rstrip("%") for m in QUOTED.finditer(text)}


def printed(cells: list[dict]) -> set[str]:
    """Every number that the code cells' sources and outputs contain (the same normalization)."""
    parts = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        parts.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for kind in ("text/plain", "text/html", "text/markdown"):
                parts.append("".join(out.get("data", {}).get(kind, "")))
    text = re.sub(r"(?<=\d),(?=\d{3})", "", "\n".join(parts))
    found = set(re.findall(r"\d+\.\d+|\d+", text))
    # a printed 0.0470 or 4.70% supports a quoted 0.047 / 4.7%: compare without trailing zeros too
    return found | {f.rstrip("0").rstrip(".") for f in found if "." in f}


def unsupported(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    have = printed(cells) | numbers(FACTS) | set(re.findall(r"\d+\.\d+|\d+", FACTS))
    allowed = ALLOWED.get(path.name, {})
    missing = []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for n in sorted(numbers("".join(cell["source"]))):
            if n in have or n.rstrip("0").rstrip(".") in have or n in allowed:
                continue
            missing.append(f"cell {i}: {n}")
    return missing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_quoted_figure_is_printed_by_the_notebook(path):
    missing = unsupported(path)
    assert not missing, (
        f"{path.name} quotes figures that none of its cells print (print them, state them as a checked "
        f"bound, or list a constant in ALLOWED with its reason): {missing}")


def test_the_check_fails_on_a_figure_no_cell_prints(tmp_path):
    """The control: a notebook whose text quotes 1.87 while its cell prints 1.813 is caught."""
    nb = {"cells": [
        {"cell_type": "code", "source": ["print(round(mscale**2, 3))"], "outputs": [{"text": ["1.813\n"]}]},
        {"cell_type": "markdown", "source": ["mscale^2 = 1.87 for K2's factor 40, 1.813 for 32"]},
    ]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert unsupported(path) == ["cell 1: 1.87"]


def test_references_point_into_the_repository():
    """No text cites a file outside the repository (the facts file is docs/K2_FACTS.md)."""
    sections = set(re.findall(r"^## (\d+)\.", FACTS, flags=re.M))
    bad = []
    for path in [*ROOT.glob("k2mini/**/*.py"), *ROOT.glob("tests/*.py"), *NOTEBOOKS, ROOT / "README.md"]:
        text = path.read_text()
        if path.name == Path(__file__).name:
            continue
        if "K2_SPEC" in text:
            bad.append(f"{path.relative_to(ROOT)} cites K2_SPEC (not in the repository)")
        for n in re.findall(r"K2_FACTS\.md[`]? section (\d+)", text):
            if n not in sections:
                bad.append(f"{path.relative_to(ROOT)} cites docs/K2_FACTS.md section {n}, which does not exist")
    assert not bad, bad
