"""QK-Clip on a tiny K2: clipped heads land exactly on tau, everything else stays bit-identical."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from einops import rearrange

from k2mini import K2Config, K2ForCausalLM
from k2mini.optim import attention_modules, build_optimizer, clip_factors, qk_clip_

TAU = 1.0  # the micro model's logits are ~0.05 at init; inflated heads reach ~3
INFLATE = {0: [1, 3], 1: [2]}  # layer -> heads whose queries are scaled up past tau


def _config(q_lora_rank):
    return dataclasses.replace(K2Config.preset("k2-micro"), q_lora_rank=q_lora_rank)


def _q_weight(attn):
    return attn.q_proj.weight if attn.q_lora_rank is None else attn.q_b_proj.weight


def _model(q_lora_rank=32, inflate=INFLATE, factor=60.0, dtype=torch.float32):
    torch.manual_seed(0)
    model = K2ForCausalLM(_config(q_lora_rank)).to(dtype)
    with torch.no_grad():
        for layer, heads in inflate.items():
            attn = attention_modules(model)[layer]
            q = rearrange(_q_weight(attn), "(h d) i -> h d i", h=attn.num_heads)
            q[heads] *= factor  # every logit of these heads grows by `factor`
    return model


def _ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _capture_attention_inputs(model, ids):
    """Run the model once; return its max logits and each attention layer's positional inputs."""
    inputs, hooks = [], []
    for attn in attention_modules(model):
        hooks.append(attn.register_forward_pre_hook(lambda module, args: inputs.append(args)))
    with torch.no_grad():
        max_logits = model(ids, telemetry=True).telemetry.max_logits
    for h in hooks:
        h.remove()
    return max_logits, inputs


def _per_head(attn, args):
    """Re-run one attention layer on fixed inputs: per-head output before o_proj (B, H, T, v), max logit (H,)."""
    seen = []
    hook = attn.o_proj.register_forward_pre_hook(lambda module, a: seen.append(a[0]))
    with torch.no_grad():
        _, max_logit, _ = attn(*args)
    hook.remove()
    return rearrange(seen[0], "b t (h v) -> b h t v", h=attn.num_heads), max_logit


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "q_proj"])
def test_clip_caps_exactly_the_heads_over_tau(q_lora_rank):
    model = _model(q_lora_rank)
    S, inputs = _capture_attention_inputs(model, _ids())
    over = S > TAU
    assert over.sum() == 3 and over[0, 1] and over[0, 3] and over[1, 2]  # the inflated heads, only them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = attention_modules(model)
    outputs_before = [_per_head(attn, args)[0] for attn, args in zip(layers, inputs)]

    gamma = qk_clip_(model, S, TAU)

    assert torch.equal(gamma[~over], torch.ones(int((~over).sum())))
    torch.testing.assert_close(gamma[over], TAU / S[over], rtol=1e-6, atol=0)

    for l, (attn, args) in enumerate(zip(layers, inputs)):
        out, max_logit = _per_head(attn, args)
        # gamma * S in float32 through a rescaled matmul chain: measured relative error ~1e-7.
        torch.testing.assert_close(max_logit, torch.minimum(S[l], torch.tensor(TAU)), rtol=1e-4, atol=0)
        for h in range(attn.num_heads):
            same = torch.equal(out[:, h], outputs_before[l][:, h])
            assert same == (not over[l, h]), (l, h)  # untouched heads: bit-identical output

    after = model.state_dict()
    for l, attn in enumerate(layers):
        H, nope, rope, v = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
        prefix = f"model.layers.{l}.self_attn."
        q_name = prefix + ("q_proj.weight" if q_lora_rank is None else "q_b_proj.weight")
        q_old = rearrange(before.pop(q_name), "(h d) i -> h d i", h=H)
        q_new = rearrange(after[q_name], "(h d) i -> h d i", h=H)
        kv_old = rearrange(before.pop(prefix + "kv_b_proj.weight"), "(h d) i -> h d i", h=H)
        kv_new = rearrange(after[prefix + "kv_b_proj.weight"], "(h d) i -> h d i", h=H)
        g = gamma[l][:, None, None]
        assert torch.equal(kv_new[:, nope:], kv_old[:, nope:])  # v rows of every head
        keep = ~over[l]
        assert torch.equal(q_new[keep], q_old[keep]) and torch.equal(kv_new[keep], kv_old[keep])
        torch.testing.assert_close(q_new[:, :nope], q_old[:, :nope] * g.sqrt(), rtol=1e-6, atol=0)
        torch.testing.assert_close(q_new[:, nope:], q_old[:, nope:] * g, rtol=1e-6, atol=0)
        torch.testing.assert_close(kv_new[:, :nope], kv_old[:, :nope] * g.sqrt(), rtol=1e-6, atol=0)
        assert q_new.shape[1] == nope + rope and kv_new.shape[1] == nope + v
    for name, tensor in before.items():  # kv_a_proj_with_mqa, o_proj, FFNs, norms, buffers, ...
        assert torch.equal(after[name], tensor), name


