"""The margins record: parts written per (kernels, seed) merge into one table the notebooks print."""

import json

import pytest

from k2mini.lab.margins import main, read_margins


def test_parts_merge_into_one_table_with_their_commands(tmp_path):
    parts = []
    for kernels, seed, margin in (("native", 0, 0.3), ("default", 1, -0.1)):
        p = tmp_path / f"{kernels}-{seed}.json"
        p.write_text(json.dumps({"command": f"run {kernels}", "rows": [
            {"notebook": "04", "kernels": kernels, "seed": seed, "claim": "c", "holds": margin > 0,
             "margin": margin, "detail": "x"}]}))
        parts.append(str(p))
    out = tmp_path / "merged.json"
    assert main(["merge", str(out), *parts]) == 0
    meta, table = read_margins(out)
    assert meta["commands"] == ["run native", "run default"]
    assert table.margin.tolist() == [0.3, -0.1] and table.holds.tolist() == [True, False]


def test_a_record_of_another_format_is_refused(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"format": 0, "rows": []}))
    with pytest.raises(ValueError, match="format"):
        read_margins(p)


def test_notebook_05s_margins_run_the_notebooks_own_parameters(monkeypatch):
    """The margins of notebook 05 re-run its section 2: a change to the notebook's parameters cell that
    the margins study does not follow fails here."""
    from pathlib import Path

    from k2mini.lab.margins import NB05

    monkeypatch.delenv("K2MINI_SCALE", raising=False)
    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "05_sparsity_scaling.ipynb").read_text())
    params: dict = {}
    exec("".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"]), params)
    assert params["SCALE"] == "ci"
    mine = dict(experts=params["EXPERTS"], control=params["CONTROL"], languages=params["LANGUAGES"], few=params["FEW"],
                steps=params["STEPS"], n_seeds=len(params["SEEDS"]), lr=params["LR"], batch_size=params["BATCH"],
                seq_len=params["SEQ"], u=params["U"], model=params["MODEL"])
    assert mine == NB05
    assert params["SEEDS"] == list(range(3))  # the notebook's seeds are the margins' seed 0
