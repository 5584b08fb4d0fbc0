"""router_summary: routers and correction biases from the weights alone, reading only those tensors."""

import json
import math

import pytest
import torch

import k2mini
from checkpoint_factory import fp8_checkpoint, header_of
from http_range_server import RangeServer
from k2mini.analysis import active_share, layout_bytes, router_summary
from k2mini.checkpoint import CheckpointError, CheckpointReader, save_pretrained

K2_LIKE = dict(
    vocab_size=300, hidden_size=256, intermediate_size=256, moe_intermediate_size=192, num_hidden_layers=3,
    n_routed_experts=64, num_experts_per_tok=4, q_lora_rank=64, kv_lora_rank=64,
)


@pytest.fixture(scope="module")
def k2_layout(tmp_path_factory):
    """K2's layout in small: fp8 experts (64 per layer) in many shards, bf16 router, float32 bias."""
    config = k2mini.K2Config(**K2_LIKE)
    torch.manual_seed(0)
    model = k2mini.K2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.mlp.gate.e_score_correction_bias.normal_(3.0, 0.1)  # DeepSeek-like common offset
    path = tmp_path_factory.mktemp("k2-layout") / "ckpt"
    save_pretrained(model, path, fp8=True, max_shard_bytes=2 * 2**20, dtype=torch.bfloat16, progress=False)
    return path, config


def test_summary_values(k2_layout):
    path, config = k2_layout
    df = router_summary(path, progress=False)
    assert list(df.index) == [1, 2]
    reader = CheckpointReader(path)
    for i in df.index:
        w = reader.get(f"model.layers.{i}.mlp.gate.weight").double()
        b = reader.get(f"model.layers.{i}.mlp.gate.e_score_correction_bias").double()
        row = df.loc[i]
        assert row.bias_offset == pytest.approx(float(b.mean()))
        c = b - b.mean()
        assert row.bias_std == pytest.approx(float(c.std(correction=0)))
        assert (row.bias_min, row.bias_max) == pytest.approx((float(c.min()), float(c.max())))
        assert row.bias_favoured == torch.argsort(c, descending=True)[:5].tolist()
        norms = w.norm(dim=1)
        assert row.router_norm_mean == pytest.approx(float(norms.mean()))
        cos = torch.nn.functional.cosine_similarity(w[:, None], w[None], dim=-1)
        off = cos[~torch.eye(len(w), dtype=torch.bool)]
        assert row.router_cos_mean == pytest.approx(float(off.mean()), abs=1e-9)
        assert row.router_cos_max == pytest.approx(float(off.max()))
        assert len(row.bias_centred) == config.n_routed_experts
    assert "expert_norms" not in df


def test_router_only_summary_reads_only_router_bytes_over_http(k2_layout):
    path, config = k2_layout
    total = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    names = [f"model.layers.{i}.mlp.gate.{t}" for i in (1, 2) for t in ("weight", "e_score_correction_bias")]
    shards = {index["weight_map"][n] for n in names}
    with RangeServer(path) as server:
        df = router_summary(server.url, progress=False)
        sent = server.bytes_served
        touched = {p for p in server.bytes_by_path if p.endswith(".safetensors")}
    E, H = config.n_routed_experts, config.hidden_size
    router_bytes = 2 * (E * H * 2 + E * 4)  # bf16 router, float32 bias, two MoE layers
    json_bytes = sum((path / f).stat().st_size for f in ("config.json", "model.safetensors.index.json"))
    headers = sum(header_of(path / s)[1] for s in shards)
    assert touched == shards and len(set(index["weight_map"].values())) >= 10
    assert sent == json_bytes + headers + router_bytes  # nothing else
    assert df.attrs["bytes_read"] == sent and df.attrs["checkpoint_bytes"] == total
    assert df.attrs["router_bytes"] == router_bytes
    assert sent / total < 0.02
    print(f"router-only summary over HTTP: {sent} of {total} bytes ({sent / total:.3%})")


def test_expert_norms_are_opt_in_and_dequantized(k2_layout):
    path, config = k2_layout
    df = router_summary(path, experts=True, progress=False)
    reader = CheckpointReader(path)
    norms = df.loc[2, "expert_norms"]
    for e in (0, 17, 63):
        w = reader.get_expert(2, e)
        assert norms[e] == pytest.approx(math.sqrt(sum(float(t.double().pow(2).sum()) for t in w.values())))
    assert df.loc[2, "expert_norm_max"] == pytest.approx(norms.max())
    assert df.attrs["read_fraction"] > 0.9  # reading experts reads nearly all of the checkpoint


def test_bad_input(k2_layout, tmp_path):
    path, _ = k2_layout
    with pytest.raises(ValueError, match="layer 3 is out of range: the checkpoint has 3 layers"):
        router_summary(path, layers=[1, 3], progress=False)
    with pytest.raises(ValueError, match="no MoE layer selected"):
        router_summary(path, layers=[0], progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="not a DeepseekV3-family"):
        router_summary(tmp_path, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        router_summary(tmp_path / "empty", progress=False)


def test_partial_blocks_checkpoint_with_mtp_layer():
    path, config, served, _ = fp8_checkpoint()  # independent writer; its MTP layer must not be read
    df = router_summary(path, progress=False)
    assert list(df.index) == [1, 2]
    b = served["model.layers.2.mlp.gate.e_score_correction_bias"].double()
    assert df.loc[2, "bias_std"] == pytest.approx(float((b - b.mean()).std(correction=0)))


def test_layout_bytes_match_a_saved_checkpoint(k2_layout):
    path, config = k2_layout
    data = sum(f.stat().st_size - header_of(f)[1] for f in path.glob("*.safetensors"))
    assert sum(layout_bytes(config, fp8=True, dtype=torch.bfloat16).values()) == data


def test_k2_router_is_three_hundredths_of_a_percent_of_its_checkpoint():
    k2 = k2mini.K2Config.preset("kimi-k2")
    b = layout_bytes(k2)
    assert b["router"] == 60 * (384 * 7168 * 2 + 384 * 4)
    share = b["router"] / sum(b.values())
    assert 0.0003 < share < 0.00035, share
    table = active_share(k2)
    assert table.loc["total", "total"] == 1_026_408_232_448 and table.loc["total", "active"] == 32_861_500_928
    assert table.loc["routed_experts", "active_share"] == pytest.approx(8 / 384)
