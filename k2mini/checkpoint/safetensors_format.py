"""The safetensors file format's header, parsed by hand: the safetensors library opens whole local
files only, and this parser reads the header of a file of which only byte ranges are fetched (hf://,
http(s)). The same validated header then serves local files too, so that a tensor is read straight
into its destination (`benchmarks/bench_checkpoint_read.py` measures this against `safe_open`).
Files are written by the safetensors library (save.py).

A file is: 8 bytes little-endian header length n, n bytes of JSON
`{"__metadata__": {...}, name: {"dtype": "F32", "shape": [r, c], "data_offsets": [begin, end]}, ...}`
(padded with spaces), then the data area; offsets are relative to the data area, and the tensors tile
it exactly, without gaps or overlaps. Nothing here ever unpickles anything.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch


class CheckpointError(ValueError):
    """A checkpoint is malformed; the message names the file and tensor at fault."""


# safetensors dtype name -> torch dtype (itemsize follows from it)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range [start, end)."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first axis."""
        return math.prod(self.shape[1:]) * self.torch_dtype.itemsize


def read_header(f, where: str) -> dict[str, TensorInfo]:
    """Parse and validate the header of the safetensors file behind range file `f` (two small reads)."""
    size = f.size
    if size < 8:
        raise CheckpointError(f"{where}: {size} bytes is too short for a safetensors file (truncated?)")
    n = int.from_bytes(f.read(0, 8), "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(
            f"{where}: header length {n} does not fit a {size}-byte safetensors file (truncated, or not safetensors)"
        )
    return parse_header(f.read(8, n), data_start=8 + n, data_size=size - 8 - n, where=where)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CheckpointError(f"tensor {dup!r} appears twice in the header")
    return dict(pairs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, data_start: int, data_size: int, where: str) -> dict[str, TensorInfo]:
    """Validate a header's JSON against the data area it describes; returns name -> TensorInfo."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{where}: __metadata__ is not a JSON object")
    infos = {}
    for name, entry in obj.items():
        bad = f"{where}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{bad}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{bad}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{bad}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != need:
            raise CheckpointError(f"{bad}: data_offsets {offsets} do not hold {dtype} {shape} ({need} bytes)")
        if end > data_size:
            raise CheckpointError(
                f"{bad}: needs data bytes [{begin}, {end}) but the file holds only {data_size} (truncated?)"
            )
        infos[name] = TensorInfo(where, name, dtype, tuple(shape), data_start + begin, data_start + end)
    covered = 0
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != data_start + covered:
            what = "overlaps another tensor" if info.start < data_start + covered else "leaves a gap before it"
            raise CheckpointError(f"{where}: tensor {info.name!r} {what} in the data area")
        covered = info.end - data_start
    if covered != data_size:
        raise CheckpointError(f"{where}: {data_size - covered} bytes after the last tensor belong to none")
    return infos


def decode(buffer, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw little-endian bytes (a writable buffer) -> tensor, without a copy."""
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors data is little-endian; big-endian hosts are not supported")
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(buffer, dtype=DTYPES[dtype], count=count).reshape(shape)
