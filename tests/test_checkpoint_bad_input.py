"""Bad checkpoints: each raises CheckpointError naming the file and tensor at fault (FileNotFoundError
for a missing directory), before any tensor is used; a fuzz of corrupted shards never loads wrong
weights."""

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import k2mini
from checkpoint_factory import fp8_checkpoint, header_of, shard_of, write_raw_safetensors
from k2mini.checkpoint import CheckpointError, CheckpointReader, load_pretrained

EXPERT = "model.layers.1.mlp.experts.2.gate_proj.weight"
ROUTER = "model.layers.2.mlp.gate.weight"


@pytest.fixture
def ckpt(tmp_path):
    """A fresh copy of the shared fp8 checkpoint, to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(fp8_checkpoint()[0], path)
    return path


def rewrite(path: Path, change):
    """Rewrite one shard through the safetensors library: change(dict of tensors) edits it in place."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def raises(match_file, match_tensor=None):
    pattern = re.escape(str(match_file)) + (".*" + re.escape(match_tensor) if match_tensor else "")
    return pytest.raises(CheckpointError, match=pattern)


def test_truncated_shard(ckpt):
    shard = shard_of(ckpt, EXPERT)
    data = shard.read_bytes()
    header, start = header_of(shard)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    shard.write_bytes(data[:-100])
    with raises(shard, last + "': needs data bytes"):
        load_pretrained(ckpt, progress=False)
    shard.write_bytes(data[: start - 10])  # cut inside the header
    with raises(shard, "header length"):
        CheckpointReader(ckpt).get(EXPERT)


def test_index_names_a_missing_file(ckpt):
    shard = shard_of(ckpt, EXPERT)
    shard.unlink()
    with raises(shard, f"missing (it holds tensor {EXPERT!r})"):
        CheckpointReader(ckpt).get(EXPERT)
    with raises(shard, "missing (it holds tensor 'model.layers."):
        load_pretrained(ckpt, progress=False)


def test_scale_whose_shape_does_not_match_its_weight(ckpt):
    shard = shard_of(ckpt, EXPERT + "_scale_inv")
    rewrite(shard, lambda t: t.__setitem__(EXPERT + "_scale_inv", torch.ones(2, 2)))
    with raises(shard, f"{EXPERT}_scale_inv' has shape (2, 2), but its weight {EXPERT} (96, 160) needs (1, 2)"):
        load_pretrained(ckpt, progress=False)


def test_unknown_dtype(ckpt):
    shard = shard_of(ckpt, ROUTER)
    header, start = header_of(shard)
    data = shard.read_bytes()[start:]
    header[ROUTER]["dtype"] = "F12"
    write_raw_safetensors(shard, header, data)
    with raises(shard, f"{ROUTER}': unknown dtype 'F12'"):
        load_pretrained(ckpt, progress=False)


