"""Muon and Newton-Schulz against torch.optim.Muon and against the math; the combined optimizer."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k2mini import K2Config, K2ForCausalLM
from k2mini.optim import (
    Muon,
    MuonAdamW,
    NonFiniteGradientError,
    build_optimizer,
    newton_schulz,
    ns_singular_value_map,
    split_parameters,
)

SHAPES = [(32, 64), (64, 32), (32, 32)]  # wide, tall (transposed inside NS), square


def _pair(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(0.02 * torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def _step_both(opt_a, params_a, opt_b, params_b, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(params_a, params_b):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()


@pytest.mark.parametrize("adjust_lr, torch_adjust", [("match_rms_adamw", "match_rms_adamw"), ("original", None)])
def test_matches_torch_muon_in_bf16(adjust_lr, torch_adjust):
    ours, theirs = _pair(SHAPES)
    start = [p.detach().clone() for p in ours]
    opt = Muon(ours, lr=0.02, adjust_lr=adjust_lr, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn=torch_adjust)
    _step_both(opt, ours, ref, theirs, steps=4)
    for a, b, p0 in zip(ours, theirs, start):
        # Same ops in the same order and dtype as torch: measured bitwise equal. Allow one bf16 ulp
        # (2^-8) of the total update in case a kernel reduces in another order on another CPU.
        torch.testing.assert_close(a, b, rtol=0, atol=2**-8 * (b - p0).abs().max().item())


@pytest.mark.parametrize("adjust_lr, torch_adjust", [("match_rms_adamw", "match_rms_adamw"), ("original", None)])
def test_matches_torch_muon_in_float32_up_to_bf16_rounding(adjust_lr, torch_adjust):
    ours, theirs = _pair(SHAPES)
    start = [p.detach().clone() for p in ours]
    opt = Muon(ours, lr=0.02, adjust_lr=adjust_lr, ns_dtype=torch.float32)
    ref = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn=torch_adjust)
    _step_both(opt, ours, ref, theirs, steps=4)
    for a, b, p0 in zip(ours, theirs, start):
        ours_delta, ref_delta = (a - p0).detach(), (b - p0).detach()
        rel = ((ours_delta - ref_delta).norm() / ref_delta.norm()).item()
        # torch runs Newton-Schulz in bf16 (8-bit mantissa, 2^-9 = 0.2% per rounding, compounded over
        # 5 iterations of 3 matmuls): measured 0.9-1.0% relative difference of the 5-step update.
        assert rel < 0.03, rel


def test_state_is_torch_compatible():
    ours, theirs = _pair(SHAPES[:1])
    opt = Muon(ours, lr=0.02, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw")
    _step_both(opt, ours, ref, theirs, steps=2)
    assert torch.equal(opt.state[ours[0]]["momentum_buffer"], ref.state[theirs[0]]["momentum_buffer"])


def test_loads_a_torch_muon_state_dict_and_continues_identically():
    ours, theirs = _pair(SHAPES[:2])
    ref = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw")
    _step_both(ref, theirs, torch.optim.Muon(ours, lr=0.02, adjust_lr_fn="match_rms_adamw"), ours, steps=2)
    opt = Muon(ours, lr=0.02, ns_dtype=torch.bfloat16)
    # (a copy, as from disk: load_state_dict keeps tensors that already have the right dtype, so both
    # optimizers would share one momentum buffer.) torch's groups lack adjust_lr / ns_dtype: ours fill them in.
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    _step_both(opt, ours, ref, theirs, steps=2, seed=2)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_experts_equal_per_expert_updates(dtype):
    E = 4
    w = torch.randn(E, 32, 64, generator=torch.Generator().manual_seed(0))
    stacked = torch.nn.Parameter(w.clone())
    experts = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
    opt3 = Muon([stacked], lr=0.02, ns_dtype=dtype)
    opt2 = Muon(experts, lr=0.02, ns_dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(E, 32, 64, generator=g)
        stacked.grad = grad.clone()
        for e in range(E):
            experts[e].grad = grad[e].clone()
        opt3.step()
        opt2.step()
    for e in range(E):
        # One baddbmm per NS matmul against one addmm per expert: measured bitwise equal; 1e-6 allows
        # a batched kernel that blocks differently.
        torch.testing.assert_close(stacked[e], experts[e], rtol=0, atol=1e-6)


def test_newton_schulz_batched_matches_loop_and_transpose():
    G = torch.randn(3, 2, 24, 40)
    O = newton_schulz(G)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(O[i, j], newton_schulz(G[i, j]), rtol=0, atol=1e-6)
    torch.testing.assert_close(newton_schulz(G.mT), O.mT, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (8, 64, 128)])
def test_newton_schulz_singular_values_in_band(shape):
    # Iterating p(s) = a s + b s^3 + c s^5 five times maps every s / ||G||_F in [0.01, 1] into
    # [0.68183, 1.13436] (see ns_singular_value_map); a Gaussian 64x128 matrix has
    # s_min / ||G||_F ~ (sqrt(128) - sqrt(64)) / sqrt(64 * 128) ~ 0.037, so all of its singular values
    # land in the band. Measured float32: [0.68184, 1.13436]; 1e-3 is float32 rounding headroom.
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(G, dtype=torch.float32).double())
    assert s.min() > 0.6818 - 1e-3 and s.max() < 1.1344 + 1e-3, (s.min(), s.max())


def test_newton_schulz_singular_values_in_band_bf16():
    G = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(G, dtype=torch.bfloat16).double())
    # bf16 rounding moves the ends by ~2^-8 relative: measured [0.6802, 1.1329].
    assert s.min() > 0.6818 - 0.01 and s.max() < 1.1344 + 0.01, (s.min(), s.max())


def test_newton_schulz_acts_on_each_singular_value_by_the_quintic():
    # G = U diag(s) V^T with s spread over 2.5 decades: NS(G) must be U diag(p^5(s / ||s||)) V^T.
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(128, 64, dtype=torch.float64, generator=g))
    s = torch.logspace(0, -2.5, 64, dtype=torch.float64)
    G = (U * s) @ V.T
    expected = (U * ns_singular_value_map(s / s.norm())) @ V.T
    # float32 matmuls on entries of size ~0.1: measured max error 1e-6.
    torch.testing.assert_close(newton_schulz(G.float()).double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float64), expected, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(a=st.integers(1, 24), b=st.integers(1, 24), batch=st.integers(0, 3), scale=st.floats(1e-3, 1e3))
def test_newton_schulz_is_scale_free_and_keeps_shape(a, b, batch, scale):
    shape = (batch, a, b) if batch else (a, b)
    G = torch.randn(shape, generator=torch.Generator().manual_seed(a * 100 + b))
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == torch.float32 and torch.isfinite(O).all()
    # Only the Frobenius normalization sees the scale: the output is scale-free (until eps bites).
    torch.testing.assert_close(newton_schulz(G * scale), O, rtol=1e-4, atol=1e-4)
    assert torch.linalg.matrix_norm(O.double(), ord=2).max() < 1.21  # p^5 never exceeds 1.2024 on [0, 1]


def test_update_rms_metric_is_about_0_2_lr():
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Muon(ps, lr=1e-2)
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    m = opt.last_metrics
    # ||O||_F^2 ~ min(A, B) * E[s^2] with s in [0.68, 1.13]: RMS = 0.2 lr * sqrt(E[s^2]) ~ 0.18 lr.
    assert 0.15e-2 < m["update_rms/group0"] < 0.2e-2, m
    assert m["lr/group0"] == 1e-2 and m["grad_norm/group0"] > 0


def test_weight_decay_is_decoupled_and_uses_the_plain_lr():
    p = torch.nn.Parameter(torch.ones(8, 16))
    opt = Muon([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(8, 16)  # zero gradient: NS of 0 is 0, only the decay acts
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((8, 16), 1 - 0.1 * 0.5))


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4, 5)])
def test_unsupported_shapes_fail_at_construction_with_the_name(shape):
    good = torch.nn.Parameter(torch.randn(4, 4))
    bad = torch.nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=r"layer\.bad.*shape"):
        Muon([("layer.good", good), ("layer.bad", bad)], lr=1e-3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        Muon([good, bad], lr=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1.0), dict(lr=float("nan")), dict(weight_decay=-0.1), dict(momentum=1.0), dict(momentum=-0.1),
     dict(ns_steps=0), dict(ns_steps=2.5), dict(eps=0.0), dict(adjust_lr="spectral"), dict(ns_dtype=torch.int32)],
)
def test_bad_hyperparameters_raise_value_error(kwargs):
    kwargs = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(5))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_gradient_names_the_parameter_and_changes_nothing(bad_value):
    a, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))
    opt = Muon([("attn.q_b_proj.weight", a), ("attn.kv_b_proj.weight", b)], lr=1e-2)
    a.grad, b.grad = torch.randn(4, 8), torch.randn(8, 4)
    opt.step()
    before = (a.detach().clone(), b.detach().clone(), copy.deepcopy(opt.state_dict()))
    a.grad, b.grad = torch.randn(4, 8), torch.randn(8, 4)
    b.grad[1, 2] = bad_value
    with pytest.raises(NonFiniteGradientError, match=r"kv_b_proj") as info:
        opt.step()
    assert "q_b_proj" not in str(info.value)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    after = opt.state_dict()
    for key, state in before[2]["state"].items():
        assert torch.equal(state["momentum_buffer"], after["state"][key]["momentum_buffer"])


def test_huge_but_finite_gradient_is_not_an_error():
    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = Muon([p], lr=1e-2)
    p.grad = torch.full((4, 8), 3e38)  # its float32 norm overflows to inf; the entries are finite
    opt.step()
    assert torch.isfinite(p).all()


# ---- the combined optimizer on a K2 model ---------------------------------------------------------


@pytest.fixture(scope="module")
def micro_config():
    return K2Config.preset("k2-micro")


def _model(config, seed=0):
    torch.manual_seed(seed)
    return K2ForCausalLM(config)


def _loss_and_logits(model, ids):
    out = model(ids, telemetry=True)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return loss, out.telemetry.max_logits


def _train(model, opt, batches):
    for ids in batches:
        opt.zero_grad()
        loss, max_logits = _loss_and_logits(model, ids)
        loss.backward()
        opt.step(max_logits=max_logits)


def test_split_follows_moonlight_and_never_touches_the_correction_bias(micro_config):
    model = _model(micro_config)
    roles = split_parameters(model)
    names = {role: {n for n, _ in named} for role, named in roles.items()}
    assert names["embeddings"] == {"model.embed_tokens.weight", "lm_head.weight"}
    assert names["router"] == {"model.layers.1.mlp.gate.weight"}
    assert {"model.layers.1.mlp.experts.gate_proj", "model.layers.0.self_attn.kv_b_proj.weight"} <= names["matrices"]
    assert all(n.endswith("norm.weight") for n in names["vectors"])
    every = [n for ns in names.values() for n in ns]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    assert not any("e_score_correction_bias" in n for n in every)

    opt = build_optimizer(model, "muonclip", lr=1e-3)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(b) not in in_groups for n, b in model.named_buffers())
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["matrices"]["use_muon"] and by_name["router"]["use_muon"]
    assert not by_name["embeddings"]["use_muon"] and by_name["embeddings"]["betas"] == (0.9, 0.95)
    assert by_name["vectors"]["weight_decay"] == 0.0 and by_name["matrices"]["weight_decay"] == 0.1
    assert not build_optimizer(model, "muon", lr=1e-3, router="adamw").param_groups[1]["use_muon"]
    assert isinstance(opt, torch.optim.Optimizer)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # schedulers accept it


def test_adamw_kind_is_torch_adamw_bit_for_bit(micro_config):
    ids = torch.randint(0, 256, (3, 2, 12), generator=torch.Generator().manual_seed(0))
    ours_model, ref_model = _model(micro_config), _model(micro_config)
    ours = build_optimizer(ours_model, "adamw", lr=3e-3, weight_decay=0.1)
    groups = [{"params": [p for _, p in named], "weight_decay": 0.0 if role == "vectors" else 0.1}
              for role, named in split_parameters(ref_model).items() if named]
    ref = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    _train(ours_model, ours, ids)
    for ids_ in ids:
        ref.zero_grad()
        _loss_and_logits(ref_model, ids_)[0].backward()
        ref.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["muonclip", "muon", "adamw"])
def test_state_dict_round_trip(micro_config, kind):
    g = torch.Generator().manual_seed(0)
    warmup, more = torch.randint(0, 256, (2, 2, 12), generator=g), torch.randint(0, 256, (2, 2, 12), generator=g)
    model = _model(micro_config)
    # a tau the micro model's logits (~0.05 at init) exceed, so clip state is non-trivial
    opt = build_optimizer(model, kind, lr=1e-2, tau=0.04)
    _train(model, opt, warmup)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = _model(micro_config, seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = build_optimizer(resumed, kind, lr=5.0, tau=7.0)  # hyperparameters come from the save
    resumed_opt.load_state_dict(saved["opt"])
    assert [g["lr"] for g in resumed_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    if kind == "muonclip":
        assert resumed_opt.tau == 0.04 and torch.equal(resumed_opt.clip_counts, opt.clip_counts)
        assert opt.clip_counts.sum() > 0

    _train(model, opt, more)
    _train(resumed, resumed_opt, more)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_deepcopy_gives_an_independent_optimizer_that_steps_the_same(micro_config):
    ids = torch.randint(0, 256, (2, 2, 12), generator=torch.Generator().manual_seed(0))
    model = _model(micro_config)
    opt = build_optimizer(model, "muonclip", lr=1e-2, tau=0.04)
    _train(model, opt, ids[:1])
    twin_model, twin_opt = copy.deepcopy((model, opt))  # one memo: the copy's groups hold the copy's params
    assert twin_opt.model is twin_model and twin_opt.tau == 0.04 and twin_opt.check_finite
    _train(model, opt, ids[1:])
    _train(twin_model, twin_opt, ids[1:])
    for (name, a), b in zip(model.named_parameters(), twin_model.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(opt.clip_counts, twin_opt.clip_counts)


def test_muon_adamw_needs_use_muon_in_every_group():
    with pytest.raises(ValueError, match="use_muon"):
        MuonAdamW([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-3)


def test_build_optimizer_rejects_unknown_kind(micro_config):
    model = _model(micro_config)
    with pytest.raises(ValueError, match="kind"):
        build_optimizer(model, "sgd", lr=1e-3)
    with pytest.raises(ValueError, match="router"):
        build_optimizer(model, "muon", lr=1e-3, router="sgd")


def test_metrics_line_up_across_kinds(micro_config):
    ids = torch.randint(0, 256, (1, 2, 12), generator=torch.Generator().manual_seed(0))
    keys = []
    for kind in ("muon", "adamw"):
        model = _model(micro_config)
        opt = build_optimizer(model, kind, lr=1e-3)
        _train(model, opt, ids)
        m = opt.last_metrics
        keys.append(set(m))
        assert math.isfinite(m["update_rms/matrices"]) and m["max_logit"] == max(
            m[f"max_logit/layer{l}"] for l in range(micro_config.num_hidden_layers)
        )
        if kind == "muon":
            # Muon at match_rms_adamw: at most 0.2 lr * 1.13 (full rank, NS band), here ~0.09 lr because
            # 24 tokens give low-rank gradients, and NS leaves the missing directions at 0.
            # AdamW's first step is ~lr (m_hat / sqrt(v_hat) = sign(g)).
            assert 0.02e-3 < m["update_rms/matrices"] < 0.23e-3, m
        else:
            assert 0.5e-3 < m["update_rms/matrices"] <= 1.0e-3 + 1e-9, m
    assert keys[0] == keys[1]
