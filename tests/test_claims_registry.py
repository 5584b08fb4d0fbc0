"""The claims registry itself: a claim must name its control, and every registered claim has tests."""

import re
from pathlib import Path

import pytest

from k2mini.lab.claims import Verdict, claim, registry

TESTS = Path(__file__).resolve().parent


def test_a_claim_without_a_control_is_refused():
    with pytest.raises(ValueError, match="control"):
        claim("02", control="")


def test_a_verdict_prints_its_sentence_and_whether_it_holds():
    v = Verdict("loss-free beats aux", True, 0.3, "gap 0.3")
    assert str(v) == "loss-free beats aux: holds" and bool(v)
    assert str(Verdict("x", False, -0.1)) == "x: FAILS" and not Verdict("x", False, -0.1)
    assert "margin +0.3" in v.explain()


def test_every_registered_claim_has_a_claim_test_that_names_it():
    """Each claim function is called by some ``test_claim_...`` test (its controls live there)."""
    text = "\n".join(p.read_text() for p in TESTS.glob("test_*.py"))
    tests = re.findall(r"def (test_claim_\w+)\(", text)
    assert tests or not registry()
    missing = [c.name for c in registry() if not re.search(rf"\b{c.name}\(", text)]
    assert not missing, f"claims with no test calling them: {missing}"
