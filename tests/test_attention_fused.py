"""The fused attention path equals the materialized reference: outputs, gradients, exact max logits."""

import pytest
import torch

from k2mini import K2Config, KVCache
from k2mini.attention import FUSED_FROM_KEYS, causal_mask, causal_max_logit, fused_attention, masked_softmax
from test_model import random_model


def materialized(q, k, v, scale):
    T, S = q.shape[2], k.shape[2]
    logits = torch.einsum("bhtd,bhsd->bhts", q, k) * scale
    probs, max_logit = masked_softmax(logits, causal_mask(T, S))
    return probs @ v, max_logit


@pytest.mark.parametrize("T,S,block", [(13, 13, 5), (1, 9, 4), (6, 20, 256), (40, 40, 256)])
def test_fused_attention_and_blockwise_max_equal_the_materialized_form(T, S, block):
    g = torch.Generator().manual_seed(T * 100 + S)
    q = (torch.randn(2, 3, T, 24, generator=g) * 2).requires_grad_()
    k = (torch.randn(2, 3, S, 24, generator=g) * 2).requires_grad_()
    v = torch.randn(2, 3, S, 16, generator=g).requires_grad_()  # narrower than q.k, as in MLA
    out = fused_attention(q, k, v, 0.3)
    ref, ref_max = materialized(q, k, v, 0.3)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5
    grad = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, [q, k, v], grad), torch.autograd.grad(ref, [q, k, v], grad)):
        assert (a - b).abs().max() < 1e-4
    got = causal_max_logit(q, k, 0.3, block=block)
    assert torch.allclose(got, ref_max, rtol=1e-6, atol=1e-6)
    assert not got.requires_grad


def test_blockwise_max_ignores_future_keys():
    """A huge logit on a key no query may see must not leak into the max."""
    q = torch.ones(1, 1, 4, 2)
    k = torch.zeros(1, 1, 4, 2)
    k[..., 3, :] = 100.0  # only the last query sees it
    q2 = q.clone()
    q2[..., 3, :] = 0.0  # ... and its product with that key is 0
    assert causal_max_logit(q2, k, 1.0, block=2).item() == 0.0
    assert causal_max_logit(q, k, 1.0, block=2).item() == 200.0


def kernel_model(kernel):
    model = random_model(K2Config.preset("k2-micro").replace(num_hidden_layers=3), seed=7)
    for layer in model.model.layers:
        layer.self_attn.kernel = kernel
    return model


def test_model_fused_and_materialized_agree_in_logits_telemetry_and_gradients():
    ids = torch.randint(0, 260, (2, 37), generator=torch.Generator().manual_seed(5))
    results = {}
    for kernel in ("fused", "materialized"):
        model = kernel_model(kernel).train()
        out = model(ids, telemetry=True)
        out.logits.logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[kernel] = out.logits.detach(), out.telemetry.max_logits, grads
    (la, ma, ga), (lb, mb, gb) = results["fused"], results["materialized"]
    assert (la - lb).abs().max() < 1e-5
    assert torch.allclose(ma, mb, rtol=1e-5, atol=1e-6)
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() <= 1e-4 * max(gb[name].abs().max().item(), 1e-3), name


def test_fused_decode_with_cache_equals_full_forward():
    model = kernel_model("fused")
    ids = torch.randint(0, 260, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.empty(model.config)
        first = model(ids[:, :8], cache=cache).logits
        rest = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 12)], dim=1)
    assert (torch.cat([first, rest], dim=1) - full).abs().max() < 1e-5


def test_auto_kernel_switches_at_the_measured_length_and_bad_names_are_refused():
    attn = kernel_model("auto").model.layers[0].self_attn
    assert not attn.uses_fused_kernel(FUSED_FROM_KEYS - 1) and attn.uses_fused_kernel(FUSED_FROM_KEYS)
    attn.kernel = "flash"
    with pytest.raises(ValueError, match="'flash'"):
        attn.uses_fused_kernel(10)
