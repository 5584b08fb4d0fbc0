"""The hand-written safetensors header parser: agreement with the safetensors library (which writes
k2mini's files),
validation of every field, and a fuzz of corrupted headers (never a crash, never an unchecked range)."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from k2mini.checkpoint.safetensors_format import (
    DTYPES,
    CheckpointError,
    decode,
    read_header,
)
from k2mini.checkpoint.save import write_safetensors


class BytesFile:
    """A range file over bytes in memory."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def read(self, offset, n):
        return self.data[offset : offset + n]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "w.fp8": (torch.randn(6, 7, generator=g) * 10).to(torch.float8_e4m3fn),
        "w.fp8_scale_inv": torch.rand(1, 1, generator=g),
        "ids": torch.arange(5, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, float8-safe)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def tensors_from(data: bytes) -> dict:
    infos = read_header(BytesFile(data), "mem.safetensors")
    return {n: decode(bytearray(data[i.start : i.end]), i.dtype, i.shape) for n, i in infos.items()}


def test_reads_what_the_safetensors_library_writes():
    want = sample_tensors()
    got = tensors_from(save(want))
    assert set(got) == set(want)
    assert all(same(got[name], t) for name, t in want.items())


def test_files_we_write_are_the_safetensors_library_s(tmp_path):
    want = sample_tensors()
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, want)
    assert path.read_bytes() == save(want, metadata={"format": "pt"})  # byte for byte what hub tooling writes
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert all(same(t, want[name]) for name, t in tensors_from(path.read_bytes()).items())


def raw_file(header, data=b"", length=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "I8", "shape": [3], "data_offsets": [8, 11]}}


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (GOOD, b"\0" * 11, None, None),
        (GOOD, b"\0" * 10, None, "'b'.*truncated"),
        (GOOD, b"\0" * 12, None, "belong to none"),
        (GOOD, b"\0" * 11, 10**12, "header length"),
        (GOOD, b"\0" * 11, 3, "not valid JSON"),
        ([1, 2], b"", None, "not a JSON object"),
        ({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "'a'.*unknown dtype 'F7'"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "'a'.*shape"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, None, "'a'.*shape"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "'a'.*do not hold"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "'a'.*do not hold"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "'a'.*exactly"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8, None, "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "'a' leaves a gap"),
        ({"__metadata__": "x"}, b"", None, "__metadata__"),
    ],
)
def test_header_validation(header, data, length, message):
    blob = raw_file(header, data, length)
    if message is None:
        assert set(tensors_from(blob)) == {"a", "b"}
        return
    with pytest.raises(CheckpointError, match=f"mem.safetensors: .*{message}"):
        read_header(BytesFile(blob), "mem.safetensors")


def test_duplicate_names_and_tiny_files_are_rejected():
    dup = b'{"a":{"dtype":"I8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"I8","shape":[1],"data_offsets":[1,2]}}'
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        read_header(BytesFile(struct.pack("<Q", len(dup)) + dup + b"xy"), "mem.safetensors")
    for blob in (b"", b"\x02\0\0", struct.pack("<Q", 0)):
        with pytest.raises(CheckpointError, match="mem.safetensors"):
            read_header(BytesFile(blob), "mem.safetensors")


VALID = save(sample_tensors())
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]

corruptions = st.one_of(
    st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=4).map(lambda f: ("flip", f)),
    st.integers(0, len(VALID) - 1).map(lambda n: ("truncate", n)),
    st.tuples(st.integers(0, 7), st.integers(0, 255)).map(lambda f: ("flip", [f])),  # the length prefix
)


@settings(max_examples=300, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(corruptions)
def test_fuzzed_headers_fail_cleanly(corruption):
    """A corrupted file either raises CheckpointError or parses into tensors whose declared byte ranges
    lie inside the file, tile its data area, and decode; nothing else (no crash, no other exception)."""
    kind, what = corruption
    data = bytearray(VALID)
    if kind == "truncate":
        data = data[:what]
    else:
        for pos, byte in what:
            data[pos] = byte
    data = bytes(data)
    try:
        infos = read_header(BytesFile(data), "mem.safetensors")
    except CheckpointError as e:
        assert "mem.safetensors" in str(e)
        return
    assert kind == "flip"
    for info in infos.values():
        assert 8 <= info.start <= info.end <= len(data)
        t = decode(bytearray(data[info.start : info.end]), info.dtype, info.shape)
        assert tuple(t.shape) == info.shape and t.dtype == DTYPES[info.dtype]
    original = read_header(BytesFile(VALID), "mem.safetensors")
    same_layout = {(i.dtype, i.shape, i.start, i.end) for i in infos.values()} == {
        (i.dtype, i.shape, i.start, i.end) for i in original.values()
    }
    # A flip that still parses changed a name, metadata, whitespace or a dtype of the same width, never
    # where a tensor's bytes are: the layout is the original's up to those.
    assert same_layout or {(i.shape, i.start, i.end) for i in infos.values()} == {(i.shape, i.start, i.end) for i in original.values()}
