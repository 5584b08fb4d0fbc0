"""save_pretrained: checkpoints transformers loads (same logits), fp8 export K2's way (same tensors
quantized, error within the fp8 rounding bound), and saves that are atomic."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open

import k2mini
from checkpoint_factory import PARTIAL_BLOCKS, k2_quantizes, reference_dequantize, reference_quantize
from k2mini.checkpoint import CheckpointReader, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")


def random_model(seed=0):
    """A k2mini model with weights large enough that routing and attention are far from uniform."""
    model = k2mini.K2ForCausalLM(k2mini.K2Config(**PARTIAL_BLOCKS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.15)
        for layer in model.moe_layers():
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(PARTIAL_BLOCKS["n_routed_experts"], generator=g) * 0.05)
    return model.eval()


IDS = torch.randint(0, PARTIAL_BLOCKS["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(9))


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_pretrained(model, tmp_path_factory.mktemp("save") / "ckpt", max_shard_bytes=150_000, progress=False)


@pytest.fixture(scope="module")
def saved_fp8(model, tmp_path_factory):
    return save_pretrained(model, tmp_path_factory.mktemp("save") / "fp8", fp8=True, max_shard_bytes=150_000, progress=False)


def test_transformers_loads_the_saved_checkpoint(model, saved):
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    ref = logits(model)
    assert ref.abs().max() > 1.0
    assert (logits(hf) - ref).abs().max().item() <= 1e-4


def test_layout_shards_and_index(model, saved, tmp_path):
    files = sorted(os.listdir(saved))
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert files == sorted(["config.json", "model.safetensors.index.json", *shards])
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in index["weight_map"]  # HF's per-expert names
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters()) + 4 * 6 * 2
    for shard in shards:  # the safetensors library reads every shard, metadata included
        with safe_open(saved / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"} and len(f.keys()) > 0
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    (tmp_path / "plain").mkdir()
    assert saved.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's private 0700


def test_round_trip_is_exact(model, saved):
    back = load_pretrained(saved, progress=False)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_fp8_export_quantizes_what_k2_quantizes(model, saved_fp8):
    config = json.loads((saved_fp8 / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    }
    with CheckpointReader(saved_fp8) as reader:
        fp8 = {k for k in reader.keys() if reader.dtype(k) == torch.float8_e4m3fn}
        assert fp8 == {k for k in reader.keys() if k2_quantizes(k)}
        assert "model.layers.1.mlp.gate.weight" not in fp8 and "lm_head.weight" not in fp8
        assert len(fp8) == 3 + 5 * 3 + 3 * 2 + 3 * 6 * 2  # dense FFN, attention, shared experts, routed experts
        for name in fp8:  # the bytes and scales of an independent quantizer, read by safetensors itself
            with safe_open(saved_fp8 / reader.shard_of(name), "pt") as f:
                q, s = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
            q_ref, s_ref = reference_quantize(_original(model, name))
            assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), name
            assert torch.equal(reader.get(name), reference_dequantize(q, s)), name


def _original(model, hf_name):
    m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", hf_name)
    if m:
        return getattr(model.model.layers[int(m.group(1))].mlp.experts, m.group(3)).detach()[int(m.group(2))]
    return model.state_dict()[hf_name]


def test_fp8_round_trip_error_is_fp8_rounding(model, saved_fp8, tmp_path):
    back = load_pretrained(saved_fp8, progress=False)
    worst = 0.0
    for name, a in model.state_dict().items():
        b = back.state_dict()[name]
        stacked_experts = name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj"))
        if not stacked_experts and not k2_quantizes(name):
            assert torch.equal(a, b), name  # router, norms, embeddings, lm_head, bias: untouched
            continue
        # per element |W_hat - W| <= |W| / 17 (normal range) or 2^-10 s (subnormal), s <= amax / 448
        err = (a - b).abs()
        s_max = a.abs().max() / 448
        assert (err <= torch.maximum(a.abs() / 17, s_max * 2**-10) * (1 + 2**-20)).all(), name
        normal = a.abs() > s_max * 2**-6
        worst = max(worst, (err[normal] / a.abs()[normal]).max().item())
    assert 0.055 < worst <= (1 + 2**-20) / 17  # measured: 0.0588, i.e. the 1/17 bound is reached
    # logits of the fp8 round trip equal transformers' on a dequantized copy
    copy = save_pretrained(back, tmp_path / "dequantized", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(copy).eval()
    assert (logits(hf) - logits(back)).abs().max().item() <= 1e-4
    assert (logits(back) - logits(model)).abs().max().item() > 1e-3  # fp8 did change something


def test_bfloat16_export(model, tmp_path):
    path = save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    with CheckpointReader(path) as reader:
        assert reader.dtype("model.layers.1.mlp.experts.0.up_proj.weight") == torch.bfloat16
        assert reader.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == torch.float32


def test_interrupted_save_leaves_no_checkpoint(model, saved, tmp_path, monkeypatch):
    import k2mini.checkpoint.save as save_module

    calls = {"n": 0}
    real = save_module.quantize_fp8

    def failing(w):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt("power cut")
        return real(w)

    monkeypatch.setattr(save_module, "quantize_fp8", failing)
    target = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target, fp8=True, max_shard_bytes=50_000, progress=False)
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary directory

    # over an existing checkpoint: the old one stays complete and loadable
    shutil.copytree(saved, target)
    (target / "tokenizer.json").write_text("{}")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target, fp8=True, max_shard_bytes=50_000, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["new"]
    assert sorted(os.listdir(target)) == sorted(os.listdir(saved) + ["tokenizer.json"])
    assert torch.equal(load_pretrained(target, progress=False).lm_head.weight, model.lm_head.weight)

    # a completed save replaces it whole, carrying files that are not the checkpoint's over
    monkeypatch.setattr(save_module, "quantize_fp8", real)
    save_pretrained(model, target, fp8=True, max_shard_bytes=10**9, progress=False)
    assert sorted(os.listdir(target)) == sorted(
        ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    )
    assert sorted(os.listdir(tmp_path)) == ["new"]


def test_tied_embeddings_round_trip(tmp_path):
    """Used to fail: 'lm_head.weight missing'."""
    torch.manual_seed(0)
    tied = k2mini.K2ForCausalLM(k2mini.K2Config(**PARTIAL_BLOCKS, tie_word_embeddings=True)).eval()
    path = save_pretrained(tied, tmp_path / "tied", progress=False)
    with CheckpointReader(path) as reader:
        assert "lm_head.weight" not in reader and "model.embed_tokens.weight" in reader
    back = load_pretrained(path, progress=False)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(logits(back), logits(tied))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert (logits(hf) - logits(tied)).abs().max().item() <= 1e-4


def test_save_never_deletes_files_it_did_not_write(model, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    mine = {"model_backup.safetensors": b"a user's backup", "model.safetensors": b"not ours", "notes.txt": b"x"}
    for name, data in mine.items():
        (target / name).write_bytes(data)
    save_pretrained(model, target, max_shard_bytes=150_000, progress=False)
    assert all((target / n).read_bytes() == d for n, d in mine.items())
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) > 3
    # a second save replaces its own previous output (known from its index), and only that
    save_pretrained(model, target, max_shard_bytes=10**9, progress=False)
    assert sorted(os.listdir(target)) == sorted([*mine, "config.json", "model.safetensors.index.json",
                                                 "model-00001-of-00001.safetensors"])
    assert all((target / n).read_bytes() == d for n, d in mine.items())


def test_save_refuses_to_replace_a_checkpoint_it_did_not_write(model, tmp_path):
    target = tmp_path / "someone-elses"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "llama"}')
    (target / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match=r"someone-elses.*config\.json.*not written by save_pretrained"):
        save_pretrained(model, target, progress=False)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["someone-elses"]  # no temporary directory left either
    (target / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FileExistsError, match=r"model\.safetensors\.index\.json"):
        save_pretrained(model, target, progress=False)


def test_the_next_save_cleans_up_after_an_interrupted_one(model, tmp_path):
    stale = [tmp_path / ".ckpt.saving-0123456789ab.tmp", tmp_path / ".ckpt.saving-ba9876543210.tmp"]
    for d in stale:  # what kill -9 during a save leaves behind
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"half")
    (tmp_path / ".other.saving-0123456789ab.tmp").mkdir()  # another checkpoint's: not this save's business
    save_pretrained(model, tmp_path / "ckpt", progress=False)
    assert sorted(os.listdir(tmp_path)) == [".other.saving-0123456789ab.tmp", "ckpt"]


def test_a_diverged_model_is_not_exported(tmp_path):
    broken = random_model()
    with torch.no_grad():
        broken.model.layers[1].mlp.experts.up_proj[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight' holds inf or nan"):
        save_pretrained(broken, tmp_path / "ckpt", fp8=True, progress=False)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------- INT4 export (K2-Thinking's layout)
@pytest.fixture(scope="module")
def saved_int4(model, tmp_path_factory):
    return save_pretrained(model, tmp_path_factory.mktemp("save") / "int4", quantization="int4", max_shard_bytes=150_000, progress=False)


def test_int4_export_writes_k2_thinking_layout(model, saved_int4):
    from checkpoint_factory import K2_THINKING_QUANTIZATION

    config = json.loads((saved_int4 / "config.json").read_text())
    assert config["quantization_config"] == K2_THINKING_QUANTIZATION
    index = json.loads((saved_int4 / "model.safetensors.index.json").read_text())["weight_map"]
    packed = [k for k in index if k.endswith(".weight_packed")]
    assert len(packed) == 2 * 6 * 3 and all(re.search(r"mlp\.experts\.\d+\.(gate|up|down)_proj", k) for k in packed)
    for name, shard in index.items():  # what safetensors itself reads back
        with safe_open(saved_int4 / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            t = f.get_tensor(name)
        want = {"weight_packed": torch.int32, "weight_shape": torch.int32, "weight_scale": torch.bfloat16}
        kind = name.rsplit(".", 1)[-1]
        assert t.dtype == want.get(kind, torch.float32 if "correction_bias" in name else torch.bfloat16), name


def test_int4_round_trip_through_k2mini_and_compressed_tensors(model, saved_int4):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    from checkpoint_factory import ct_args

    _, scheme = ct_args(4, 32)
    back = load_pretrained(saved_int4, progress=False)
    stacked = dict(model.named_parameters())
    with CheckpointReader(saved_int4) as reader:
        for layer in (1, 2):
            for e in range(6):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    base = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                    parts = {p: reader.read_raw(f"{base}.{p}") for p in ("weight_packed", "weight_scale", "weight_shape")}
                    parts["weight_scale"] = parts["weight_scale"].float()  # the exact product, not bf16's
                    ct = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
                    ours = back.state_dict()[f"model.layers.{layer}.mlp.experts.{proj}"][e]
                    assert torch.equal(ours, ct), base
                    w = stacked[f"model.layers.{layer}.mlp.experts.{proj}"][e].detach()
                    # round to nearest: half a step, plus the clamp at +7 where the bf16 scale was rounded
                    # down (amax / s <= 7.5 * (1 + 2^-8)): at most 0.53 steps
                    step = parts["weight_scale"].repeat_interleave(32, dim=1)[:, : w.shape[1]]
                    assert ((ours - w).abs() <= 0.53 * step).all(), base
    assert (logits(back) - logits(model)).abs().max().item() > 1e-3  # INT4 did change something


def test_quantization_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        save_pretrained(model, tmp_path / "x", fp8=True, quantization="int4", progress=False)
    with pytest.raises(ValueError, match="quantization must be one of"):
        save_pretrained(model, tmp_path / "x", quantization="int3", progress=False)
    assert not (tmp_path / "x").exists()


def test_transformers_with_compressed_tensors_loads_the_int4_export(saved_int4):
    """transformers decompresses the experts through compressed-tensors, which multiplies in the scale's
    bf16: its experts are k2mini's exact products rounded to bf16. On those weights, in float32, the
    two models give the same logits."""
    pytest.importorskip("compressed_tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved_int4, dtype=torch.float32).eval()
    ours = load_pretrained(saved_int4, progress=False)
    I = ours.config.moe_intermediate_size
    with torch.no_grad():
        for layer in ours.moe_layers():
            theirs = hf.model.layers[layer.index].mlp.experts
            mine = {p: getattr(layer.mlp.experts, p).to(torch.bfloat16) for p in ("gate_proj", "up_proj", "down_proj")}
            assert theirs.gate_up_proj.dtype == torch.bfloat16
            assert torch.equal(theirs.gate_up_proj[:, :I], mine["gate_proj"])
            assert torch.equal(theirs.gate_up_proj[:, I:], mine["up_proj"])
            assert torch.equal(theirs.down_proj, mine["down_proj"])
            for p, w in mine.items():  # k2mini's model on the bf16-rounded experts
                getattr(layer.mlp.experts, p).copy_(w)
            # transformers would run its bf16 experts in bf16 (logits off by ~2 here): the same values in float32
            theirs.gate_up_proj.data = theirs.gate_up_proj.data.float()
            theirs.down_proj.data = theirs.down_proj.data.float()
    assert (logits(hf) - logits(ours)).abs().max().item() <= 1e-4
