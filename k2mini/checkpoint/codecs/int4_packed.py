"""compressed-tensors' pack-quantized INT4, as Kimi-K2-Thinking, K2.5 and K2.6 publish their routed
experts: `<m>.weight` is not stored; `<m>.weight_packed` (int32 words), `<m>.weight_scale` (one float
per group of columns) and `<m>.weight_shape` ((out, in)) are, and get() serves them as `<m>.weight`,
dequantized. The scheme (bits, group size) comes from config.json's quantization_config; the layout
and the math are in ../int4.py.
"""

from __future__ import annotations

import torch

from ..int4 import PARTS, QUANT_METHOD, UNSUPPORTED_PARTS, PackScheme, QuantizationConfigError, dequantize_packed, scheme_from_config
from ..safetensors_format import FLOAT_DTYPES, CheckpointError, TensorInfo
from .base import Codec, finite

NAME = "pack-quantized"
PACKED = ".weight_packed"


class Int4Packed(Codec):
    """`<m>.weight`, served from the three stored parts of every `<m>.weight_packed`."""

    name = NAME

    def __init__(self, config: dict, where: str):
        super().__init__(config, where)
        self.scheme = pack_scheme(config, where)  # None: config.json does not say pack-quantized
        self._shapes: dict[str, tuple[int, int]] = {}  # name -> (out, in), once checked

    def index(self, stored, where):
        """"<m>.weight" -> its parts (a plain `<m>.weight` beside `<m>.weight_packed` is an error)."""
        served = {}
        for k in stored:
            if k.endswith(PACKED):
                base = k[: -len(PACKED)]
                if base + ".weight" in stored:
                    raise CheckpointError(f"{where}: tensor {base}.weight is stored both plain and packed ({k})")
                parts = (*PARTS, *UNSUPPORTED_PARTS)
                served[base + ".weight"] = tuple(f"{base}.{p}" for p in parts if f"{base}.{p}" in stored)
        return served

    def check(self, store, name, shape=None, floating=False) -> TensorInfo:
        got = self.shape(store, name)
        if shape is not None and got != tuple(shape):
            info = store.info(name + "_shape")
            raise CheckpointError(f"{info.file}: tensor {info.name!r} says {got}, the config needs {tuple(shape)}")
        return store.info(name)

    def shape(self, store, name) -> tuple[int, int]:
        """Validate the three parts against each other and the checkpoint's scheme (headers and the
        2-number weight_shape only); returns the weight's (out, in)."""
        if name in self._shapes:
            return self._shapes[name]
        base, p = name[: -len(".weight")], store.prefix
        if self.scheme is None:
            raise CheckpointError(
                f"{store.info(name).file}: tensor {p}{base}.weight_packed is pack-quantized, but config.json's "
                "quantization_config does not say compressed-tensors pack-quantized"
            )
        for part, why in UNSUPPORTED_PARTS.items():
            if f"{base}.{part}" in store.weight_map:
                raise CheckpointError(f"{store.info(f'{base}.{part}').file}: tensor {p}{base}.{part}: {why} not supported")
        for part in PARTS:
            if f"{base}.{part}" not in store.weight_map:
                raise CheckpointError(
                    f"{store.info(name).file}: tensor {p}{base}.weight_packed has no {p}{base}.{part} in the checkpoint"
                )
        packed, scale, shape = (store.info(f"{base}.{part}") for part in PARTS)
        scheme = self.scheme
        if packed.dtype != "I32" or len(packed.shape) != 2:
            raise CheckpointError(f"{packed.file}: tensor {packed.name!r} is {packed.dtype} {packed.shape}; packed weights are 2-D I32")
        if scale.dtype not in FLOAT_DTYPES or len(scale.shape) != 2:
            raise CheckpointError(f"{scale.file}: tensor {scale.name!r} is {scale.dtype} {scale.shape}; scales are 2-D floats")
        if shape.dtype not in ("I32", "I64") or shape.shape != (2,):
            raise CheckpointError(f"{shape.file}: tensor {shape.name!r} is {shape.dtype} {shape.shape}; expected I32 or I64 (2,)")
        out_f, in_f = (int(v) for v in store.read_raw(f"{base}.weight_shape"))
        if out_f < 0 or in_f < 0 or packed.shape != scheme.packed_shape((out_f, in_f)):
            raise CheckpointError(
                f"{packed.file}: tensor {packed.name!r} has shape {packed.shape}, but {shape.file}: tensor "
                f"{shape.name!r} says {(out_f, in_f)}, which packs to {scheme.packed_shape((max(out_f, 0), max(in_f, 0)))} "
                f"(int{scheme.num_bits})"
            )
        if scale.shape != scheme.scale_shape((out_f, in_f)):
            raise CheckpointError(
                f"{scale.file}: tensor {scale.name!r} has shape {scale.shape}, but its weight {(out_f, in_f)} "
                f"needs {scheme.scale_shape((out_f, in_f))} ({scheme.describe()})"
            )
        self._shapes[name] = (out_f, in_f)
        return out_f, in_f

    def bytes(self, store, name):
        base = name[: -len(".weight")]
        return tuple(f"{base}.{p}" for p in PARTS)

    def read(self, store, name, rows, dtype, out):
        """The rows dequantized piece by piece into the result."""
        if not dtype.is_floating_point or dtype.itemsize == 1:
            raise ValueError(f"{name}: get() dequantizes packed weights to a float dtype, not {dtype}")
        r0, r1 = rows
        cols = self.shape(store, name)[1]
        if out is None:
            out = torch.empty((r1 - r0, cols), dtype=dtype)
        packed, sname = store.info(name), name + "_scale"
        scale = finite(store.read_raw(sname, rows=slice(r0, r1)), store.info(sname), "scales")
        for a, b, piece in store.io.pieces(packed, r0, r1):
            dequantize_packed(piece, scale[a - r0 : b - r0], self.scheme, cols, out=out[a - r0 : b - r0])
        return out


def pack_scheme(config: dict, where: str) -> PackScheme | None:
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        return None
    try:
        return scheme_from_config(q, where)
    except QuantizationConfigError as e:
        raise CheckpointError(str(e)) from None
