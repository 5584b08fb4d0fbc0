"""INT4 weights in compressed-tensors' "pack-quantized" format, as Kimi-K2-Thinking, K2.5 and K2.6
publish their routed experts (quantization-aware trained, symmetric, one scale per 32 columns).

Per quantized matrix `<m>` (`<m>.weight` itself is absent):

    <m>.weight_packed  int32 (out, ceil(in * bits / 32))   32 / bits codes per word, lowest bits first
    <m>.weight_scale   float (out, ceil(in / group))       bf16 in the releases; (out, 1) for "channel"
    <m>.weight_shape   int32 or int64 (2,)                 (out, in): the columns past `in` are padding

Code j of word w holds column (32 / bits) * w + j, stored as q + 2^(bits-1), q in [-2^(bits-1), 2^(bits-1)).
Dequantized weight: `W[r, c] = q[r, c] * float32(scale[r, c // group])`. compressed-tensors' own
`dequantize` multiplies in the scale's dtype (bf16), which rounds; a 4-bit code times a bf16 scale
has at most 12 significant bits, so the float32 product here is exact, and is rounded once to the
dtype asked for.

The settings come from config.json's `quantization_config.config_groups` (bits, group size,
symmetric, strategy); anything this reader does not implement (zero points, activation ordering,
other formats) is refused with the field that asks for it. Only bit widths that divide 32 are read:
for them every version of compressed-tensors packs the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
PARTS = ("weight_packed", "weight_scale", "weight_shape")
UNSUPPORTED_PARTS = {  # companions a packed weight may have that this reader does not implement
    "weight_zero_point": "asymmetric zero points",
    "weight_g_idx": "activation ordering (g_idx)",
    "weight_global_scale": "a global scale",
}
CHUNK_ELEMENTS = 2**20  # dequantize about this many output elements at a time (scratch: ~5 MiB)

# What Kimi-K2-Thinking's config.json says (docs/K2_FACTS.md section 7); save_pretrained writes it.
K2_THINKING_QUANTIZATION_CONFIG = {
    "quant_method": QUANT_METHOD,
    "format": FORMAT,
    "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "output_activations": None,
            "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                "actorder": None, "dynamic": False, "observer": "minmax", "block_structure": None,
            },
        }
    },
    "ignore": ["lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
}


class QuantizationConfigError(ValueError):
    """config.json's quantization_config asks for something this reader does not implement."""


@dataclass(frozen=True)
class PackScheme:
    """How one checkpoint's packed weights are stored: `num_bits` per code, one scale per
    `group_size` columns (None: one per row)."""

    num_bits: int = 4
    group_size: int | None = 32

    @property
    def per_word(self) -> int:
        return 32 // self.num_bits

    @property
    def offset(self) -> int:
        return 1 << (self.num_bits - 1)

    def packed_shape(self, shape) -> tuple[int, int]:
        rows, cols = shape
        return rows, math.ceil(cols / self.per_word)

    def scale_shape(self, shape) -> tuple[int, int]:
        rows, cols = shape
        return rows, 1 if self.group_size is None else math.ceil(cols / self.group_size)

    def describe(self) -> str:
        groups = "one scale per row" if self.group_size is None else f"one scale per {self.group_size} columns"
        return f"int{self.num_bits}, {groups}"


