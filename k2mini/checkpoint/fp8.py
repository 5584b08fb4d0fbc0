"""FP8 (e4m3) weights with 128x128 block scales, as Kimi-K2 and DeepSeek-V3 publish them.

Dequantized weight: `W[r, c] = float(w[r, c]) * scale_inv[r // 128, c // 128]`, scale_inv of shape
[ceil(out/128), ceil(in/128)] (the last block row/column may be partial). Quantizing for export, per
block: `s = max(amax(block), tiny) / 448`, `w = (W / s).to(float8_e4m3fn)`, store `s`.

torch converts float8 to float one element at a time on CPU (~50M elements/s). Dequantization here
goes through float16 instead, which the CPU converts in vector registers: an e4m3 byte `s eeee mmm`
shifted into the float16 bit layout `s 0eeee mmm0000000` is the same number times 2^-8 (normal and
subnormal alike, exponent biases 7 and 15), so `float(w) = float16_bits(w) * 256` exactly, and the 256
folds into the block scale. The bytes are processed in cache-sized chunks, ~30x faster.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = (128, 128)
CHUNK_ELEMENTS = 2**20  # dequantize about this many elements at a time (scratch: 3-7 MiB)


def scale_shape(shape, block=BLOCK) -> tuple[int, int]:
    """Shape of the `_scale_inv` tensor of a 2-D weight."""
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def quantize_fp8(weight: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (float8_e4m3fn weight, float32 scale_inv of shape scale_shape)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_fp8: expected a 2-D weight, got shape {tuple(weight.shape)}")
    bo, bi = block
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(scale_shape(weight.shape, block), dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    for i, r in enumerate(range(0, rows, bo)):  # one block row at a time: memory stays bounded
        w = weight[r : r + bo].to("cpu", torch.float32)
        amax = torch.stack([w[:, c : c + bi].abs().amax() for c in range(0, cols, bi)])  # (n_col_blocks,)
        s = amax.clamp_min(tiny) / FP8_MAX
        scales[i] = s
        per_col = s.repeat_interleave(bi)[:cols]  # (cols,)
        q[r : r + bo] = (w / per_col).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block=BLOCK,
    dtype: torch.dtype = torch.float32,
    row_start: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """float8 weight rows [row_start, row_start + R) of a matrix whose full `scale_inv` is given -> dtype.

    weight: (R, C) float8_e4m3fn (or its raw uint8/int8 bytes). out: optional (R, C) destination.
    """
    if weight.dim() != 2:
        raise ValueError(f"dequantize_fp8: expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    bo, bi = block
    n_col_blocks = math.ceil(cols / bi)
    need_rows = math.ceil((row_start + rows) / bo) if rows else 0
    if scale_inv.dim() != 2 or scale_inv.shape[1] != n_col_blocks or scale_inv.shape[0] < need_rows:
        raise ValueError(
            f"dequantize_fp8: scale_inv of shape {tuple(scale_inv.shape)} does not cover rows "
            f"[{row_start}, {row_start + rows}) x {cols} columns in {bo}x{bi} blocks"
        )
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype)
    elif tuple(out.shape) != (rows, cols):
        raise ValueError(f"dequantize_fp8: out has shape {tuple(out.shape)}, expected {(rows, cols)}")
    if weight.dtype == torch.float8_e5m2:  # no published checkpoint uses it: the plain path
        return _dequantize_plain(weight, scale_inv, block, row_start, out)
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8, torch.int8):
        raise ValueError(f"dequantize_fp8: expected float8_e4m3fn bytes, got {weight.dtype}")
    if rows == 0 or cols == 0:
        return out
    codes = weight.view(torch.int8)  # sign-extends into int16 below
    scales = scale_inv.to(torch.float32) * 256.0  # float16_bits(w) * 256 == float(w), exactly
    full = (cols // bi) * bi
    # A chunk is a run of whole block rows when at least one fits in CHUNK_ELEMENTS, else part of one
    # block row; either way it never needs two scales for one row. Fewer, larger chunks: fewer ops.
    chunk_rows = max(1, CHUNK_ELEMENTS // max(cols, 1))
    chunk_rows = chunk_rows - chunk_rows % bo if chunk_rows >= bo else chunk_rows
    chunk_rows = min(chunk_rows, rows)
    bits = torch.empty(chunk_rows, cols, dtype=torch.int16)
    low7 = torch.empty(chunk_rows, cols, dtype=torch.int8)
    # the product is formed in float32 (as the reference W = float(w) * s), then rounded once to dtype
    work = None if out.dtype == torch.float32 else torch.empty(chunk_rows, cols, dtype=torch.float32)
    r = 0
    while r < rows:
        g = row_start + r
        b = g // bo  # block row of the chunk's first row
        if g % bo or chunk_rows < bo:
            n = min(rows - r, chunk_rows, (b + 1) * bo - g)  # stays inside block row b
        else:
            n = min(rows - r, chunk_rows)  # whole block rows from b on (the last may end early)
        h, dst, src = bits[:n], out[r : r + n], codes[r : r + n]
        w = dst if work is None else work[:n]
        h.copy_(src)  # int8 -> int16: sign in bits 7..15, eeee mmm in bits 0..6
        h.bitwise_left_shift_(7)  # eeee mmm into bits 7..13, sign into 14 and 15
        h.bitwise_and_(-16385)  # clear bit 14 (0xBFFF): now a float16 `s 0eeee mmm0000000`
        w.copy_(h.view(torch.float16))  # = w / 256
        nan = torch.bitwise_and(src, 0x7F, out=low7[:n])  # e4m3's NaN is s1111111: 1.875 in float16
        if int(nan.max()) == 0x7F:
            w.masked_fill_(nan == 0x7F, float("nan"))
        _scale_rows_(w, scales, b, bo, bi, full)
        if work is not None:
            dst.copy_(w)
        r += n
    return out


def _scale_rows_(w: torch.Tensor, scales: torch.Tensor, b: int, bo: int, bi: int, full: int) -> None:
    """Multiply rows of w, the first in block row b, by their blocks' scales, in place: the whole
    block rows as [blocks, bo, col blocks, bi] views, then the rest of the last block row."""
    n, cols = w.shape
    whole = n // bo  # n >= bo only for chunks that start on a block boundary
    if whole:
        s = scales[b : b + whole]
        head = w[: whole * bo]
        if full:
            head[:, :full].unflatten(0, (whole, bo)).unflatten(2, (full // bi, bi)).mul_(s[:, None, : full // bi, None])
        if full < cols:
            head[:, full:].unflatten(0, (whole, bo)).mul_(s[:, None, -1:])
    rest = w[whole * bo :]
    if len(rest):
        s = scales[b + whole]
        if full:
            rest[:, :full].unflatten(1, (full // bi, bi)).mul_(s[: full // bi, None])
        if full < cols:
            rest[:, full:].mul_(s[-1])


def _dequantize_plain(weight, scale_inv, block, row_start, out):
    bo, bi = block
    rows, cols = weight.shape
    r_idx = (torch.arange(rows) + row_start) // bo
    c_idx = torch.arange(cols) // bi
    s = scale_inv.to(torch.float32)[r_idx][:, c_idx]
    out.copy_(weight.to(torch.float32) * s)
    return out
