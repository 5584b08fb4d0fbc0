"""The optimizer's per-step figures, computed in multi-tensor ops, equal the per-parameter loops they
replaced bit for bit (the loops are written out here as the specification)."""

from __future__ import annotations

import math

import pytest
import torch

from k2mini.optim import MuonAdamW
from k2mini.optim.muon import sequential_sum
from k2mini.optim.muon_adamw import adamw_update_sumsq


def _loop_sum(terms):
    total = torch.zeros((), dtype=torch.float32)
    for t in terms:
        total += t
    return total


def test_sequential_sum_adds_left_to_right_in_float32():
    # one large term then many that float32 loses one at a time: the order decides the total
    terms = [torch.tensor(1.0)] + [torch.tensor(3e-8)] * 200
    got = sequential_sum(terms, torch.device("cpu"))
    assert torch.equal(got, _loop_sum(terms)) and got.item() == 1.0
    assert torch.stack(terms).sum().item() != got.item()  # the pairwise .sum() would not pass this test


def test_sequential_sum_equals_the_loop_on_random_magnitudes():
    g = torch.Generator().manual_seed(0)
    terms = list((torch.rand(97, generator=g) * 10.0 ** torch.randint(-6, 6, (97,), generator=g)).float())
    got = sequential_sum(terms, torch.device("cpu"))
    assert got.dtype == torch.float32 and got.shape == () and torch.equal(got, _loop_sum(terms))
    assert torch.equal(sequential_sum([], torch.device("cpu")), torch.zeros(()))


def _reference_sumsq(exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps):
    """The per-parameter loop MuonAdamW ran before (the update AdamW applied, rebuilt from its state)."""
    sumsq = torch.zeros((), dtype=torch.float32)
    for m, v, t in zip(exp_avgs, exp_avg_sqs, steps):
        t = float(t)
        step_size = lr / (1 - beta1**t)
        denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
        sumsq += step_size**2 * torch.linalg.vector_norm(m / denom, dtype=torch.float32).square()
    return sumsq


@pytest.mark.parametrize("mixed_steps", [False, True])
def test_adamw_update_sumsq_equals_the_per_parameter_loop(mixed_steps):
    g = torch.Generator().manual_seed(1)
    shapes = [(64,), (260, 64), (32, 16, 64), (7, 3), (1,), (96, 64)]
    exp_avgs = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=g) * 1e-6 for s in shapes]
    steps = [torch.tensor(float(3 + (i if mixed_steps else 0))) for i in range(len(shapes))]
    args = (0.005, 0.9, 0.95, 1e-8)
    got = adamw_update_sumsq(exp_avgs, exp_avg_sqs, steps, *args)
    assert torch.equal(got, _reference_sumsq(exp_avgs, exp_avg_sqs, steps, *args))
    # the figure depends on every parameter: dropping one changes it
    assert not torch.equal(got, _reference_sumsq(exp_avgs[1:], exp_avg_sqs[1:], steps[1:], *args))


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_grad_norm_metric_equals_per_tensor_norms(kind):
    from k2mini import K2Config, K2ForCausalLM
    from k2mini.optim import build_optimizer

    model = K2ForCausalLM(K2Config.preset("k2-micro"))
    opt = build_optimizer(model, kind, lr=1e-3)
    assert isinstance(opt, MuonAdamW)
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    grads = {group["name"]: [p.grad.clone() for p in group["params"]] for group in opt.param_groups}
    opt.step()
    got = opt._pending_metrics
    for name, gs in grads.items():
        norms = torch.stack([torch.linalg.vector_norm(x, dtype=torch.float32) for x in gs])
        assert torch.equal(got[f"grad_norm/{name}"], norms.square().sum().sqrt()), name


def test_read_scalars_gives_what_item_gives():
    from k2mini.optim.muon import read_scalars

    g = torch.Generator().manual_seed(3)
    values = {"a": torch.rand((), generator=g), "b": torch.rand((), generator=g).double() / 3, "c": 7,
              "d": torch.tensor([2.5], dtype=torch.bfloat16), "e": 0.25, "f": torch.tensor(5, dtype=torch.int64),
              "g": torch.rand(1, 1, generator=g)}
    got = read_scalars(values)
    assert list(got) == list(values)
    for k, v in values.items():
        want = v.item() if isinstance(v, torch.Tensor) else v
        assert got[k] == want and type(got[k]) is type(want), k
    with pytest.raises(RuntimeError):
        read_scalars({"x": torch.zeros(2)})


def test_orthogonalized_batches_same_shapes_and_keeps_each_matrix_its_own_result():
    from k2mini.optim import newton_schulz
    from k2mini.optim.muon import MuonSettings, orthogonalized

    g = torch.Generator().manual_seed(4)
    shapes = [(32, 64), (96, 32), (32, 64), (4, 16, 64), (96, 32), (64, 64), (32, 64)]  # wide, tall, 3-D, single
    updates = [torch.randn(s, generator=g) for s in shapes]
    group = MuonSettings().group_defaults()
    got = orthogonalized(updates, group)
    assert [tuple(o.shape) for o in got] == shapes
    for u, o in zip(updates, got):
        # one batched kernel against one call per matrix: bitwise equal on the CI CPU; 1e-6 allows a batched
        # kernel that blocks differently (as test_stacked_experts_equal_per_expert_updates)
        torch.testing.assert_close(o, newton_schulz(u, steps=group["ns_steps"], eps=group["eps"]), rtol=0, atol=1e-6)
    assert not torch.allclose(got[0], got[2], atol=1e-3)  # each matrix its own result, in its own place