def test_full_forward_max_logits_after_clip_are_min_of_before_and_tau():
    # Clip only in the last layer, so every layer sees the same input as before the clip.
    model = _model(inflate={1: [0, 2]})
    ids = _ids()
    with torch.no_grad():
        S = model(ids, telemetry=True).telemetry.max_logits
        logits_layer0_heads = S[0].clone()
        qk_clip_(model, S, TAU)
        S_after = model(ids, telemetry=True).telemetry.max_logits
    assert torch.equal(S_after[0], logits_layer0_heads)
    torch.testing.assert_close(S_after, torch.clamp(S, max=TAU), rtol=1e-4, atol=0)


def test_nothing_over_tau_changes_nothing():
    model = _model(inflate={})
    S, _ = _capture_attention_inputs(model, _ids())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gamma = qk_clip_(model, S, TAU)
    assert torch.equal(gamma, torch.ones_like(S))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_head_exactly_at_tau_is_untouched():
    S = torch.tensor([[1.0, 2.0, 0.5, 4.0]])
    assert torch.equal(clip_factors(S, 1.0), torch.tensor([[1.0, 0.5, 1.0, 0.25]]))


def test_bf16_weights():
    model = _model(q_lora_rank=None, dtype=torch.bfloat16)
    S, inputs = _capture_attention_inputs(model, _ids())
    over = S > TAU
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qk_clip_(model, S, TAU)
    for l, (attn, args) in enumerate(zip(attention_modules(model), inputs)):
        _, max_logit = _per_head(attn, args)
        # bf16 logits near 1.0 have a 2^-7 = 0.8% ulp: measured 0.78% (one ulp) off tau.
        torch.testing.assert_close(max_logit.float(), torch.clamp(S[l].float(), max=TAU), rtol=0.02, atol=0)
        q_old = rearrange(before[f"model.layers.{l}.self_attn.q_proj.weight"], "(h d) i -> h d i", h=attn.num_heads)
        q_new = rearrange(attn.q_proj.weight, "(h d) i -> h d i", h=attn.num_heads)
        assert torch.equal(q_new[~over[l]], q_old[~over[l]])


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), "100"])
def test_bad_tau(tau):
    model = _model(inflate={})
    with pytest.raises(ValueError, match="tau"):
        qk_clip_(model, torch.zeros(2, 4), tau)


@pytest.mark.parametrize("shape", [(2, 5), (4,), (1, 2, 4)])
def test_wrong_shape_names_the_expected_shape(shape):
    model = _model(inflate={})
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        qk_clip_(model, torch.zeros(shape), TAU)


def test_non_finite_max_logits_are_an_error():
    model = _model(inflate={})
    S = torch.zeros(2, 4)
    S[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"\[\[1, 3\]\]"):
        qk_clip_(model, S, TAU)


def _loss(model, ids):
    out = model(ids, telemetry=True)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return loss, out.telemetry.max_logits


