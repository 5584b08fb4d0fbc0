"""stream_activations: a layer-by-layer pass over a checkpoint that routes exactly like the in-memory model."""

import json
import shutil

import pytest
import torch

import k2mini
from checkpoint_factory import fp8_checkpoint
from http_range_server import RangeServer
from reference import randomize_
from k2mini.analysis import routing_stats as stats, stream as stream_mod, stream_activations
from k2mini.checkpoint import CheckpointError, save_pretrained
from k2mini.rope import rope_cos_sin


def randomized(config, seed=0, std=0.15):
    """A K2ForCausalLM with weights large enough that routing is far from uniform."""
    torch.manual_seed(seed)
    return randomize_(k2mini.K2ForCausalLM(config).eval(), seed, std)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """DeepSeek-V3-style grouped routing (n_group 4, topk_group 2), fp8, many small shards."""
    config = k2mini.K2Config.preset("k2-micro").replace(
        num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2
    )
    path = tmp_path_factory.mktemp("grouped") / "ckpt"
    save_pretrained(randomized(config), path, fp8=True, max_shard_bytes=60_000, progress=False)
    return path


@pytest.fixture(scope="module", params=["partial-blocks", "grouped"])
def ckpt(request, grouped):
    if request.param == "partial-blocks":
        return fp8_checkpoint()[0]  # written by an independent writer, with an MTP layer to ignore
    return grouped


def in_memory(path, ids, upto=None):
    """Telemetry and the residual stream after each layer, from the loaded model."""
    model = k2mini.load_pretrained(path, progress=False)
    with torch.no_grad():
        out = model(ids, telemetry=True)
        x = model.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(torch.arange(ids.shape[1]), model.inv_freq, model.rope_attention_factor)
        hidden = []
        for layer in model.model.layers[:upto]:
            x = layer(x, cos, sin)[0]
            hidden.append(x)
    return model, out.telemetry, hidden


def assert_stream_close(streamed, reference):
    """Equal up to float rounding of the residual stream: sums in another order give differences of about
    1e-6 of the stream's largest value (1.4e-5 on a scale of 14 under MKL_CBWR=COMPATIBLE), where a wrong
    layer gives differences of order 1."""
    scale = reference.abs().max().item()
    torch.testing.assert_close(streamed, reference, rtol=1e-5, atol=1e-5 * scale)


