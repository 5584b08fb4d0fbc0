"""Balancing rules on hand-made loads and scores."""

import pytest
import torch

from k2mini.balance import loss_free_update, sequence_aux_loss, switch_aux_loss


def test_loss_free_moves_each_bias_by_exactly_u_toward_balance():
    bias = torch.zeros(5)
    load = torch.tensor([10, 2, 6, 6, 6])  # mean 6: expert 0 over, 1 under, the rest at the mean
    new = loss_free_update(bias, load, speed=0.001)
    assert torch.equal(new, torch.tensor([-0.001, 0.001, 0.0, 0.0, 0.0]))
    again = loss_free_update(new, load, speed=0.001)
    assert torch.allclose(again, torch.tensor([-0.002, 0.002, 0.0, 0.0, 0.0]), rtol=0, atol=1e-9)


def test_loss_free_centered_variant_keeps_the_mean_bias():
    bias = torch.zeros(4)
    load = torch.tensor([9, 1, 1, 1])  # mean 3: one over, three under
    new = loss_free_update(bias, load, speed=0.01, variant="centered")
    expected = 0.01 * (torch.tensor([-1.0, 1, 1, 1]) - 0.5)
    assert torch.allclose(new, expected)
    assert abs(new.sum().item()) < 1e-7
    with pytest.raises(ValueError, match="variant"):
        loss_free_update(bias, load, 0.01, variant="other")


def test_sequence_aux_loss_against_hand_computation():
    # one sequence, T=2 tokens, E=3 experts, K=1
    scores = torch.tensor([[[0.2, 0.6, 0.2], [0.5, 0.25, 0.25]]])
    indices = torch.tensor([[[1], [0]]])
    # f = E/(K T) * count = 3/2 * [1, 1, 0];  P = mean_t s/sum s = [(0.2+0.5)/2, (0.6+0.25)/2, (0.2+0.25)/2]
    f = torch.tensor([1.5, 1.5, 0.0])
    P = torch.tensor([0.35, 0.425, 0.225])
    expected = 1e-4 * (f * P).sum()
    assert torch.allclose(sequence_aux_loss(scores, indices, 1e-4), expected)


def test_sequence_aux_loss_is_averaged_per_sequence_and_differentiable():
    torch.manual_seed(0)
    scores = torch.rand(3, 5, 4, requires_grad=True)
    indices = torch.randint(0, 4, (3, 5, 2))
    whole = sequence_aux_loss(scores, indices, 1.0)
    parts = torch.stack([sequence_aux_loss(scores[i : i + 1], indices[i : i + 1], 1.0) for i in range(3)])
    assert torch.allclose(whole, parts.mean())
    whole.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_switch_aux_loss_is_alpha_at_uniform_routing():
    E, N = 4, 8
    scores = torch.full((1, N, E), 0.3)
    indices = torch.arange(N).remainder(E).reshape(1, N, 1)  # each expert gets N/E tokens
    assert torch.allclose(switch_aux_loss(scores, indices, 0.01), torch.tensor(0.01))
    skewed = torch.zeros(1, N, 1, dtype=torch.long)
    s2 = scores.clone()
    s2[..., 0] = 0.9
    assert switch_aux_loss(s2, skewed, 0.01) > 0.01
