"""Plain tensors: stored in the dtype they mean (bf16, float32, int ...), read as they are or converted."""

from __future__ import annotations

import torch

from ..safetensors_format import FLOAT_DTYPES, TensorInfo
from .base import Codec, check_stored

NAME = "plain"


class Plain(Codec):
    """Every stored tensor no other format claims; always asked last."""

    name = NAME

    def claims(self, info: TensorInfo) -> bool:
        return True

    def check(self, store, name, shape=None, floating=False) -> TensorInfo:
        return check_stored(store.info(name), shape, floating, FLOAT_DTYPES)

    def read(self, store, name, rows, dtype, out):
        info = store.info(name)
        r0, r1 = rows
        if out is None:
            out = torch.empty((r1 - r0, *info.shape[1:]) if info.shape else (), dtype=dtype)
        if info.torch_dtype == dtype:  # no conversion: the bytes go straight into the result
            store.io.readinto(info, info.start + r0 * info.row_bytes, bytes_of(out))
            return out
        if not info.shape:
            return out.copy_(store.read_raw(name))
        for a, b, piece in store.io.pieces(info, r0, r1):
            out[a - r0 : b - r0].copy_(piece)
        return out


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
