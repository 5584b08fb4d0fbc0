"""Loading K2-format fp8 checkpoints (several shards, partial 128x128 blocks, an MTP layer and rotary
caches to ignore) from a directory: the logits equal transformers' on the dequantized weights."""

import os

import pytest
import torch

import k2mini
from checkpoint_factory import fp8_checkpoint
from k2mini.checkpoint import CheckpointReader
from k2mini.checkpoint.names import is_ignored

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt():
    return fp8_checkpoint()


@pytest.fixture(scope="module")
def reference_logits(ckpt):
    """transformers' DeepseekV3 on a float32 copy of the dequantized weights (transformers itself loads
    fp8 checkpoints only through its GPU quantizer: on CPU it asks for accelerate and then dequantizes to
    bfloat16, too coarse to compare logits at 1e-4)."""
    _, config, _, dequantized = ckpt
    hf = transformers.AutoModelForCausalLM.from_pretrained(dequantized).eval()
    ids = torch.randint(0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return ids, hf(ids).logits


def test_fp8_checkpoint_logits_equal_transformers(ckpt, reference_logits):
    path, *_ = ckpt
    ids, ref = reference_logits
    model = k2mini.load_pretrained(path, progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert ref.abs().max() > 1.0
    assert (out - ref).abs().max().item() <= 1e-4


def test_reader_serves_every_tensor_dequantized(ckpt):
    path, config, served, _ = ckpt
    with CheckpointReader(path) as reader:
        assert reader.is_fp8("model.layers.1.mlp.experts.2.down_proj.weight")
        assert not reader.is_fp8("model.layers.1.mlp.gate.weight")  # the router stays unquantized
        for name, want in served.items():
            assert torch.equal(reader.get(name), want), name
        assert len(reader.shards()) > 5


def test_row_slices_and_experts(ckpt):
    path, config, served, _ = ckpt
    with CheckpointReader(path) as reader:
        for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_a_proj.weight"):
            assert reader.shape(name)[0] > 128  # slices crossing the first block row boundary
            for rows in (slice(0, 1), slice(100, 150), slice(128, None), slice(-3, None)):
                assert torch.equal(reader.get(name, rows=rows), served[name][rows]), (name, rows)
        expert = reader.get_expert(2, 4)
        for proj, t in expert.items():
            assert torch.equal(t, served[f"model.layers.2.mlp.experts.4.{proj}.weight"])
        with pytest.raises(ValueError, match="contiguous"):
            reader.get(name, rows=slice(0, 10, 2))


def test_dtype_conversion_and_out(ckpt):
    path, config, served, _ = ckpt
    name = "model.layers.2.mlp.shared_experts.down_proj.weight"
    with CheckpointReader(path) as reader:
        assert torch.equal(reader.get(name, torch.bfloat16), served[name].to(torch.bfloat16))
        out = torch.empty(served[name].shape, dtype=torch.float64)
        assert reader.get(name, out=out) is out
        assert torch.equal(out, served[name].double())  # the float32 product, widened
        raw = reader.read_raw(name)
        assert raw.dtype == torch.float8_e4m3fn and raw.shape == served[name].shape


def test_bfloat16_load_keeps_correction_bias_float32(ckpt):
    path, config, served, _ = ckpt
    model = k2mini.load_pretrained(path, dtype=torch.bfloat16, progress=False)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, served["model.layers.1.mlp.gate.e_score_correction_bias"])
    w = model.model.layers[1].mlp.experts.up_proj  # (E, I, H), stacked from per-expert tensors
    for e in range(config.n_routed_experts):
        assert torch.equal(w[e], served[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].to(torch.bfloat16))


def test_iteration_goes_shard_by_shard(ckpt):
    path, *_ = ckpt
    with CheckpointReader(path) as reader:
        keys = reader.keys()
        assert "model.layers.3.eh_proj.weight" in keys  # the MTP layer is there, and ignored on load
        assert not any(k.endswith("_scale_inv") for k in keys)
        names = [n for n, _ in reader.iter_tensors(dtype=torch.float32)]
        assert sorted(names) == sorted(keys)
        shards = [reader.shard_of(n) for n in names]
        assert shards == sorted(shards)  # each shard visited once, in order
        starts = [reader.info(n).start for n in names]
        assert all(a < b for a, b, s, t in zip(starts, starts[1:], shards, shards[1:]) if s == t)


def test_loading_hints_each_next_tensor_and_its_scales_before_reading_it(ckpt, monkeypatch):
    """load_pretrained asks the kernel for the next tensor's bytes (and its fp8 scales) while it converts
    the current one: exactly their byte ranges, in the shard files that hold them."""
    path, *_ = ckpt
    hints = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: hints.append((fd, offset, n, advice)))
    k2mini.load_pretrained(path, progress=False)
    assert hints and all(advice == os.POSIX_FADV_WILLNEED for *_, advice in hints)
    with CheckpointReader(path) as reader:
        infos = [reader.info(n) for n in reader.stored_keys()]
        ranges = {(i.start, i.end - i.start) for i in infos}
        assert {(offset, n) for _, offset, n, _ in hints} <= ranges  # only whole tensors, no blind read-ahead
        hinted = {(o, n) for _, o, n, _ in hints}
        layers = reader.config["num_hidden_layers"]
        loaded = [n for n in reader.keys() if not is_ignored(n, layers)]  # not the MTP layer, rotary caches
        for group in reader.group_by_shard(loaded).values():
            for name in group[1:]:  # every tensor after a shard's first is hinted, fp8 ones with their scales
                names = [name, name + "_scale_inv"] if reader.is_fp8(name) else [name]
                for i in map(reader.info, names):
                    assert (i.start, i.end - i.start) in hinted, i.name


def test_iter_tensors_with_hints_reads_the_same_tensors(ckpt):
    path, *_ = ckpt
    with CheckpointReader(path) as reader:
        streamed = dict(reader.iter_tensors())
        assert streamed.keys() == set(reader.keys())
        for name in list(streamed)[:: max(1, len(streamed) // 10)]:
            assert torch.equal(streamed[name], reader.get(name))


@pytest.mark.parametrize("window", [0, 1, 5000, 10**9])
def test_read_ahead_hints_each_tensor_once_and_keeps_the_window_full(ckpt, window, monkeypatch):
    path, *_ = ckpt
    with CheckpointReader(path) as reader:
        names = next(iter(reader.group_by_shard(reader.keys()).values()))
        size = {n: sum(reader.info(m).nbytes for m in reader._with_scales(n)) for n in names}
        hinted = []
        monkeypatch.setattr(reader, "will_need", hinted.append)
        for i, name in enumerate(reader.read_ahead(names, window=window)):
            assert name == names[i]
            later = names[i + 1 :]
            covered = [n for n in later if n in hinted]
            assert covered == later[: len(covered)]  # hints run ahead in order
            if window and len(covered) < len(later):
                assert sum(size[n] for n in covered) >= window  # stops only with the window full
        assert hinted == names[1:] if window else hinted == []  # each once, the first needs none
