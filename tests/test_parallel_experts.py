"""Expert parallelism: spawned gloo processes give the single-process model's logits and gradients on the
same weights; the traffic the all-to-alls counted equals the accounting; Muon needs no gather; bad
degrees are refused in words."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from k2mini import K2Config
from k2mini.optim.muon import Muon
from k2mini.parallel import check_degree, expected_traffic, traffic_from_slots

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module", params=[(2, 2), (4, 2), (4, 4)], ids=["world2-ep2", "world4-ep2", "world4-ep4"])
def ranks(request, tmp_path_factory):
    """What each rank of WORLD processes at expert-parallel degree EP measured (tests/ep_worker.py)."""
    world, degree = request.param
    out = tmp_path_factory.mktemp(f"ep{world}{degree}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(HERE / "ep_worker.py"), "exact", str(world), str(degree), str(out)], check=True,
                   env=env, timeout=120, capture_output=True)
    return world, degree, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_same_logits_and_gradients_as_one_process(ranks):
    world, degree, results = ranks
    for r in results:
        assert r["logit_err"] <= 1e-5 * r["logit_scale"]
        assert len(r["grad_err"]) > 10  # every parameter, experts included
        bad = {name: e for name, e in r["grad_err"].items() if e > 1e-5}
        assert not bad, bad  # relative to the largest gradient entry of the parameter
    # each rank holds E/degree whole experts; ranks of one group hold different ones, replicas the same
    for rank, r in enumerate(results):
        assert r["n_local"] == 16 // degree and r["first"] == (rank % degree) * r["n_local"]
        for mine, full in r["shapes"].values():
            assert mine == (full[0] // degree, *full[1:])


def test_counted_bytes_equal_the_accounting(ranks):
    world, degree, results = ranks
    H = K2Config.preset("k2-micro").hidden_size
    for layer, slots in results[0]["slots"].items():
        # within each expert-parallel group, slots[a, b]: token-slots rank a sent to rank b's experts
        for start in range(0, world, degree):
            group = slots[start:start + degree]
            expected = traffic_from_slots(group, H, torch.float32, n_experts=16)
            for a in range(degree):
                sent, received = results[start + a]["traffic"][layer]
                assert sent == {key: v[a] for key, v in expected.sent.items()}
                assert received == {key: v[a] for key, v in expected.received.items()}
                assert sum(sent.values()) > 0


def test_balanced_routing_moves_the_expected_bytes(ranks):
    world, degree, results = ranks
    config = K2Config.preset("k2-micro")
    for r in results:
        assert r["weights_grad"]
        assert r["skewed_err"] < 1e-5  # all tokens to one rank's experts: the idle ranks still exchange
        expected = expected_traffic(config, r["balanced_tokens"] * degree, degree, torch.float32)
        assert r["balanced_sent"] == {key: v[0] for key, v in expected.sent.items()}
        assert r["balanced_received"] == {key: v[0] for key, v in expected.received.items()}


def test_bad_degrees_are_refused_in_words(ranks):
    world, _, results = ranks
    for r in results:
        assert "larger than the world" in r["bad"]["too_large"]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        check_degree(12, 8, 8)
    with pytest.raises(ValueError, match="does not divide the world size"):
        check_degree(16, 3, 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        check_degree(16, 0, 4)


def test_expected_traffic_formula():
    """4 T k (d - 1) / d H bytes per rank and layer at one dtype; fp8 dispatch saves a quarter of a half."""
    c = K2Config.preset("k2-micro")
    T, d, k, H = 64, 4, c.num_experts_per_tok, c.hidden_size
    t = expected_traffic(c, T * d, d, torch.bfloat16)
    counts = (d - 1) * (c.n_routed_experts // d) * 8
    assert t.total_sent() == pytest.approx(4 * T * k * (d - 1) / d * H * 2 + counts)
    assert t.total_sent() == t.total_received()
    fp8 = expected_traffic(c, T * d, d, torch.bfloat16, dispatch_dtype=torch.float8_e4m3fn)
    assert t.total_sent() - fp8.total_sent() == pytest.approx(T * k * (d - 1) / d * H)
    assert expected_traffic(c, T, 1).total_sent() == 0  # one rank: nothing travels
    # once per rank (DeepEP) never sends more than once per slot
    assert expected_traffic(c, T * d, d, per="rank").total_sent() <= t.total_sent()


def test_muon_on_a_shard_is_the_shard_of_muon():
    """Each expert's matrix lives whole on one rank, so Muon's step on a rank's slice of the stack equals
    the slice of the step on the whole stack: no gather."""
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(8, 32, 16))
    full.grad = torch.randn_like(full)
    shards = [torch.nn.Parameter(full.detach()[i * 4:(i + 1) * 4].clone()) for i in range(2)]
    for i, s in enumerate(shards):
        s.grad = full.grad[i * 4:(i + 1) * 4].clone()
    for params in ([full], *[[s] for s in shards]):
        opt = Muon(params, lr=0.02)
        opt.step()
        opt.step()
    for i, s in enumerate(shards):
        torch.testing.assert_close(s.detach(), full.detach()[i * 4:(i + 1) * 4], rtol=0, atol=1e-6)