def token_batch(vocab, shape=(3, 24), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_streaming_equals_in_memory(ckpt):
    model_config = k2mini.K2Config.from_hf(json.loads((ckpt / "config.json").read_text()))
    ids = token_batch(model_config.vocab_size)
    r = stream_activations(ckpt, ids, labels=["a", "b", "a"], progress=False)
    model, tel, hidden = in_memory(ckpt, ids)
    assert r.layers == [rec.layer for rec in tel.routers]
    assert torch.equal(r.counts, tel.loads)  # exact
    for i, rec in enumerate(tel.routers):
        E = model_config.n_routed_experts
        assert torch.equal(r.coactivation[i], stats.coactivation_counts(rec.indices, E))
        assert torch.allclose(r.weight_sum[i], stats.weight_sums(rec.indices, rec.weights.detach(), E))
        assert torch.equal(r.counts_by_label["b"][i], stats.expert_counts(rec.indices[1], E))
    assert torch.equal(r.counts_by_label["a"] + r.counts_by_label["b"], r.counts)
    assert_stream_close(r.hidden, hidden[-1])
    assert torch.allclose(r.max_logits, tel.max_logits, atol=1e-5)
    # every token touched k experts per MoE layer: the share is the configuration's active / total
    counts = model_config.param_counts()
    assert torch.allclose(r.token_param_share, torch.full_like(r.token_param_share, counts["active"] / counts["total"]))
    assert r.n_tokens == ids.numel() and r.bytes_read > 0


def test_reads_only_experts_that_received_tokens(grouped, monkeypatch):
    read = []
    real = stream_mod.load_expert
    monkeypatch.setattr(stream_mod, "load_expert", lambda reader, layer, e: read.append((layer, e)) or real(reader, layer, e))
    ids = torch.tensor([[5, 9]])
    r = stream_activations(grouped, ids, progress=False)
    _, tel, _ = in_memory(grouped, ids)
    for i, rec in zip(r.layers, tel.routers):
        used = sorted(set(rec.indices.reshape(-1).tolist()))
        assert sorted(e for layer, e in read if layer == i) == used  # each used expert read once, no other
    assert r.experts_loaded == [len(set(rec.indices.reshape(-1).tolist())) for rec in tel.routers]


def test_each_expert_is_hinted_before_it_is_read(grouped, monkeypatch):
    events = []
    real_load, real_hint = stream_mod.load_expert, k2mini.CheckpointReader.will_need_expert
    monkeypatch.setattr(stream_mod, "load_expert", lambda reader, layer, e: events.append(("read", layer, e)) or real_load(reader, layer, e))
    monkeypatch.setattr(k2mini.CheckpointReader, "will_need_expert",
                        lambda self, layer, e: events.append(("hint", layer, e)) or real_hint(self, layer, e))
    stream_activations(grouped, torch.tensor([[5, 9, 2, 7]]), progress=False)
    reads = [(layer, e) for kind, layer, e in events if kind == "read"]
    for n, (kind, layer, e) in enumerate(events):
        if kind == "hint":  # announced just before the current expert is read, and read right after it
            later_reads = [(l2, e2) for kind2, l2, e2 in events[n + 1 :] if kind2 == "read"]
            assert later_reads[1] == (layer, e)
    firsts = {min((i for i, r in enumerate(reads) if r[0] == layer)) for layer, _ in reads}
    assert sum(kind == "hint" for kind, *_ in events) == len(reads) - len(firsts)  # all but each layer's first


def test_layer_selection_stops_early(grouped):
    ids = token_batch(260, (2, 10))
    r = stream_activations(grouped, ids, layers=[1], progress=False)
    _, tel, hidden = in_memory(grouped, ids, upto=2)
    assert r.layers == [1] and torch.equal(r.counts[0], tel.loads[0])
    assert_stream_close(r.hidden, hidden[1])
    assert r.max_logits.shape[0] == 2
    r2 = stream_activations(grouped, ids, layers=slice(1, None), progress=False)
    assert r2.layers == [1, 2] and torch.equal(r2.counts, tel.loads)


def test_attention_in_row_chunks_gives_the_same_stream(grouped):
    ids = token_batch(260, (4, 16))
    whole = stream_activations(grouped, ids, progress=False)
    chunked = stream_activations(grouped, ids, attention_budget_bytes=1, progress=False)  # one row at a time
    # Chunking changes only the order of float sums: routing is identical and the stream differs by
    # rounding (measured 0 natively, 1.4e-5 on a scale of 14 under MKL_CBWR=COMPATIBLE, i.e. 1e-6 relative).
    assert torch.equal(whole.counts, chunked.counts)
    assert_stream_close(chunked.hidden, whole.hidden)
    torch.testing.assert_close(chunked.max_logits, whole.max_logits, rtol=1e-5, atol=1e-5)


def test_interrupted_run_resumes_at_the_layer_it_reached(grouped, tmp_path, monkeypatch):
    ids = token_batch(260, (2, 12))
    full = stream_activations(grouped, ids, progress=False)
    real = stream_mod.load_expert

    def crash_in_layer_2(reader, layer, e):
        if layer == 2:
            raise KeyboardInterrupt
        return real(reader, layer, e)

    monkeypatch.setattr(stream_mod, "load_expert", crash_in_layer_2)
    with pytest.raises(KeyboardInterrupt):
        stream_activations(grouped, ids, state_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [stream_mod.STATE_FILE]  # no temporary files left
    monkeypatch.setattr(stream_mod, "load_expert", real)

    loaded = []
    real_piece = stream_mod.load_piece
    monkeypatch.setattr(stream_mod, "load_piece", lambda reader, m, prefix: loaded.append(prefix) or real_piece(reader, m, prefix))
    resumed = stream_activations(grouped, ids, state_dir=tmp_path, progress=False)
    assert resumed.resumed_at == 2
    assert loaded and all(p.startswith("model.layers.2.") for p in loaded)  # layers 0 and 1 not recomputed
    assert torch.equal(resumed.counts, full.counts) and torch.equal(resumed.coactivation, full.coactivation)
    assert torch.equal(resumed.hidden, full.hidden)
    with pytest.raises(ValueError, match="other tokens"):
        stream_activations(grouped, ids + 1, state_dir=tmp_path, progress=False)


def test_over_http_equals_local_and_reads_a_fraction(grouped):
    ids = torch.tensor([[1, 2, 3]])
    local = stream_activations(grouped, ids, progress=False)
    total = sum(f.stat().st_size for f in grouped.iterdir())
    with RangeServer(grouped) as server:
        remote = stream_activations(server.url, ids, progress=False)
        served = server.bytes_served
    assert torch.equal(remote.counts, local.counts) and torch.equal(remote.hidden, local.hidden)
    assert served < 0.75 * total  # 3 tokens: at most 9 of 16 experts per layer, lm_head never
    assert remote.checkpoint_bytes == total - sum(f.stat().st_size for f in grouped.iterdir() if f.suffix == ".json")


def test_bad_input(grouped, tmp_path):
    with pytest.raises(ValueError, match="out of range: the checkpoint has 3 layers"):
        stream_activations(grouped, [[1, 2]], layers=[5], progress=False)
    with pytest.raises(ValueError, match="no MoE layer"):
        stream_activations(grouped, [[1, 2]], layers=[0], progress=False)
    with pytest.raises(ValueError, match="empty"):
        stream_activations(grouped, torch.zeros(1, 0, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="outside the checkpoint's vocabulary"):
        stream_activations(grouped, [[1, 999]], progress=False)
    with pytest.raises(ValueError, match="different lengths"):
        stream_activations(grouped, [[1, 2], [3]], progress=False)
    with pytest.raises(ValueError, match="one per row"):
        stream_activations(grouped, [[1, 2]], labels=["a", "b"], progress=False)
    other = tmp_path / "llama"
    shutil.copytree(grouped, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a DeepseekV3-family"):
        stream_activations(other, [[1, 2]], progress=False)
    missing = tmp_path / "missing"
    shutil.copytree(grouped, missing)
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.experts.7.up_proj.weight"]
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="experts.7.up_proj.weight"):
        stream_activations(missing, [[1, 2]], progress=False)  # found before any layer runs
