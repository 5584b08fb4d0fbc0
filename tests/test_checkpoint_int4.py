"""Kimi-K2-Thinking-layout INT4 checkpoints (compressed-tensors pack-quantized), written by
compressed-tensors' own compressor: k2mini serves its unpacking exactly (float32), the logits equal
transformers' on those weights, and the analysis runs on them; also the K2.5 wrapper layout."""

import json
import shutil

import pytest
import torch

import k2mini
from checkpoint_factory import PARTIAL_BLOCKS, ct_compress, ct_dequantize, hf_state, int4_checkpoint, write_int4_checkpoint
from k2mini.analysis import router_summary, stream_activations
from k2mini.checkpoint import CheckpointError, CheckpointReader
from k2mini.checkpoint.int4 import PackScheme, dequantize_packed, pack, quantize_packed, unpack

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

EXPERT = "model.layers.1.mlp.experts.2.gate_proj.weight"


@pytest.fixture(scope="module")
def ckpt():
    return int4_checkpoint()


def test_reader_serves_compressed_tensors_unpacking_exactly(ckpt):
    path, config, served, _ = ckpt
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    base = EXPERT[: -len(".weight")]
    parts = {index[f"{base}.{p}"] for p in ("weight_packed", "weight_scale", "weight_shape")}
    assert len(parts) == 3  # one expert's three tensors sit in three shards
    with CheckpointReader(path) as reader:
        assert reader.is_packed(EXPERT) and not reader.is_packed("model.layers.1.mlp.gate.weight")
        assert reader.shape(EXPERT) == (96, 160) and reader.shape(EXPERT.replace("gate", "down")) == (160, 96)
        assert sorted(reader.keys()) == sorted(served)
        for name, want in served.items():
            assert torch.equal(reader.get(name), want), name
        shapes = {reader.info(f"{base}.weight_shape").dtype for base in (n[:-7] for n in served if reader.is_packed(n))}
        assert shapes == {"I32", "I64"}


def test_logits_equal_transformers(ckpt):
    path, config, _, dequantized = ckpt
    hf = transformers.AutoModelForCausalLM.from_pretrained(dequantized).eval()
    ids = torch.randint(0, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(5))
    model = k2mini.load_pretrained(path, progress=False)
    with torch.no_grad():
        ref, out = hf(ids).logits, model(ids).logits
    assert ref.abs().max() > 1.0
    assert (out - ref).abs().max().item() <= 1e-4


def test_dtypes_rows_and_out(ckpt):
    path, _, served, _ = ckpt
    want = served[EXPERT]
    with CheckpointReader(path) as reader:
        assert torch.equal(reader.get(EXPERT, torch.bfloat16), want.to(torch.bfloat16))  # rounded once
        out = torch.empty(want.shape, dtype=torch.float64)
        assert reader.get(EXPERT, out=out) is out and torch.equal(out, want.double())
        for rows in (slice(0, 1), slice(30, 70), slice(-3, None)):
            assert torch.equal(reader.get(EXPERT, rows=rows), want[rows])
        assert torch.equal(reader.get_expert(1, 2)["gate_proj"], want)
        assert torch.equal(reader.get(EXPERT, out=torch.empty(160, 96).t()), want)  # a non-contiguous destination
        with pytest.raises(ValueError, match="read_raw"):
            reader.read_raw(EXPERT)
        with pytest.raises(ValueError, match="float dtype"):
            reader.get(EXPERT, torch.int32)
        assert reader.read_raw(EXPERT + "_packed").dtype == torch.int32


SCHEMES = [(4, 32), (4, 16), (8, 32), (2, 64), (4, None)]


# compressed-tensors' group quantization needs whole groups: only the (scheme, width) pairs it can pack
@pytest.mark.parametrize("num_bits, group_size, cols", [
    (bits, group, cols) for bits, group in SCHEMES for cols in (160, 96, 64) if not group or cols % group == 0
])
def test_other_schemes_match_compressed_tensors(num_bits, group_size, cols):
    """Bits, group size and strategy come from the config: each scheme compressed-tensors packs."""
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(cols + num_bits))
    parts = ct_compress(w, num_bits, group_size)
    scheme = PackScheme(num_bits, group_size)
    got = dequantize_packed(parts["weight_packed"], parts["weight_scale"], scheme, cols)
    assert torch.equal(got, ct_dequantize(parts, num_bits, group_size))
    assert tuple(parts["weight_packed"].shape) == scheme.packed_shape(w.shape)


def test_every_code_decodes_and_our_packing_is_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = (torch.arange(16 * 40) % 16 - 8).reshape(16, 40).to(torch.int8)  # -8..7 everywhere
    packed = pack(codes.to(torch.int32) + 8, 4)
    assert torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(unpack(packed, 40), codes) and torch.equal(unpack_from_int32(packed, 4, (16, 40)), codes)
    scale = torch.full((16, 2), 0.5, dtype=torch.bfloat16)
    assert torch.equal(dequantize_packed(packed, scale, PackScheme(4, 32), 40), codes.float() * 0.5)
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    p, s, shape = quantize_packed(w)
    assert shape.tolist() == [8, 96] and s.dtype == torch.bfloat16 and p.shape == (8, 12)
    assert (dequantize_packed(p, s, PackScheme(), 96) - w).abs().max() <= s.float().max() / 2 * 1.01


