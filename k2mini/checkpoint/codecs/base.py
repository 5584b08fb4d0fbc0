"""What a storage format (a codec) tells the reader, and the checks formats share.

A codec is made once per open checkpoint, `Codec(config, where)`, from its config.json (`where` names
that file in errors), and is then asked by CheckpointReader, with the reader passed in as `store`:

    index(stored, where)    when the checkpoint opens, from names only (no header is read): the tensors
                            this format serves under a name of their own -> the stored tensors each is
                            made of, the first holding its rows; those stored tensors leave keys()
    claims(info)            for a stored tensor no index named, on first use: whether its header (dtype)
                            says this format. The codecs are asked in registry order, `plain` last
    check(store, name, shape, floating) -> TensorInfo    validate without reading tensor data (a few
                            bytes of metadata at most); errors name the file, the tensor and the field
    shape(store, name)      the shape get() returns
    bytes(store, name)      the stored tensors a read needs (read-ahead hints, sizes)
    read(store, name, (r0, r1), dtype, out) -> Tensor    rows [r0, r1) as `dtype`, called after check():
                            `out` is None or a contiguous CPU tensor of that shape and dtype; a dtype the
                            format cannot give is a ValueError naming the tensor

`store` offers: `info(name)` (TensorInfo of a stored tensor), `weight_map`, `prefix`, `config`,
`read_raw(name, rows)`, `get(name, dtype)`, and `io` (shard_files.ShardFiles: `readinto`, `pieces`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..safetensors_format import CheckpointError, TensorInfo


class Codec:
    """One storage format; subclasses override what their format needs (see the module docstring)."""

    name = "?"  # how messages and CheckpointReader.format() call the format

    def __init__(self, config: dict, where: str):
        self.config = config

    def index(self, stored: Mapping[str, str], where: str) -> dict[str, tuple[str, ...]]:
        return {}

    def claims(self, info: TensorInfo) -> bool:
        return False

    def check(self, store, name: str, shape=None, floating: bool = False) -> TensorInfo:
        raise NotImplementedError

    def shape(self, store, name: str) -> tuple[int, ...]:
        return store.info(name).shape

    def bytes(self, store, name: str) -> tuple[str, ...]:
        return (name,)

    def read(self, store, name: str, rows: tuple[int, int], dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        return f"<codec {self.name}>"


def check_stored(info: TensorInfo, shape, floating: bool, float_dtypes) -> TensorInfo:
    """A stored tensor's dtype is one of `float_dtypes` (when `floating`) and its shape is `shape`."""
    where = f"{info.file}: tensor {info.name!r}"
    if floating and info.dtype not in float_dtypes:
        raise CheckpointError(f"{where} has dtype {info.dtype}; expected a floating-point tensor")
    if shape is not None and info.shape != tuple(shape):
        raise CheckpointError(f"{where} has shape {info.shape}, the config needs {tuple(shape)}")
    return info


def finite(t: torch.Tensor, info: TensorInfo, what: str) -> torch.Tensor:
    """`t`, read from stored tensor `info`, after checking it holds no inf or nan (`what`: e.g. "scales")."""
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{info.file}: tensor {info.name!r} holds non-finite {what}")
    return t
