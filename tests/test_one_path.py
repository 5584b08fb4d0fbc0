"""One code path per layer: the experts fed by a provider compute what the stacked experts compute, one
expert in memory at a time; the streaming analysis runs the model's own layers, so a change to the
model's math shows up in the stream too; checkpoints are walked and quantized the one same way."""

import json
import weakref

import pytest
import torch

import k2mini
from checkpoint_factory import fp8_checkpoint
from k2mini.analysis import routing_stats as stats, stream as stream_mod, stream_activations
from k2mini.analysis.params import hf_tensor_shapes
from k2mini.checkpoint.names import hf_tensors
from k2mini.moe import ExpertProvider, Experts, MoE, route


class Stack(ExpertProvider):
    """A provider that hands out copies of a stack's experts and watches how many are alive."""

    def __init__(self, experts: Experts, watch: bool = True):
        self.experts, self.watch, self.log, self.alive = experts, watch, [], weakref.WeakSet()

    def plan(self, experts):
        self.log.append(("plan", list(experts)))

    def get(self, e):
        assert not self.alive, "an expert's weights are still referenced when the next one is asked for"
        self.log.append(("get", e))
        ws = tuple(w[e].detach().clone() for w in (self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj))
        if self.watch:  # (with gradients, the graph keeps each expert's weights for the backward)
            self.alive.update(ws)
        return ws

    def done(self, e):
        assert not self.alive, "done(e) called while expert e's weights are still referenced"
        self.log.append(("done", e))


def micro(**changes):
    return k2mini.K2Config.preset("k2-micro").replace(**changes)


@pytest.mark.parametrize("E,k,N", [(16, 2, 40), (12, 3, 7), (8, 4, 1)])
def test_provided_experts_equal_the_stacked_ones(E, k, N):
    torch.manual_seed(E)
    moe = MoE(micro(n_routed_experts=E, num_experts_per_tok=k))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, N, 64)
    with torch.no_grad():
        stacked, routing = moe(x)
        provider = Stack(moe.experts)
        moe.experts.provider = provider
        provided, routing2 = moe(x)
    assert torch.equal(routing.indices, routing2.indices)
    assert (provided - stacked).abs().max() < 1e-5
    used = sorted(set(routing.indices.reshape(-1).tolist()))
    expected = [("plan", used)] + [step for e in used for step in (("get", e), ("done", e))]
    assert provider.log == expected  # only the experts that received tokens, each once, in order


def test_provided_experts_have_gradients_like_the_stacked_ones():
    torch.manual_seed(0)
    experts = Experts(micro())
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(20, 64, requires_grad=True)
    routing = route(x.detach(), torch.randn(16, 64), torch.zeros(16), top_k=2)
    g_stacked = torch.autograd.grad(experts(x, routing).square().sum(), x)[0]
    experts.provider = Stack(experts, watch=False)
    g_provided = torch.autograd.grad(experts(x, routing).square().sum(), x)[0]
    assert (g_provided - g_stacked).abs().max() < 1e-4


def test_streaming_holds_one_piece_or_one_expert_at_a_time(monkeypatch):
    """Every piece is freed before the next one is read, and an expert is read only when no piece is held."""
    path = fp8_checkpoint()[0]
    held, events = [], []
    real_load, real_free, real_expert = stream_mod.load_piece, stream_mod.free_piece, stream_mod.load_expert
    alive = weakref.WeakSet()

    def load_piece(reader, module, prefix):
        assert not held and not alive, (prefix, held)
        held.append(prefix)
        events.append(prefix)
        return real_load(reader, module, prefix)

    def free_piece(module):
        held.pop()
        real_free(module)
        assert all(t.device.type == "meta" for t in module.parameters())

    def load_expert(reader, layer, e):
        assert not held and not alive, (layer, e, held)
        ws = real_expert(reader, layer, e)
        alive.update(ws)
        events.append(f"expert {layer}.{e}")
        return ws

    monkeypatch.setattr(stream_mod, "load_piece", load_piece)
    monkeypatch.setattr(stream_mod, "free_piece", free_piece)
    monkeypatch.setattr(stream_mod, "load_expert", load_expert)
    stream_activations(path, torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1)), progress=False)
    first_moe = [e.removeprefix("model.layers.1.") for e in events if e.startswith("model.layers.1.")]
    assert first_moe == ["input_layernorm.", "self_attn.", "post_attention_layernorm.", "mlp.gate.", "mlp.shared_experts."]
    assert any(e.startswith("expert 1.") for e in events) and not held