def test_fp8_weight_without_scale(ckpt):
    shard = shard_of(ckpt, EXPERT + "_scale_inv")
    rewrite(shard, lambda t: t.pop(EXPERT + "_scale_inv"))
    with raises(shard, "tensor " + repr(EXPERT + "_scale_inv") + ", named by the index, is not in this shard"):
        load_pretrained(ckpt, progress=False)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][EXPERT + "_scale_inv"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with raises(shard_of(ckpt, EXPERT), f"{EXPERT}' is F8_E4M3 but the checkpoint has no {EXPERT}_scale_inv"):
        load_pretrained(ckpt, progress=False)


def test_non_finite_scale(ckpt):
    shard = shard_of(ckpt, EXPERT + "_scale_inv")
    rewrite(shard, lambda t: t[EXPERT + "_scale_inv"].__setitem__((0, 1), float("inf")))
    with raises(shard, "non-finite block scales"):
        load_pretrained(ckpt, progress=False)


def test_shape_or_dtype_that_does_not_match_the_config(ckpt):
    shard = shard_of(ckpt, ROUTER)
    rewrite(shard, lambda t: t.__setitem__(ROUTER, torch.zeros(6, 150)))
    with raises(shard, f"{ROUTER}' has shape (6, 150), the config needs (6, 160)"):
        load_pretrained(ckpt, progress=False)
    rewrite(shard, lambda t: t.__setitem__(ROUTER, torch.zeros(6, 160, dtype=torch.int32)))
    with raises(shard, f"{ROUTER}' has dtype I32; expected a floating-point tensor"):
        load_pretrained(ckpt, progress=False)


def test_missing_and_unexplained_tensors(ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.1.mlp.surprise.weight"] = index["weight_map"].pop(ROUTER)
    index_path.write_text(json.dumps(index))
    with raises(index_path, f"1 tensors the config needs are missing, e.g. ['{ROUTER}']"):
        load_pretrained(ckpt, progress=False)
    index["weight_map"][ROUTER] = index["weight_map"]["model.layers.1.mlp.surprise.weight"]
    index_path.write_text(json.dumps(index))
    with raises(ckpt, "tensors the config does not explain, e.g. ['model.layers.1.mlp.surprise.weight']"):
        load_pretrained(ckpt, progress=False)


def test_bad_index_and_config(ckpt):
    index_path, config_path = ckpt / "model.safetensors.index.json", ckpt / "config.json"
    good_index, good_config = index_path.read_text(), config_path.read_text()
    index_path.write_text(good_index[:-20])
    with raises(index_path, "not valid JSON"):
        CheckpointReader(ckpt)
    index = json.loads(good_index)
    index["weight_map"][ROUTER] = "../../etc/passwd.safetensors"
    index_path.write_text(json.dumps(index))
    with raises(index_path, f"{ROUTER}' is mapped to '../../etc/passwd.safetensors'"):
        CheckpointReader(ckpt)
    index_path.write_text(good_index)
    config_path.write_text(good_config.replace('"kimi_k2"', '"llama"'))
    with raises(config_path, "model_type 'llama'"):
        load_pretrained(ckpt, progress=False)
    config_path.write_text("{")
    with raises(config_path, "not valid JSON"):
        load_pretrained(ckpt, progress=False)
    config_path.unlink()
    with raises(config_path, "missing"):
        load_pretrained(ckpt, progress=False)


def test_missing_directory_and_pickles(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_pretrained(tmp_path / "nowhere", progress=False)
    (tmp_path / "config.json").write_text(json.dumps(k2mini.K2Config().to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")  # never unpickled
    with raises(tmp_path, "only safetensors checkpoints are read"):
        load_pretrained(tmp_path, progress=False)
    assert not Path("pwned").exists()


# ----------------------------------------------------------------- fuzz: corrupted shards
_FUZZ = {}


def fuzz_base():
    """The shared fp8 checkpoint, the shards to corrupt, their header ends and where their digits and
    letters are; and the weights it loads when intact (computed on first use)."""
    if not _FUZZ:
        base = fp8_checkpoint()[0]
        shards = sorted({shard_of(base, n).name for n in (EXPERT, ROUTER, "model.norm.weight", "model.embed_tokens.weight")})
        ends = [header_of(base / s)[1] for s in shards]
        headers = [(base / s).read_bytes()[:end] for s, end in zip(shards, ends)]
        _FUZZ.update(
            base=base, shards=shards, ends=ends, sizes=[(base / s).stat().st_size for s in shards],
            digits=[[i for i, c in enumerate(h) if i >= 8 and chr(c).isdigit()] for h in headers],
            letters=[[i for i, c in enumerate(h) if i >= 8 and chr(c).isalpha()] for h in headers],
            state=load_pretrained(base, progress=False).state_dict(),
        )
    return _FUZZ


@st.composite
def corruptions(draw):
    f = fuzz_base()
    i = draw(st.integers(0, len(f["shards"]) - 1))
    kind = draw(st.sampled_from(["bytes", "digit", "letter", "truncate"]))
    if kind == "truncate":
        return i, kind, draw(st.integers(0, f["sizes"][i] - 1))
    if kind == "bytes":  # anything, anywhere in the length prefix and header: mostly broken JSON
        spots, values = st.integers(0, f["ends"][i] - 1), st.integers(0, 255)
    else:  # JSON stays valid: a digit of a shape or offset, a letter of a name or dtype, changes
        spots = st.sampled_from(f["digits"][i] if kind == "digit" else f["letters"][i])
        values = st.sampled_from(b"0123456789" if kind == "digit" else b"EFIUBabcefgilmnoprstuvwx")
    return i, "flip", draw(st.lists(st.tuples(spots, values), min_size=1, max_size=2))


@settings(max_examples=120, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(corruptions())
def test_fuzzed_shards_never_load_wrong_weights(corruption):
    """Random byte flips in a shard's length prefix and header (any byte, or a digit or letter changed
    so that the JSON stays valid), and truncations anywhere: loading either raises CheckpointError
    naming the shard, or gives exactly the original weights (a flip in metadata, say)."""
    i, kind, what = corruption
    f = fuzz_base()
    name = f["shards"][i]
    data = bytearray((f["base"] / name).read_bytes())
    if kind == "truncate":
        data = data[:what]
    else:
        for pos, byte in what:
            data[pos] = byte
    with tempfile.TemporaryDirectory() as d:
        for file in f["base"].iterdir():
            (Path(d) / file.name).symlink_to(file)
        (Path(d) / name).unlink()
        (Path(d) / name).write_bytes(bytes(data))
        try:
            state = load_pretrained(d, progress=False).state_dict()
        except CheckpointError as e:
            assert name in str(e)
            return
    assert kind == "flip"
    assert all(torch.equal(state[k], v) for k, v in f["state"].items())


BIAS = "model.layers.2.mlp.gate.e_score_correction_bias"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_correction_bias_is_named_not_routed_on(ckpt, bad):
    """A NaN bias used to route every token to the same experts without a word."""
    shard = shard_of(ckpt, BIAS)
    rewrite(shard, lambda t: t[BIAS].__setitem__(3, bad))
    with raises(shard, BIAS + "' holds inf or nan"):
        load_pretrained(ckpt, progress=False)
    with raises(shard, BIAS):
        CheckpointReader(ckpt).get(BIAS)
    from k2mini.analysis import router_summary

    with raises(shard, BIAS):
        router_summary(ckpt, progress=False)


def test_a_string_boolean_in_config_json_is_named(ckpt):
    """"tie_word_embeddings": "false" used to be taken as true, dropping the checkpoint's own lm_head."""
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": "false"}))
    with raises(ckpt / "config.json", "tie_word_embeddings: must be true or false"):
        load_pretrained(ckpt, progress=False)


# ----------------------------------------------------------------- INT4 (pack-quantized) parts
PACKED = "model.layers.1.mlp.experts.2.up_proj"


@pytest.fixture
def int4(tmp_path):
    """A fresh copy of the shared INT4 (compressed-tensors pack-quantized) checkpoint, to break."""
    pytest.importorskip("compressed_tensors")
    from checkpoint_factory import int4_checkpoint

    path = tmp_path / "int4"
    shutil.copytree(int4_checkpoint()[0], path)
    return path


@pytest.mark.parametrize(
    "part, value, message",
    [
        ("weight_packed", torch.zeros(96, 21, dtype=torch.int32), "weight_packed' has shape (96, 21), but .*weight_shape' says (96, 160), which packs to (96, 20)"),
        ("weight_packed", torch.zeros(96, 20, dtype=torch.int64), "weight_packed' is I64 (96, 20); packed weights are 2-D I32"),
        ("weight_scale", torch.ones(96, 4, dtype=torch.bfloat16), "weight_scale' has shape (96, 4), but its weight (96, 160) needs (96, 5)"),
        ("weight_scale", torch.ones(96, 5, dtype=torch.int32), "weight_scale' is I32 (96, 5); scales are 2-D floats"),
        ("weight_shape", torch.tensor([96, 158]), "weight_shape' says (96, 158), the config needs (96, 160)"),
        ("weight_shape", torch.tensor([96, 150]), "weight_shape' says (96, 150), which packs to (96, 19)"),
        ("weight_shape", torch.tensor([96.0, 160.0]), "weight_shape' is F32 (2,); expected I32 or I64 (2,)"),
    ],
)
def test_corrupted_int4_parts(int4, part, value, message):
    name = f"{PACKED}.{part}"
    shard = shard_of(int4, name)
    rewrite(shard, lambda t: t.__setitem__(name, value))
    with pytest.raises(CheckpointError, match=re.escape(str(shard)) + ".*" + ".*".join(map(re.escape, message.split(".*")))):
        load_pretrained(int4, progress=False)


def test_int4_missing_or_extra_parts(int4):
    scale = f"{PACKED}.weight_scale"
    shard = shard_of(int4, scale)
    rewrite(shard, lambda t: t.__setitem__(scale, t[scale] * float("inf")))
    with raises(shard, "non-finite scales"):
        load_pretrained(int4, progress=False)
    index_path = int4 / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][scale]
    index_path.write_text(json.dumps(index))
    with raises(shard_of(int4, f"{PACKED}.weight_packed"), f"{PACKED}.weight_packed has no {scale}"):
        load_pretrained(int4, progress=False)
    index["weight_map"][scale] = shard.name
    zp = f"{PACKED}.weight_zero_point"
    index["weight_map"][zp] = shard.name
    index_path.write_text(json.dumps(index))
    rewrite(shard, lambda t: t.update({scale: t[scale].nan_to_num(posinf=1.0), zp: torch.zeros(12, 5, dtype=torch.int32)}))
    with raises(shard, f"{zp}: asymmetric zero points not supported"):
        load_pretrained(int4, progress=False)
