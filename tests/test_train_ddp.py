"""Two CPU processes under torchrun (gloo, DistributedDataParallel) train exactly like one process on
the same global batches, Muon and QK-Clip included."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).parent
TEXT = ("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3


@pytest.mark.parametrize("kind", ["adamw", "muonclip"])
def test_two_processes_equal_one(tmp_path, kind):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    worker = str(HERE / "ddp_worker.py")
    subprocess.run([sys.executable, worker, str(corpus), str(single), kind, "--single"], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0", "--rdzv-backend=c10d",
         "--rdzv-endpoint=127.0.0.1:0", worker, str(corpus), str(double), kind],
        check=True, env=env, timeout=300, capture_output=True,
    )
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    # Both runs must route every token alike, or a weight compared below takes another expert's update.
    # Rounding moves scores by ~1e-7; the smallest gap between a chosen and an unchosen expert's score in
    # any step must be far above that, or the comparison would depend on the CPU's float kernels.
    assert min(a["routing_margin"], b["routing_margin"]) > 1e-5, (
        f"a near-tie in routing (margin {min(a['routing_margin'], b['routing_margin']):.2e}): this test's "
        "data must be changed, its comparison is not decided by the code under test")
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["val"] == pytest.approx(b["val"], rel=1e-5)
    # Gradients are summed in another order across processes; Adam divides by sqrt(v), which turns a
    # 1e-7 gradient difference on a near-zero gradient into a visible one. 1e-4 is 3% of one lr=3e-3 step.
    for name, t in a["state"].items():
        assert torch.allclose(t, b["state"][name], rtol=0, atol=1e-4), (name, (t - b["state"][name]).abs().max().item())
