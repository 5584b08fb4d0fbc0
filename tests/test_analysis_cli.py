"""python -m k2mini.analysis: the analysis from a terminal, results in one JSON file."""

import subprocess
import sys

import pytest
import torch

import k2mini
from k2mini.analysis import encode_batch, load_results, load_tokenizer, stream_activations
from k2mini.analysis.__main__ import main
from k2mini.checkpoint import save_pretrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = k2mini.K2ForCausalLM(k2mini.K2Config.preset("k2-micro").replace(num_hidden_layers=3))
    save_pretrained(model, root / "ckpt", fp8=True, progress=False)
    (root / "prose.txt").write_text("Now is the winter of our discontent made glorious summer. " * 4)
    (root / "code.py").write_text("def f(x):\n    return [i * i for i in range(x)]\n" * 4)
    (root / "empty.txt").write_text("")
    return root


def test_static_and_stream_to_json(setup, capsys):
    out = setup / "results.json"
    rc = main([str(setup / "ckpt"), "--text", str(setup / "prose.txt"), "--text", f"python={setup / 'code.py'}",
               "--static", "--seq-len", "32", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "static: read" in printed and "hottest_share" in printed
    summary, stream = load_results(out)
    assert list(summary.index) == [1, 2] and summary.attrs["bytes_read"] > 0
    assert len(summary.loc[1, "bias_centred"]) == 16
    assert set(stream.counts_by_label) == {"prose", "python"} and stream.layers == [1, 2]
    texts = {"prose": (setup / "prose.txt").read_text(), "python": (setup / "code.py").read_text()}
    ids, labels = encode_batch(load_tokenizer(setup / "ckpt"), texts, 32)
    direct = stream_activations(setup / "ckpt", ids, labels=labels, progress=False)
    assert torch.equal(stream.counts, direct.counts) and torch.equal(stream.coactivation, direct.coactivation)
    assert stream.layer_frame().equals(direct.layer_frame())


def test_bad_input_is_a_clear_error(setup, capsys):
    ckpt = str(setup / "ckpt")
    assert main([ckpt]) == 2 and "nothing to do" in capsys.readouterr().err
    assert main([ckpt, "--static", "--layers", "7"]) == 2
    assert "layer 7 is out of range: the checkpoint has 3 layers" in capsys.readouterr().err
    assert main([ckpt, "--text", str(setup / "empty.txt"), "--no-progress"]) == 2
    assert "empty: the text tokenizes to no tokens" in capsys.readouterr().err
    assert main([ckpt, "--text", str(setup / "nope.txt")]) == 2 and "no such file" in capsys.readouterr().err
    assert main([str(setup), "--static"]) == 2 and "config.json: missing" in capsys.readouterr().err


def test_runs_as_a_module(setup):
    proc = subprocess.run(
        [sys.executable, "-m", "k2mini.analysis", str(setup / "ckpt"), "--static", "--layers", "2", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bias_std" in proc.stdout and "static: read" in proc.stdout


@pytest.mark.parametrize("where", ["under_a_file", "a_directory", "state_dir_under_a_file"])
def test_outputs_that_cannot_be_written_are_refused_before_the_analysis_runs(setup, capsys, where):
    """--out used to be found unwritable only after the whole analysis: traceback, results lost."""
    ckpt, prose = str(setup / "ckpt"), str(setup / "prose.txt")
    args = [ckpt, "--static", "--text", prose, "--seq-len", "32", "--no-progress"]
    if where == "under_a_file":
        args += ["--out", str(setup / "prose.txt" / "results.json")]
    elif where == "a_directory":
        args += ["--out", str(setup)]
    else:
        args += ["--out", str(setup / "ok.json"), "--state-dir", str(setup / "code.py" / "state")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "--out" in captured.err or "--state-dir" in captured.err
    assert "cannot be written" in captured.err and "static: read" not in captured.out  # nothing ran
    assert not (setup / "ok.json").exists()


def test_results_are_written_atomically(setup, capsys):
    out = setup / "atomic" / "results.json"
    assert main([str(setup / "ckpt"), "--static", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"]  # no probe or temporary left
    load_results(out)
