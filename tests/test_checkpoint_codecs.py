"""Storage formats as codecs (k2mini/checkpoint/codecs/): a format defined and registered here, outside
the library, is read by CheckpointReader and load_pretrained like the built-in ones, and without it the
same files are only its plain parts; the built-in formats answer through the same seam."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import k2mini
from k2mini.checkpoint import CheckpointError, CheckpointReader, codecs, load_pretrained, save_pretrained
from k2mini.checkpoint.codecs.base import Codec, check_stored

TINY = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4)  # on k2-micro
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class RowInt8(Codec):
    """A toy format: `<m>.weight` stored as int8 codes `<m>.weight_q8` (out, in) and one float32 scale
    per row, `<m>.weight_row_scale` (out,); W = float(q) * s[:, None]."""

    name = "row-scaled int8"

    def index(self, stored, where):
        served = {}
        for k in stored:
            if k.endswith(".weight_q8"):
                name = k[: -len("_q8")]
                served[name] = tuple(p for p in (k, name + "_row_scale") if p in stored)
        return served

    def check(self, store, name, shape=None, floating=False):
        q = store.info(name + "_q8")
        if name + "_row_scale" not in store.weight_map:
            raise CheckpointError(f"{q.file}: tensor {q.name!r} has no {name}_row_scale")
        s = store.info(name + "_row_scale")
        if q.dtype != "I8" or len(q.shape) != 2:
            raise CheckpointError(f"{q.file}: tensor {q.name!r} is {q.dtype} {q.shape}; codes are 2-D I8")
        if s.dtype != "F32" or s.shape != q.shape[:1]:
            raise CheckpointError(f"{s.file}: tensor {s.name!r} is {s.dtype} {s.shape}; its codes need F32 {q.shape[:1]}")
        return check_stored(q, shape, False, ())

    def bytes(self, store, name):
        return name + "_q8", name + "_row_scale"

    def read(self, store, name, rows, dtype, out):
        r0, r1 = rows
        q = store.info(name)
        if out is None:
            out = torch.empty((r1 - r0, q.shape[1]), dtype=dtype)
        s = store.read_raw(name + "_row_scale", rows=slice(r0, r1))
        for a, b, piece in store.io.pieces(q, r0, r1):
            out[a - r0 : b - r0].copy_(piece.float() * s[a - r0 : b - r0, None])
        return out


def quantize_rows(w: torch.Tensor):
    s = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


def dequantize_rows(q, s):
    return q.float() * s[:, None]


@pytest.fixture
def toy():
    codecs.register(RowInt8)
    yield RowInt8
    codecs.unregister(RowInt8)


@pytest.fixture
def toy_dir(tmp_path):
    """One plain tensor and one 11 x 6 weight in the toy format, in a single model.safetensors."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(11, 6, generator=g)
    q, s = quantize_rows(w)
    norm = torch.rand(6, generator=g)
    save_file({"proj.weight_q8": q, "proj.weight_row_scale": s, "norm.weight": norm}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    return tmp_path, dequantize_rows(q, s), norm


def test_a_codec_registered_from_outside_serves_its_tensors(toy, toy_dir):
    path, want, norm = toy_dir
    with CheckpointReader(path) as reader:
        assert sorted(reader.keys()) == ["norm.weight", "proj.weight"]  # the parts are not listed
        assert "proj.weight" in reader and sorted(reader.stored_keys()) == ["norm.weight", "proj.weight_q8", "proj.weight_row_scale"]
        assert reader.format("proj.weight") == "row-scaled int8" and reader.format("norm.weight") == "plain"
        assert reader.shape("proj.weight") == (11, 6)
        assert reader.stored_parts("proj.weight") == ("proj.weight_q8", "proj.weight_row_scale")
        reader.files.read_piece_bytes = 12  # two rows of codes a piece: the rows come in six pieces
        assert torch.equal(reader.get("proj.weight"), want)
        assert torch.equal(reader.get("proj.weight", rows=slice(3, 8)), want[3:8])
        buf = torch.empty(5, 6, dtype=torch.bfloat16)
        assert reader.get("proj.weight", rows=(3, 8), out=buf) is buf and torch.equal(buf, want[3:8].bfloat16())
        assert torch.equal(reader.get("norm.weight"), norm)
        with pytest.raises(ValueError, match=r"proj\.weight is stored row-scaled int8: read_raw\(\) its parts proj\.weight_q8, proj\.weight_row_scale"):
            reader.read_raw("proj.weight")
        with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'proj\.weight_q8' has shape \(11, 6\), the config needs \(11, 7\)"):
            reader.check("proj.weight", shape=(11, 7))
        hinted = []
        reader.io.will_need = hinted.append
        reader.will_need("proj.weight")
        assert [i.name for i in hinted] == ["proj.weight_q8", "proj.weight_row_scale"]


def test_without_the_codec_the_same_files_are_its_plain_parts(toy_dir):
    """The negative control: nothing but the registry made `proj.weight` readable."""
    path, *_ = toy_dir
    assert RowInt8 not in codecs.registered()
    with CheckpointReader(path) as reader:
        assert sorted(reader.keys()) == ["norm.weight", "proj.weight_q8", "proj.weight_row_scale"]
        assert "proj.weight" not in reader and reader.format("proj.weight_q8") == "plain"
        with pytest.raises(CheckpointError, match="tensor 'proj.weight' is missing from the checkpoint"):
            reader.get("proj.weight")


@pytest.mark.parametrize(
    "scale, message",
    [
        (None, r"model\.safetensors: tensor 'proj\.weight_q8' has no proj\.weight_row_scale"),
        (torch.ones(10), r"model\.safetensors: tensor 'proj\.weight_row_scale' is F32 \(10,\); its codes need F32 \(11,\)"),
    ],
)
def test_a_registered_codec_names_the_file_tensor_and_field_at_fault(toy, tmp_path, scale, message):
    tensors = {"proj.weight_q8": torch.zeros(11, 6, dtype=torch.int8)}
    if scale is not None:
        tensors["proj.weight_row_scale"] = scale
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(CheckpointError, match=message):
            reader.get("proj.weight")


def test_two_formats_serving_one_name_is_refused_when_opening(toy, tmp_path):
    save_file({"proj.weight_q8": torch.zeros(2, 4, dtype=torch.int8), "proj.weight_packed": torch.zeros(2, 1, dtype=torch.int32)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tensor proj.weight is stored both pack-quantized and row-scaled int8"):
        CheckpointReader(tmp_path)


def test_register_takes_new_codec_classes_only(toy):
    for bad in (codecs.Plain, object, RowInt8({}, "config.json")):
        with pytest.raises(TypeError, match="Codec subclass"):
            codecs.register(bad)
    with pytest.raises(ValueError, match="row-scaled int8.*already registered"):
        codecs.register(type("Again", (RowInt8,), {}))
    assert codecs.registered()[-2:] == [RowInt8, codecs.Plain]


def tiny_model():
    torch.manual_seed(0)
    return k2mini.K2ForCausalLM(k2mini.K2Config.preset("k2-micro").replace(**TINY)).eval()


def test_load_pretrained_reads_a_model_whose_experts_are_in_a_registered_format(toy, tmp_path):
    """End to end: save a model plainly, rewrite its routed experts into the toy format, load it back."""
    model = tiny_model()
    path = save_pretrained(model, tmp_path / "toy", progress=False)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    served = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / shard)
        for name in [n for n in tensors if EXPERT.match(n)]:
            q, s = quantize_rows(tensors.pop(name))
            tensors[name + "_q8"], tensors[name + "_row_scale"] = q, s
            served[name] = dequantize_rows(q, s)
            del index["weight_map"][name]
            index["weight_map"].update({name + "_q8": shard, name + "_row_scale": shard})
        save_file(tensors, path / shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    assert served

    loaded = load_pretrained(path, progress=False)
    params = dict(loaded.named_parameters())
    for name, want in served.items():
        layer, e, proj = EXPERT.match(name).groups()
        assert torch.equal(params[f"model.layers.{layer}.mlp.experts.{proj}"][int(e)], want), name
    theirs = {n: p for n, p in model.named_parameters() if ".mlp.experts." not in n}
    assert all(torch.equal(params[n], p) for n, p in theirs.items())

    codecs.unregister(RowInt8)
    try:  # the negative control: without the codec the experts are not there
        with pytest.raises(CheckpointError, match="tensors the config needs are missing"):
            load_pretrained(path, progress=False)
    finally:
        codecs.register(RowInt8)


@pytest.mark.parametrize(
    "quantization, expert_format, parts",
    [("fp8", "fp8 blocks", ("{w}", "{w}_scale_inv")), ("int4", "pack-quantized", ("{m}.weight_packed", "{m}.weight_scale", "{m}.weight_shape"))],
)
def test_the_built_in_formats_answer_through_the_same_seam(tmp_path, quantization, expert_format, parts):
    path = save_pretrained(tiny_model(), tmp_path / quantization, progress=False, quantization=quantization)
    w = "model.layers.1.mlp.experts.2.up_proj.weight"
    with CheckpointReader(path) as reader:
        assert reader.format(w) == expert_format and reader.format("model.norm.weight") == "plain"
        assert reader.stored_parts(w) == tuple(p.format(w=w, m=w[: -len(".weight")]) for p in parts)
        assert reader.stored_parts("model.norm.weight") == ("model.norm.weight",)
        assert reader.is_fp8(w) == (quantization == "fp8") and reader.is_packed(w) == (quantization == "int4")
        assert [type(c) for c in reader.codecs] == codecs.registered()
