"""The model's own invariants: absorbed decode == full forward, telemetry, routing rules, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import k2mini
from k2mini import K2Config, K2ForCausalLM, KVCache
from k2mini.moe import route


def random_model(config, seed=0, std=0.1):
    torch.manual_seed(seed)
    model = K2ForCausalLM(config).eval()
    model.reset_parameters()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
        for layer in model.moe_layers():
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def yarn_model():
    config = K2Config.preset("k2-micro").replace(
        num_hidden_layers=3,
        rope_scaling=dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=64,
                          beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    )
    return random_model(config)


def test_absorbed_decode_with_cache_equals_full_forward(yarn_model):
    ids = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = yarn_model(ids).logits
        cache = KVCache.empty(yarn_model.config)
        steps = [yarn_model(ids[:, :8], cache=cache, absorbed=True).logits]  # prefill 8, then 1 by 1
        for t in range(8, 40):
            steps.append(yarn_model(ids[:, t : t + 1], cache=cache, absorbed=True).logits)
    decoded = torch.cat(steps, dim=1)
    assert cache.length == 40
    assert full.abs().max() > 0.5
    assert (decoded - full).abs().max().item() <= 1e-4


def test_cache_holds_only_latent_and_rope_key(yarn_model):
    c = yarn_model.config
    cache = KVCache.empty(c)
    with torch.no_grad():
        yarn_model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    assert cache.numel_per_token() == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)


def test_naive_and_absorbed_forms_agree(yarn_model):
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = yarn_model(ids, telemetry=True), yarn_model(ids, absorbed=True, telemetry=True)
    assert (a.logits - b.logits).abs().max().item() <= 1e-5
    assert torch.allclose(a.telemetry.max_logits, b.telemetry.max_logits, rtol=1e-5, atol=1e-6)


def test_max_logit_telemetry_is_the_causal_max(yarn_model):
    """Recompute layer 0's logits by hand: the recorded max is over causal positions only."""
    from k2mini.attention import mla_logits, causal_mask
    from k2mini.rope import rope_cos_sin

    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(4))
    m = yarn_model
    with torch.no_grad():
        tel = m(ids, telemetry=True).telemetry
        x = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids))
        attn = m.model.layers[0].self_attn
        cos, sin = rope_cos_sin(torch.arange(16), m.inv_freq, m.rope_attention_factor)
        q_nope, q_rope = attn.queries(x, cos, sin)
        kv_latent, k_rope = attn.latent(x, cos, sin)
        from einops import rearrange

        kv = rearrange(attn.kv_b_proj(kv_latent), "b s (h d) -> b h s d", h=attn.num_heads)
        logits = mla_logits(q_nope, q_rope, kv[..., : attn.qk_nope_head_dim], k_rope, attn.scale)
        causal = logits.masked_fill(~causal_mask(16, 16), float("-inf")).amax(dim=(0, 2, 3))
        everything = logits.amax(dim=(0, 2, 3))
    assert tel.max_logits.shape == (m.config.num_hidden_layers, m.config.num_attention_heads)
    assert torch.allclose(tel.max_logits[0], causal)
    assert not torch.allclose(causal, everything)  # the mask matters for this batch


