"""The grouped experts: the same values as the textbook per-expert loop, forward and backward, and a
backward whose zero-filled memory does not grow with the number of experts (no E^2 path)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import k2mini.moe
from k2mini.moe import grouped_experts, route

aten = torch.ops.aten
FILLS = {aten.zeros, aten.zero_, aten.fill_, aten.new_zeros, aten.zeros_like, aten.full, aten.new_full}


class CountFilled(TorchDispatchMode):
    """Counts the elements every zero / fill op writes while active."""

    def __init__(self):
        super().__init__()
        self.filled = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in FILLS:
            self.filled += out.numel()
        return out


def expert_stack(E, H=16, I=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, *shape, generator=g) * 0.3).requires_grad_() for shape in ((I, H), (I, H), (H, I))]


def loop_reference(x, indices, weights, w_gate, w_up, w_down):
    """Token by token, slot by slot: the definition."""
    out = torch.zeros_like(x)
    rows = []
    for n in range(x.shape[0]):
        row = 0
        for j in range(indices.shape[1]):
            e = int(indices[n, j])
            h = F.silu(w_gate[e] @ x[n]) * (w_up[e] @ x[n])
            row = row + weights[n, j] * (w_down[e] @ h)
        rows.append(row)
    return torch.stack(rows) + out


@pytest.fixture(params=["grouped_mm", "unbind"])
def path(request, monkeypatch):
    """Both implementations of grouped_linear: torch's grouped matmul and the per-expert fallback."""
    if request.param == "grouped_mm" and not k2mini.moe._probe_grouped_mm(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no grouped matmul on CPU")
    monkeypatch.setitem(k2mini.moe._GROUPED_MM, ("cpu", torch.float32), request.param == "grouped_mm")
    return request.param


@pytest.mark.parametrize("E,k,N", [(8, 2, 40), (12, 3, 7), (16, 4, 1)])
def test_grouped_experts_forward_and_backward_equal_the_loop(E, k, N, path):
    g = torch.Generator().manual_seed(E)
    x = torch.randn(N, 16, generator=g, requires_grad=True)
    routing = route(x.detach(), torch.randn(E, 16, generator=g), torch.zeros(E), top_k=k)
    ws = expert_stack(E)
    y = grouped_experts(x, routing.indices, routing.weights, *ws)
    grad_out = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x, *ws], grad_out)

    x2 = x.detach().clone().requires_grad_()
    ws2 = [w.detach().clone().requires_grad_() for w in ws]
    ref = loop_reference(x2, routing.indices, routing.weights, *ws2)
    ref_grads = torch.autograd.grad(ref, [x2, *ws2], grad_out)
    assert (y - ref).abs().max() < 1e-5
    for name, a, b in zip(["x", "gate", "up", "down"], grads, ref_grads):
        assert (a - b).abs().max() < 1e-5, name


def test_unrouted_experts_get_zero_gradient(path):
    E = 8
    x = torch.randn(5, 16, requires_grad=True)
    indices = torch.tensor([[1, 3]] * 5)
    weights = torch.full((5, 2), 0.5)
    ws = expert_stack(E)
    grad_gate = torch.autograd.grad(grouped_experts(x, indices, weights, *ws).sum(), ws[0])[0]
    assert grad_gate[[1, 3]].abs().sum() > 0
    assert grad_gate[[0, 2, 4, 5, 6, 7]].abs().sum() == 0


def filled_in_backward(E, N=256, k=4):
    """Elements zero-filled by one backward through E experts that all receive tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 16, generator=g, requires_grad=True)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    indices[: E // k + 1] = torch.arange(E // k * k + k).remainder(E).reshape(-1, k)[: E // k + 1]
    weights = torch.rand(N, k, generator=g)
    ws = expert_stack(E)
    y = grouped_experts(x, indices, weights, *ws)
    counter = CountFilled()
    with counter:
        y.backward(torch.ones_like(y))
    return counter.filled, sum(w.numel() for w in ws)


def test_backward_fills_no_more_than_the_gradients_it_returns(path):
    """The E^2 path (each w[e] slice's backward zero-fills the whole stack) filled 32 x the expert
    parameters at E = 64; a linear path fills at most one copy of them plus the input's gradient."""
    for E in (8, 64, 256):
        filled, params = filled_in_backward(E)
        assert filled <= params + 256 * 16, (E, filled, params)


def test_the_grouped_matmul_probe_does_not_depend_on_the_callers_grad_mode(monkeypatch):
    """The first call may come under no_grad or inference_mode; the cached answer must not."""
    cpu = torch.device("cpu")
    key = ("cpu", torch.float32)
    monkeypatch.delitem(k2mini.moe._GROUPED_MM, key, raising=False)
    plain = k2mini.moe._probe_grouped_mm(cpu, torch.float32)
    for mode in (torch.no_grad, torch.inference_mode):
        del k2mini.moe._GROUPED_MM[key]
        with mode():
            assert k2mini.moe._probe_grouped_mm(cpu, torch.float32) == plain