def test_muonclip_is_a_muon_step_then_the_clip():
    ids = _ids()
    clip_model, plain_model = _model(), _model()
    clip_opt = build_optimizer(clip_model, "muonclip", lr=1e-2, tau=TAU)
    plain_opt = build_optimizer(plain_model, "muon", lr=1e-2)
    for step in range(2):
        loss, S = _loss(clip_model, ids)
        loss.backward()
        clip_opt.step(max_logits=S)
        clip_opt.zero_grad()
        loss, S_plain = _loss(plain_model, ids)
        loss.backward()
        plain_opt.step(max_logits=S_plain)
        plain_opt.zero_grad()
        gamma = qk_clip_(plain_model, S_plain, TAU)
        assert torch.equal(S, S_plain) and torch.equal(clip_opt.last_gamma, gamma)
        m = clip_opt.last_metrics
        assert m["qk_clip/heads_clipped"] == int((S > TAU).sum())
        assert m["max_logit"] == pytest.approx(float(S.max()))
        assert m["max_logit/layer1"] == pytest.approx(float(S[1].max()))
    for (name, a), b in zip(clip_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(a, b), name
    assert clip_opt.clip_counts[0, 1] >= 1 and clip_opt.clip_counts[0, 0] == 0
    assert m["qk_clip/frac_heads_ever_clipped"] == pytest.approx(float((clip_opt.clip_counts > 0).float().mean()))


def test_muonclip_step_needs_well_shaped_max_logits_and_changes_nothing_otherwise():
    model = _model()
    opt = build_optimizer(model, "muonclip", lr=1e-2, tau=TAU)
    loss, S = _loss(model, _ids())
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="max_logits"):
        opt.step()
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        opt.step(max_logits=S[:, :3])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert not opt.state  # no optimizer state was created either


def _stepped_state(model, opt):
    """Weights, optimizer state and QK-Clip counters, copied."""
    import copy

    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))


def _same(a, b):
    (wa, sa), (wb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert all(torch.equal(sa["state"][k][n], sb["state"][k][n]) for n in sa["state"][k]), k
    assert torch.equal(sa["qk_clip"]["clip_counts"], sb["qk_clip"]["clip_counts"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_muonclip_step_with_non_finite_max_logits_is_all_or_nothing(bad):
    """Before: ValueError from qk_clip_ after every parameter and its momentum had been updated."""
    model = _model()
    opt = build_optimizer(model, "muonclip", lr=1e-2, tau=TAU)
    for _ in range(2):  # one good step first, so there is state to keep
        loss, S = _loss(model, _ids())
        loss.backward()
        if not opt.state:
            opt.step(max_logits=S)
            opt.zero_grad()
    before = _stepped_state(model, opt)
    S = S.clone()
    S[1, 2] = bad
    with pytest.raises(ValueError, match=r"max_logits holds inf or nan at \(layer, head\) \[\[1, 2\]\]"):
        opt.step(max_logits=S)
    _same(before, _stepped_state(model, opt))


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_every_kind_checks_max_logits_before_stepping(kind):
    model = _model()
    opt = build_optimizer(model, kind, lr=1e-2)
    loss, S = _loss(model, _ids())
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    for bad in ([1.0, 2.0], S[0], "S"):  # MuonAdamW has no model to know the shape from; it needs (layers, heads)
        with pytest.raises(ValueError, match="max_logits"):
            opt.step(max_logits=bad)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and not opt.state
    opt.step(max_logits=S)  # well-formed ones are recorded


@pytest.mark.parametrize("kind", ["muonclip", "muon", "adamw"])
@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("lr", -1.0), ("weight_decay", float("inf")),
                                       ("lr", "0.1")])
def test_a_group_hyperparameter_changed_after_construction_is_checked_before_any_parameter_moves(kind, key, value):
    """A scheduler (or a hand) can set a group's lr to nan; the step used to apply it group by group."""
    model = _model()
    opt = build_optimizer(model, kind, lr=1e-2, tau=TAU)
    loss, S = _loss(model, _ids())
    loss.backward()
    opt.param_groups[-1][key] = value  # the last group: every other group would step first
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"param_groups\[{len(opt.param_groups) - 1}\].*{key}"):
        opt.step(max_logits=S)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and not opt.state
