"""fp8 weights with block scales, as Kimi-K2 and DeepSeek-V3 publish them: `<w>` stored F8_E4M3, 2-D,
and `<w>_scale_inv` of float block scales, one per `weight_block_size` block (config.json's
quantization_config; 128 x 128 by default). get() gives `float(w) * scale_inv` (the math: ../fp8.py).
"""

from __future__ import annotations

import torch

from ..fp8 import BLOCK, dequantize_fp8, scale_shape
from ..int4 import QUANT_METHOD
from ..names import scale_name
from ..safetensors_format import FLOAT_DTYPES, FP8_DTYPES, CheckpointError, TensorInfo
from .base import Codec, check_stored, finite

NAME = "fp8 blocks"
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8Blocks(Codec):
    """A weight with a `_scale_inv` beside it, or any tensor stored in an fp8 dtype (which then needs one)."""

    name = NAME

    def __init__(self, config: dict, where: str):
        super().__init__(config, where)
        self.block = block_size(config, where)

    def index(self, stored, where):
        return {w: (w, scale_name(w)) for w in stored if scale_name(w) in stored}

    def claims(self, info: TensorInfo) -> bool:
        return info.dtype in FP8_DTYPES

    def check(self, store, name, shape=None, floating=False) -> TensorInfo:
        info = store.info(name)
        where = f"{info.file}: tensor {info.name!r}"
        sname = scale_name(name)
        if info.dtype not in FP8_DTYPES:
            raise CheckpointError(f"{where} has a block scale {sname} but is stored as {info.dtype}, not fp8")
        if len(info.shape) != 2:
            raise CheckpointError(f"{where} is {info.dtype} with shape {info.shape}; fp8 weights must be 2-D")
        if sname not in store.weight_map:
            raise CheckpointError(f"{where} is {info.dtype} but the checkpoint has no {sname}")
        s = store.info(sname)
        want = scale_shape(info.shape, self.block)
        if s.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{s.file}: tensor {sname!r} has dtype {s.dtype}; block scales are floats")
        if s.shape != want:
            raise CheckpointError(
                f"{s.file}: tensor {sname!r} has shape {s.shape}, but its weight {name} {info.shape} "
                f"needs {want} ({self.block[0]}x{self.block[1]} blocks)"
            )
        return check_stored(info, shape, floating, FLOAT_DTYPES + FP8_DTYPES)

    def bytes(self, store, name):
        return (name, scale_name(name)) if store.info(name).dtype in FP8_DTYPES else (name,)

    def read(self, store, name, rows, dtype, out):
        if dtype in FLOAT8:
            raise ValueError(f"{name}: use read_raw() for the stored float8 bytes; get() dequantizes them")
        info = store.info(name)
        r0, r1 = rows
        if out is None:
            out = torch.empty((r1 - r0, info.shape[1]), dtype=dtype)
        sname = scale_name(name)
        scale = finite(store.get(sname, torch.float32), store.info(sname), "block scales")
        for a, b, piece in store.io.pieces(info, r0, r1, align=self.block[0]):
            dequantize_fp8(piece, scale, self.block, row_start=a, out=out[a - r0 : b - r0])
        return out


def block_size(config: dict, where: str) -> tuple[int, int]:
    """quantization_config.weight_block_size (BLOCK when absent, or when the checkpoint is INT4)."""
    q = config.get("quantization_config")
    if not q or (isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD):
        return BLOCK
    block = q.get("weight_block_size", list(BLOCK)) if isinstance(q, dict) else None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers")
    return tuple(block)