def scheme_from_config(q: dict, where: str) -> PackScheme:
    """The PackScheme of a compressed-tensors quantization_config; QuantizationConfigError naming the
    field at fault (prefixed by `where`) for anything else."""

    def refuse(field, value, why):
        raise QuantizationConfigError(f"{where}: quantization_config.{field} = {value!r}: {why}")

    if q.get("quant_method") != QUANT_METHOD:
        refuse("quant_method", q.get("quant_method"), f"expected {QUANT_METHOD!r}")
    if q.get("format") != FORMAT:
        refuse("format", q.get("format"), f"only {FORMAT!r} is read (Kimi-K2-Thinking, K2.5, K2.6)")
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        refuse("quantization_status", status, "only compressed checkpoints are read")
    for field in ("kv_cache_scheme", "transform_config", "sparsity_config"):
        if q.get(field):
            refuse(field, q[field], "not supported (only weight-only quantization is read)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        refuse("config_groups", groups, "expected a non-empty object of quantization groups")
    schemes = {}
    for gname, group in groups.items():
        at = f"config_groups.{gname}"
        if not isinstance(group, dict):
            refuse(at, group, "expected an object")
        if group.get("format") not in (None, FORMAT):
            refuse(f"{at}.format", group["format"], f"only {FORMAT!r} is read")
        for field in ("input_activations", "output_activations"):
            if group.get(field):
                refuse(f"{at}.{field}", group[field], "activation quantization is not supported")
        w = group.get("weights")
        if not isinstance(w, dict):
            refuse(f"{at}.weights", w, "expected the weight quantization arguments")
        schemes[gname] = _weight_scheme(w, f"{at}.weights", refuse)
    if len(set(schemes.values())) > 1:
        refuse("config_groups", {g: s.describe() for g, s in schemes.items()},
               "groups with different weight schemes are not supported")
    return next(iter(schemes.values()))


def _weight_scheme(w: dict, at: str, refuse) -> PackScheme:
    bits = w.get("num_bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in (1, 2, 4, 8):
        refuse(f"{at}.num_bits", bits, "only 1, 2, 4 or 8 bits (widths that divide 32) are read")
    if w.get("type", "int") != "int":
        refuse(f"{at}.type", w.get("type"), "only integer codes are read")
    if w.get("symmetric", True) is not True:
        refuse(f"{at}.symmetric", w.get("symmetric"), "asymmetric quantization (zero points) is not supported")
    if w.get("actorder") not in (None, False):
        refuse(f"{at}.actorder", w.get("actorder"), "activation ordering (g_idx) is not supported")
    if w.get("dynamic", False) not in (False, None):
        refuse(f"{at}.dynamic", w.get("dynamic"), "dynamic weight scales are not supported")
    if w.get("block_structure") is not None:
        refuse(f"{at}.block_structure", w.get("block_structure"), "block scales are not supported in pack-quantized")
    strategy = w.get("strategy")
    if strategy == "channel":
        return PackScheme(bits, None)
    if strategy != "group":
        refuse(f"{at}.strategy", strategy, "only 'group' and 'channel' are read")
    size = w.get("group_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        refuse(f"{at}.group_size", size, "expected a positive integer")
    return PackScheme(bits, size)


def unpack(packed: torch.Tensor, cols: int, num_bits: int = 4) -> torch.Tensor:
    """int32 words (R, W) -> the signed codes q (R, cols) as int8."""
    scheme = PackScheme(num_bits, None)
    scratch = torch.empty(packed.shape[0], packed.shape[1] * 4, max(1, 8 // num_bits), dtype=torch.uint8)
    return _signed_codes(packed, scheme, cols, scratch).clone()


def _signed_codes(packed: torch.Tensor, scheme: PackScheme, cols: int, scratch: torch.Tensor) -> torch.Tensor:
    """The codes q (R, cols) as int8, through scratch (R, 4W, codes per byte) uint8: each stored code
    minus 2^(bits-1), wrapped in uint8, is q's two's complement byte."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    data = packed.view(torch.uint8)  # (R, 4W): little-endian, so byte b of word w is 8 bits from 8b
    bits, per_byte = scheme.num_bits, scratch.shape[-1]
    if bits == 4:  # the release's width: contiguous 16-bit work instead of strided byte writes, ~4x faster
        pairs = scratch.view(torch.int16).squeeze(-1)  # (R, 4W): one int16 per packed byte
        wide = torch.empty_like(pairs).copy_(data)  # byte h l (high, low nibble) -> 0000 0000 hhhh llll
        torch.bitwise_left_shift(wide, 4, out=pairs)  # 0000 hhhh llll 0000
        pairs.bitwise_or_(wide).bitwise_and_(0x0F0F)  # 0000 hhhh 0000 llll: bytes (l, h), little-endian
        return _offset(scratch, scheme, cols)
    if per_byte == 1:
        scratch[..., 0].copy_(data)
    mask = (1 << bits) - 1
    for j in range(per_byte if per_byte > 1 else 0):  # code j of a byte sits at bits [bits * j, bits * (j + 1))
        torch.bitwise_right_shift(data, bits * j, out=scratch[..., j])
        if j < per_byte - 1:
            scratch[..., j].bitwise_and_(mask)
    return _offset(scratch, scheme, cols)


def _offset(scratch: torch.Tensor, scheme: PackScheme, cols: int) -> torch.Tensor:
    scratch.sub_(scheme.offset)  # byte-sized work, so the float passes are only convert and scale
    return rearrange(scratch.view(torch.int8), "r b j -> r (b j)")[:, :cols]


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    scheme: PackScheme,
    cols: int,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of a packed matrix -> (R, cols) in `dtype`: `q * float32(scale)` per group, rounded once.

    packed: (R, W) int32; scale: (R, scale columns) float, the same rows; out: optional destination.
    """
    rows = packed.shape[0]
    want_scale = scheme.scale_shape((rows, cols))
    if packed.dim() != 2 or tuple(packed.shape) != scheme.packed_shape((rows, cols)):
        raise ValueError(f"dequantize_packed: packed words of shape {tuple(packed.shape)} do not hold {rows} x {cols} "
                         f"int{scheme.num_bits} codes (need {scheme.packed_shape((rows, cols))})")
    if scale.dim() != 2 or tuple(scale.shape) != want_scale:
        raise ValueError(f"dequantize_packed: scale of shape {tuple(scale.shape)}, need {want_scale} ({scheme.describe()})")
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype)
    elif tuple(out.shape) != (rows, cols):
        raise ValueError(f"dequantize_packed: out has shape {tuple(out.shape)}, expected {(rows, cols)}")
    if rows == 0 or cols == 0:
        return out
    per_byte = max(1, 8 // scheme.num_bits)
    chunk = min(rows, max(1, CHUNK_ELEMENTS // cols))
    scratch = torch.empty(chunk, packed.shape[1] * 4, per_byte, dtype=torch.uint8)
    work = None if out.dtype == torch.float32 else torch.empty(chunk, cols, dtype=torch.float32)
    scale32 = scale.to(torch.float32)
    for r in range(0, rows, chunk):
        n = min(chunk, rows - r)
        w = out[r : r + n] if work is None else work[:n]
        w.copy_(_signed_codes(packed[r : r + n], scheme, cols, scratch[:n]))  # exact: small integers
        _scale_groups_(w, scale32[r : r + n], scheme.group_size)
        if work is not None:
            out[r : r + n].copy_(w)
    return out


def _scale_groups_(w: torch.Tensor, scale: torch.Tensor, group: int | None) -> None:
    """w (R, C) *= its groups' scales, in place (the last group may be partial)."""
    if group is None:
        w.mul_(scale)
        return
    cols = w.shape[1]
    full = cols // group * group
    if full:
        rearrange(w[:, :full], "r (g k) -> r g k", k=group).mul_(scale[:, : full // group, None])
    if full < cols:
        w[:, full:].mul_(scale[:, -1:])


def quantize_packed(weight: torch.Tensor, scheme: PackScheme = PackScheme(), scale_dtype=torch.bfloat16):
    """(out, in) weight -> (packed int32, scale, weight_shape int64), symmetric min-max per group:
    `s = amax / (2^(bits-1) - 0.5)` rounded to scale_dtype, `q = clamp(round(W / s), -2^(bits-1), 2^(bits-1) - 1)`."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_packed: expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    w = weight.detach().to("cpu", torch.float32)
    g = cols if scheme.group_size is None else scheme.group_size
    n_groups = scheme.scale_shape(w.shape)[1]
    padded = torch.nn.functional.pad(w, (0, n_groups * g - cols))
    grouped = rearrange(padded, "r (g k) -> r g k", k=g)
    amax = grouped.abs().amax(dim=-1)  # (R, groups)
    scale = (amax / (scheme.offset - 0.5)).to(scale_dtype)
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale == 0, torch.full_like(scale, tiny), scale)
    q = torch.round(grouped / scale.float()[..., None]).clamp_(-scheme.offset, scheme.offset - 1)
    q = rearrange(q, "r g k -> r (g k)")[:, :cols].to(torch.int32) + scheme.offset  # unsigned codes
    return pack(q, scheme.num_bits), scale, torch.tensor([rows, cols], dtype=torch.int64)


def pack(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Unsigned codes (R, C) (any integer dtype, values < 2^bits) -> int32 words (R, ceil(C * bits / 32))."""
    per_word = 32 // num_bits
    rows, cols = codes.shape
    words = math.ceil(cols / per_word)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, words * per_word - cols))
    c = rearrange(c, "r (w j) -> r w j", j=per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    packed = (c << shifts).sum(dim=-1)  # disjoint bit ranges: the sum is a bitwise or
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # as a signed 32-bit word