def test_router_telemetry(yarn_model):
    c = yarn_model.config
    ids = torch.randint(0, 260, (3, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tel = yarn_model(ids, telemetry=True).telemetry
    assert [r.layer for r in tel.routers] == list(range(c.first_k_dense_replace, c.num_hidden_layers))
    for r in tel.routers:
        assert r.indices.shape == (3, 10, c.num_experts_per_tok)
        assert r.scores.shape == (3, 10, c.n_routed_experts)
        assert int(r.load.sum()) == 3 * 10 * c.num_experts_per_tok
        assert torch.equal(r.load, torch.bincount(r.indices.flatten(), minlength=c.n_routed_experts))
        # normalized weights times the routed scaling factor
        assert torch.allclose(r.weights.sum(-1), torch.full((3, 10), c.routed_scaling_factor))


def test_route_bias_selects_but_does_not_weight():
    torch.manual_seed(0)
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # expert 5 always chosen
    r = route(x, w, bias, top_k=2, norm_topk_prob=False, routed_scaling_factor=1.0)
    scores = torch.sigmoid(x @ w.T)
    assert (r.indices == 5).any(-1).all()
    assert torch.allclose(r.weights, scores.gather(1, r.indices))  # unbiased scores weight the mix
    second = scores[:, :5].argmax(-1)
    assert torch.equal(torch.sort(r.indices, -1).values, torch.sort(torch.stack([second, torch.full_like(second, 5)], -1), -1).values)


def test_group_limited_routing_stays_in_kept_groups():
    torch.manual_seed(1)
    x, w = torch.randn(64, 8), torch.randn(16, 8)
    r = route(x, w, torch.zeros(16), top_k=4, n_group=4, topk_group=2)
    groups = r.indices // 4
    assert (torch.tensor([len(set(g.tolist())) for g in groups]) <= 2).all()


def test_grouped_experts_equal_per_token_loop():
    """Sorting token-slots by expert and running one matmul per hit expert == the textbook loop."""
    config = K2Config.preset("k2-micro")
    model = random_model(config, seed=2)
    moe = model.moe_layers()[0].mlp
    x = torch.randn(1, 30, config.hidden_size)
    with torch.no_grad():
        y, routing = moe(x)
        ref = torch.zeros(30, config.hidden_size)
        ex = moe.experts
        for t in range(30):
            for j in range(config.num_experts_per_tok):
                e = routing.indices[t, j]
                h = torch.nn.functional.silu(ex.gate_proj[e] @ x[0, t]) * (ex.up_proj[e] @ x[0, t])
                ref[t] += routing.weights[t, j] * (ex.down_proj[e] @ h)
        ref += moe.shared_experts(x[0])
    assert torch.allclose(y[0], ref, atol=1e-5)


def test_gradients_flow_to_experts_and_router():
    model = random_model(K2Config.preset("k2-micro"), seed=3)
    model.train()
    ids = torch.randint(0, 260, (2, 12))
    out = model(ids, telemetry=True)
    loss = out.logits.logsumexp(-1).mean() + sum(r.scores.mean() for r in out.telemetry.routers)
    loss.backward()
    moe = model.moe_layers()[0].mlp
    assert moe.experts.gate_proj.grad is not None and moe.experts.gate_proj.grad.abs().sum() > 0
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_generate_sampling_is_seeded_and_in_vocab():
    model = random_model(K2Config.preset("k2-micro"), seed=4)
    prompt = torch.randint(0, 260, (2, 3))
    a = model.generate(prompt, 10, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 13) and int(a.max()) < 260


def test_meta_device_build_of_full_k2():
    with torch.device("meta"):
        model = K2ForCausalLM(K2Config.preset("kimi-k2"))
    assert model.model.layers[5].mlp.experts.gate_proj.shape == (384, 2048, 7168)


def test_out_of_vocabulary_ids_are_named():
    model = K2ForCausalLM(K2Config.preset("k2-micro"))
    with pytest.raises(ValueError, match="token id 260.*vocabulary"):
        model(torch.tensor([[1, 2, 260]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.tensor([1, 2]))


@pytest.fixture
def saved_micro(tmp_path):
    model = random_model(K2Config.preset("k2-micro"), seed=5)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("gate_proj", "up_proj", "down_proj")) and ".experts." in name:
            for e in range(t.shape[0]):
                state[f"{name.rsplit('.', 1)[0]}.{e}.{name.rsplit('.', 1)[1]}.weight"] = t[e].contiguous()
        else:
            state[name] = t.contiguous()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
    return tmp_path, model


def test_load_pretrained_round_trip(saved_micro):
    path, model = saved_micro
    loaded = k2mini.load_pretrained(path, progress=False)
    ids = torch.randint(0, 260, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_checkpoint_missing_tensor_is_named(saved_micro):
    path, _ = saved_micro
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.kv_b_proj.weight"):
        k2mini.load_pretrained(path, progress=False)


def test_checkpoint_wrong_shape_is_named(saved_micro):
    path, _ = saved_micro
    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 5)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="experts.*up_proj.*shape"):
        k2mini.load_pretrained(path, progress=False)


def test_config_json_with_wrong_shape_is_named(saved_micro):
    """config.json says hidden_size 96 while the tensors are 64 wide: the first mismatching tensor is named."""
    path, model = saved_micro
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.\S+ has shape"):
        k2mini.load_pretrained(path, progress=False)
    cfg["n_group"] = 3  # 16 experts in 3 groups
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*n_group"):
        k2mini.load_pretrained(path, progress=False)


def test_compile_layers_gives_the_same_logits_and_gradients(tmp_path):
    """The opt-in torch.compile of the static parts changes speed, not the function, and never crashes:
    training-mode logits and gradients, a no_grad forward, generate and train() with evaluation equal an
    eager twin's at 1 and 2 threads, in a child process (an abort fails this test instead of killing
    pytest). Under non-native kernels (ATEN_CPU_CAPABILITY set) compile_layers() may refuse instead, with
    the reason and the settings; on the native kernels it must work."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(("To be, or not to be, that is the question:\n" * 40 + "def f(x):\n    return x * 2\n" * 40) * 3)
    worker = Path(__file__).with_name("compile_worker.py")
    done = subprocess.run([sys.executable, str(worker), str(corpus)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"compile worker exited {done.returncode}: {done.stderr[-2000:]}"
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["threads"] for r in results] == [1, 2]
    for r in results:
        if "refused" in r:
            assert os.environ.get("ATEN_CPU_CAPABILITY"), f"refused on the native kernels: {r['refused']}"
            assert "compile_layers() refused" in r["refused"] and f"{r['threads']} thread" in r["refused"]
            assert "ATEN_CPU_CAPABILITY=" in r["refused"]
            continue
        assert r["logits"] < 1e-4 and r["no_grad_logits"] < 1e-4, r
        assert r["max_logits"] < 1e-4 and r["grads"] <= 1e-4, r
        assert r["generate_equal"], r
        assert r["evaluations"] == 2 and r["train_losses"] < 1e-4 and r["val_losses"] < 1e-4, r


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_batches_and_sequences_are_a_clear_error(yarn_model, shape):
    """Used to crash with an IndexError deep inside the forward."""
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids has no tokens \(shape " + str(shape).replace("(", r"\(").replace(")", r"\)")):
        yarn_model(ids)
    with pytest.raises(ValueError, match="input_ids has no tokens"):
        yarn_model.generate(ids, 3)


def test_input_ids_that_are_not_a_tensor_are_named(yarn_model):
    with pytest.raises(ValueError, match="input_ids must be a torch tensor"):
        yarn_model([[1, 2, 3]])


SAMPLING_BAD = [
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=-3), "top_k must be an integer >= 1"),
    (dict(top_k=2.5), "top_k must be an integer >= 1"),
    (dict(top_p=-0.1), r"top_p must be a number in \[0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \[0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be a number in \[0, 1\]"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature="hot"), "temperature must be a finite number > 0"),
]


@pytest.mark.parametrize("kwargs,message", SAMPLING_BAD)
def test_sampling_arguments_are_validated_with_clear_messages(yarn_model, kwargs, message):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=message):
        yarn_model.generate(ids, 2, do_sample=True, **kwargs)
    with pytest.raises(ValueError, match=message):
        k2mini.model.sample(torch.randn(2, 260), **{"temperature": 1.0, **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(eos_token_id=999), r"eos_token_id 999 is outside the vocabulary \[0, 260\)"),
])
def test_generate_arguments_are_validated(yarn_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        yarn_model.generate(torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **kwargs})


def test_good_sampling_edges_still_work(yarn_model):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 2, 3]])
    greedy = yarn_model.generate(ids, 4)
    assert torch.equal(yarn_model.generate(ids, 4, do_sample=True, top_k=1, generator=g), greedy)
    assert torch.equal(yarn_model.generate(ids, 4, do_sample=True, top_p=0.0, generator=g), greedy)
    assert yarn_model.generate(ids, 4, do_sample=True, top_k=10**6, top_p=1.0, generator=g).shape == (1, 7)
    assert torch.equal(yarn_model.generate(ids, 0), ids)
