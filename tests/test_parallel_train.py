"""`k2mini.train` on an expert-parallel model (torchrun, 2 gloo processes, MuonClip, loss-free balancing) trains like
one process on the same global batches: losses, gradient norms, weights and correction biases."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).parent
TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3


def test_expert_parallel_training_equals_one_process(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = str(HERE / "ep_worker.py")
    args = ["train", "2", "2", str(tmp_path), str(corpus)]
    subprocess.run([sys.executable, worker, *args[:1], "1", *args[2:]], check=True, env=env, timeout=120, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                    "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", worker, *args],
                   check=True, env=env, timeout=120, capture_output=True)
    single = torch.load(tmp_path / "single.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert r["val"] == pytest.approx(single["val"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
        for name, t in r["state"].items():
            ref = single["state"][name]
            if t.shape != ref.shape:  # this rank's experts: its slice of the stack
                ref = ref[r["first"]:r["first"] + t.shape[0]]
            # Muon's update has unit scale whatever the gradient's, so last-bit gradient differences can
            # move a weight by up to ~1e-4 of an lr=3e-3 step on near-zero singular directions
            assert torch.allclose(t, ref, rtol=0, atol=1e-4), name
    biases = [n for n in ranks[0]["state"] if n.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(ranks[0]["state"][n], ranks[1]["state"][n]) for n in biases)
    assert all(ranks[0]["state"][n].abs().sum() > 0 for n in biases)  # the bias rule ran
