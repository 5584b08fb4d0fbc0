"""The sparsity study's bookkeeping: paired arms and their control, gap curves, compute to match a loss."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from k2mini.lab.experiments import RunSpec
from k2mini.lab.sparsity_study import (
    CONTROL_SEED_OFFSET,
    arm_name,
    compute_to_match,
    languages_corpus,
    languages_text,
    paired_gaps,
    paired_specs,
)


def test_paired_specs_share_batches_and_the_control_differs_only_in_its_initialization():
    base = RunSpec(steps=10, config={"num_experts_per_tok": 4})
    specs = paired_specs(base, [8, 64], seeds=[0, 1], control=8)
    assert [s.label for s in specs] == ["E=8", "E=64", "E=8'"] * 2
    assert [arm_name(s) for s in specs] == [8, 64, "8'"] * 2
    for s in specs:
        assert s.get("num_experts_per_tok") == 4 and s.steps == 10
    control = specs[2]
    assert control.batch_seed == 0 and control.seed == CONTROL_SEED_OFFSET
    assert control.replace(seed=0) == specs[0]  # the same run as its arm, but for the initialization
    assert len(paired_specs(base, [8, 64], seeds=[0])) == 2


def test_paired_gaps_are_per_seed_and_step_and_name_a_missing_arm():
    rows = [{"arm": a, "seed": s, "step": st, "val_loss": 2.0 + 0.1 * s - (0.05 if a == 64 else 0) * st / 100}
            for a in (8, 64) for s in (0, 1) for st in (100, 200)]
    g = paired_gaps(pd.DataFrame(rows), 64, 8)
    assert list(g.index) == [0, 1] and list(g.columns) == [100, 200]
    assert np.allclose(g.to_numpy(), [[-0.05, -0.1], [-0.05, -0.1]])
    with pytest.raises(ValueError, match="8'"):
        paired_gaps(pd.DataFrame(rows), "8'", 8)


def test_compute_to_match_interpolates_in_log_steps():
    rows = [{"arm": 8, "seed": 0, "step": st, "val_loss": v} for st, v in ((100, 3.0), (400, 2.0))]
    rows += [{"arm": 64, "seed": 0, "step": st, "val_loss": v} for st, v in ((100, 2.5), (400, 1.5))]
    t = compute_to_match(pd.DataFrame(rows), baseline=8)
    assert t.attrs["target"] == 2.0
    assert t.loc[8, "steps_to_target"] == pytest.approx(400)
    assert t.loc[64, "steps_to_target"] == pytest.approx(200)  # half-way in log(step) between 100 and 400
    assert t.loc[64, "compute_ratio"] == pytest.approx(2.0)


def test_languages_text_is_lines_of_sparse_bigram_languages():
    text = languages_text(6, 20_000, letters=5, successors=2, doc_len=100, seed=3)
    assert len(text) == 20_000 and text == languages_text(6, 20_000, letters=5, successors=2, doc_len=100, seed=3)
    lines = text.split("\n")
    assert all(len(line) == 99 for line in lines[:-1])
    for line in lines[:-1]:
        assert len(set(line)) <= 5  # one language's letters
        follows: dict[str, set[str]] = {}
        for a, b in zip(line, line[1:]):
            follows.setdefault(a, set()).add(b)
        assert all(len(s) <= 2 for s in follows.values())  # its sparse bigram table
    # the languages differ: the lines use more symbols between them than one language has
    assert len(set(text) - {"\n"}) > 5
    assert languages_text(6, 20_000, letters=5, successors=2, doc_len=100, seed=4) != text
    with pytest.raises(ValueError, match="letters"):
        languages_text(2, 1000, letters=40)


def test_languages_corpus_is_written_once_and_reused(tmp_path):
    path = languages_corpus(3, 5000, root=tmp_path, letters=4)
    assert path.startswith(str(tmp_path / "synthetic")) and "L3" in path and "letters4" in path
    assert open(path).read() == languages_text(3, 5000, letters=4)
    assert languages_corpus(3, 5000, root=tmp_path, letters=4) == path
    assert list((tmp_path / "synthetic").iterdir()) == [Path(path)]  # no temporary file left