def test_k25_wrapper_layout_loads_its_text_model(ckpt, tmp_path):
    path, config, served, _ = ckpt
    wrapped = tmp_path / "k25"
    served2 = write_int4_checkpoint(wrapped, config, hf_state(config, seed=7), wrapper=True)
    assert all(torch.equal(served2[k], served[k]) for k in served)
    with CheckpointReader(wrapped) as reader:
        assert reader.prefix == "language_model." and reader.config["model_type"] == "kimi_k2"
        assert "vision_tower.patch_embed.weight" not in reader.keys() and EXPERT in reader
        assert reader.info(EXPERT).name == "language_model." + EXPERT[: -len(".weight")] + ".weight_packed"
    a = k2mini.load_pretrained(wrapped, progress=False).state_dict()
    b = k2mini.load_pretrained(path, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_router_summary_and_stream_equal_the_dequantized_checkpoint(ckpt):
    path, config, _, dequantized = ckpt
    s_int4 = router_summary(path, experts=True, progress=False)
    s_ref = router_summary(dequantized, experts=True, progress=False)
    assert (s_int4["expert_norm_mean"] == s_ref["expert_norm_mean"]).all()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    a = stream_activations(path, ids, progress=False)
    b = stream_activations(dequantized, ids, progress=False)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.coactivation, b.coactivation)


def test_analysis_cli_reads_int4(ckpt, capsys, tmp_path):
    from k2mini.analysis.__main__ import main

    path, *_ = ckpt
    rc = main([str(path), "--static", "--experts", "--no-progress"])
    assert rc == 0 and "expert_norm_mean" in capsys.readouterr().out


def _with_config(src, dst, change):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("symmetric", False, "weights.symmetric = False: asymmetric"),
        ("actorder", "group", "weights.actorder = 'group': activation ordering"),
        ("num_bits", 3, "weights.num_bits = 3"),
        ("strategy", "tensor", "weights.strategy = 'tensor'"),
        ("type", "float", "weights.type = 'float'"),
        ("format", "mxfp4-pack-quantized", "quantization_config.format = 'mxfp4-pack-quantized'"),
        ("input_activations", {"num_bits": 8}, "group_0.input_activations"),
        ("kv_cache_scheme", {"num_bits": 8}, "quantization_config.kv_cache_scheme"),
    ],
)
def test_unsupported_compressed_tensors_features_name_the_field(ckpt, tmp_path, field, value, message):
    path, *_ = ckpt

    def change(q):
        group = q["config_groups"]["group_0"]
        if field in ("format", "kv_cache_scheme"):
            q[field] = value
        elif field == "input_activations":
            group[field] = value
        else:
            group["weights"][field] = value

    bad = _with_config(path, tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=str(bad / "config.json") + ".*" + __import__("re").escape(message)):
        k2mini.load_pretrained(bad, progress=False)


def test_packed_weights_need_a_compressed_tensors_config(ckpt, tmp_path):
    path, *_ = ckpt
    bad = _with_config(path, tmp_path / "bad", lambda q: q.update(quant_method="fp8", weight_block_size=[128, 128]))
    with pytest.raises(CheckpointError, match="weight_packed is pack-quantized, but config.json"):
        k2mini.load_pretrained(bad, progress=False)


def test_channel_strategy_checkpoint(tmp_path):
    config = k2mini.K2Config(**PARTIAL_BLOCKS)
    served = write_int4_checkpoint(tmp_path / "c", config, hf_state(config, seed=2), num_bits=8, group_size=None)
    with CheckpointReader(tmp_path / "c") as reader:
        assert reader.pack_scheme == PackScheme(8, None)
        assert all(torch.equal(reader.get(k), v) for k, v in served.items())


def test_one_expert_over_http_transfers_its_three_parts(ckpt):
    from http_range_server import RangeServer

    path, _, served, _ = ckpt
    with RangeServer(path) as server:
        reader = CheckpointReader(server.url)
        parts = [reader.info(f"{EXPERT[:-7]}.{p}") for p in ("weight_packed", "weight_scale", "weight_shape")]
        before = server.bytes_served
        got = reader.get(EXPERT)
        assert server.bytes_served - before == sum(p.nbytes for p in parts)  # packed words, scales, shape
        assert torch.equal(got, served[EXPERT])
        remote = k2mini.load_pretrained(server.url, progress=False).state_dict()
    local = k2mini.load_pretrained(path, progress=False).state_dict()
    assert all(torch.equal(remote[k], v) for k, v in local.items())
