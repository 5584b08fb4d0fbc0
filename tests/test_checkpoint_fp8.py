"""fp8 e4m3 with 128x128 block scales: k2mini's (fast) quantizer and dequantizer against a plain loop,
on blocks that are and are not whole, and the rounding error bound, measured."""

import math

import pytest
import torch

from checkpoint_factory import reference_dequantize, reference_quantize
import k2mini.checkpoint.fp8 as fp8_module
from k2mini.checkpoint.fp8 import dequantize_fp8, quantize_fp8, scale_shape

SHAPES = [(96, 160), (160, 96), (300, 200), (1, 1), (129, 127), (256, 384), (128, 128), (5, 300), (7168 // 16, 130)]


def blocky(shape, seed):
    """Random weights whose magnitude changes from block to block (so every block has its own scale)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    mag = torch.exp(torch.randn(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=g) * 3)
    return w * mag.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_equal_the_plain_loop(shape):
    w = blocky(shape, seed=shape[0] * 1000 + shape[1])
    q, s = quantize_fp8(w)
    q_ref, s_ref = reference_quantize(w)
    assert s.shape == scale_shape(shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert s.dtype == torch.float32 and q.dtype == torch.float8_e4m3fn
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(dequantize_fp8(q, s), reference_dequantize(q, s))  # bit for bit


def test_every_fp8_code_dequantizes_like_torch():
    """All 256 bit patterns (subnormals, both zeros, 448, NaN) through the float16 bit trick."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    got = dequantize_fp8(codes, torch.ones(1, 1))
    want = codes.to(torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and int(torch.isnan(want).sum()) == 2
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    finite = ~torch.isnan(want)
    assert torch.equal(torch.signbit(got)[finite], torch.signbit(want)[finite])  # -0.0 stays -0.0


def test_row_slices_and_dtypes():
    w = blocky((300, 200), seed=1)
    q, s = quantize_fp8(w)
    full = reference_dequantize(q, s)
    for a, b in [(0, 300), (100, 140), (127, 129), (128, 256), (299, 300), (5, 5)]:
        assert torch.equal(dequantize_fp8(q[a:b], s, row_start=a), full[a:b])
    out = torch.empty(40, 200, dtype=torch.bfloat16)
    dequantize_fp8(q[100:140], s, row_start=100, out=out)
    assert torch.equal(out, full[100:140].to(torch.bfloat16))  # one rounding, from the exact float32 value
    with pytest.raises(ValueError, match="does not cover"):
        dequantize_fp8(q, s[:, :1])


def test_zero_and_tiny_blocks_survive():
    w = torch.zeros(130, 130)
    w[129, 129] = 1e-30
    q, s = quantize_fp8(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(dequantize_fp8(q, s)[:128, :128], torch.zeros(128, 128))
    assert dequantize_fp8(q, s)[129, 129].item() == pytest.approx(1e-30, rel=2**-4)


def test_fp8_rounding_error_bound():
    """e4m3 keeps 3 mantissa bits, so rounding W / s to nearest moves it by at most half a unit in the
    last place, 2^-4 of its power of two: relative error <= 2^-4 / (1 + 2^-4) = 1/17 for normal numbers
    (|W / s| >= 2^-6; the worst case is a value halfway between 1 and 1 + 2^-3 times a power of two),
    and absolute error <= 2^-10 * s below that (subnormal spacing 2^-9). As |W| <= 448 s in a block,
    every element also has |W_hat - W| <= amax(block) / 17. Measured here on 1.6M weights: worst
    relative error 0.05882 (= 1/17, the bound is reached), mean 0.0225."""
    w = blocky((1024, 1536), seed=7)
    q, s = quantize_fp8(w)
    w_hat = dequantize_fp8(q, s)
    s_full = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    err = (w_hat - w).abs()
    slack = 1 + 2**-20  # float32 rounding of W / s and of the product
    assert (err <= torch.maximum(w.abs() / 17, 2**-10 * s_full) * slack).all()
    normal = w.abs() >= 2**-6 * s_full
    rel = err[normal] / w.abs()[normal]
    assert normal.float().mean() > 0.99
    assert 0.0588 < rel.max().item() <= slack / 17  # measured 0.05882: the bound is tight
    assert 0.015 < rel.mean().item() < 0.03
    amax = torch.stack([b.abs().amax() for b in w.split(128, 0) for b in b.split(128, 1)]).reshape(s.shape)
    amax_full = amax.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    assert (err <= amax_full / 17 * slack).all()


def test_input_validation():
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        dequantize_fp8(torch.ones(3, dtype=torch.float8_e4m3fn), torch.ones(1, 1))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_fp8(torch.ones(3, 3), torch.ones(1, 1))


@pytest.mark.parametrize("chunk", [100, 128 * 300, 3 * 128 * 300 + 7])
def test_chunks_of_several_block_rows_give_the_same_values(chunk, monkeypatch):
    """Chunks of part of a block row, of one, and of several (with a partial last block row and a
    partial last column block), from slices that start on and off block boundaries."""
    monkeypatch.setattr(fp8_module, "CHUNK_ELEMENTS", chunk)
    w = blocky((700, 300), seed=7)
    q, s = quantize_fp8(w)
    full = reference_dequantize(q, s)
    for a, b in [(0, 700), (128, 700), (5, 650), (256, 640), (300, 301)]:
        assert torch.equal(dequantize_fp8(q[a:b], s, row_start=a), full[a:b]), (a, b)
        out = torch.empty(b - a, 300, dtype=torch.bfloat16)
        assert torch.equal(dequantize_fp8(q[a:b], s, row_start=a, out=out), full[a:b].to(torch.bfloat16))