def _change_the_math(monkeypatch):
    """Halve MLA's output, reweight route()'s mixing weights, scale every expert's output and the
    decoder layer's result: four edits to the model's math, each in the one place it lives."""

    def scaled(real, by):
        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            return (out[0] * by, *out[1:]) if isinstance(out, tuple) else out * by

        return forward

    monkeypatch.setattr(k2mini.attention.MultiHeadLatentAttention, "forward",
                        scaled(k2mini.attention.MultiHeadLatentAttention.forward, 0.5))  # fmt: skip
    monkeypatch.setattr(k2mini.model.DecoderLayer, "forward", scaled(k2mini.model.DecoderLayer.forward, 0.9))
    monkeypatch.setattr(k2mini.moe, "grouped_experts", scaled(k2mini.moe.grouped_experts, 0.7))
    real_weights = k2mini.moe.mixing_weights
    monkeypatch.setattr(k2mini.moe, "mixing_weights",
                        lambda s, i, *a: real_weights(s, i, *a) * torch.linspace(1.0, 0.5, i.shape[-1]))  # fmt: skip


def test_a_change_to_the_models_math_changes_the_stream_alike(monkeypatch):
    """The stream has no copy of the layer math: change the model's, and the streamed pass still
    equals the in-memory model (and differs from the stream before the change)."""
    path = fp8_checkpoint()[0]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    before = stream_activations(path, ids, progress=False)
    _change_the_math(monkeypatch)
    after = stream_activations(path, ids, progress=False)
    model = k2mini.load_pretrained(path, progress=False)
    with torch.no_grad():
        out = model(ids, telemetry=True)
        x = model.model.embed_tokens(ids)
        cos, sin = k2mini.rope.rope_cos_sin(torch.arange(ids.shape[1]), model.inv_freq, model.rope_attention_factor)
        for layer in model.model.layers:
            x = layer(x, cos, sin)[0]
    assert (after.hidden - before.hidden).abs().max() > 1e-2
    # the stream and the model sum in other orders (other kernels): rounding, relative to the stream's scale
    torch.testing.assert_close(after.hidden, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    assert torch.equal(after.counts, out.telemetry.loads)
    E = model.config.n_routed_experts
    assert torch.allclose(after.weight_sum, torch.stack([stats.weight_sums(r.indices, r.weights, E) for r in out.telemetry.routers]))


def test_one_walk_over_the_checkpoint_tensors():
    config = micro(num_hidden_layers=3)
    model = k2mini.K2ForCausalLM(config)
    walked = hf_tensors(model)
    names = [hf for hf, _ in walked]
    assert len(names) == len(set(names))
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in names
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in names
    expert = dict(walked)["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert expert.data_ptr() == model.model.layers[1].mlp.experts.up_proj[3].data_ptr()  # a view: loads write into it
    assert [(hf, tuple(t.shape)) for hf, t in walked] == hf_tensor_shapes(config)


def test_one_fp8_quantization_config(tmp_path):
    from k2mini.checkpoint import save_pretrained
    from k2mini.presets import K2_QUANTIZATION_CONFIG

    for preset in ("kimi-k2", "deepseek-v3"):
        assert k2mini.K2Config.preset(preset).quantization_config == K2_QUANTIZATION_CONFIG
    saved = save_pretrained(k2mini.K2ForCausalLM(micro()), tmp_path / "ckpt", fp8=True, progress=False)
    assert json.loads((saved / "config.json").read_text())["quantization_config"] == K2_QUANTIZATION_CONFIG
