"""NVFP4 / FP8 codecs (nemo_scratch/ops/quant.py) against ml_dtypes, the independent oracle. Spec section 9.3.

Decodes and encodes are bit-exact (compared as bit patterns); quantize -> dequantize is re-derived here with
ml_dtypes casts and must agree bit for bit, and stay within the format's error bound; the tiled matmuls agree
with x @ dequantize(W).T within ("quant_matmul", dtype).
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nemo_scratch.errors import DtypeError, InputError, ShapeError
from nemo_scratch.ops import quant
from nemo_scratch.ops.linear import linear
from tolerances import assert_close

F4, F8 = ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e4m3fn
ALL_E4M3 = np.arange(256, dtype=np.uint8)


def bits(a):
    """Float bit patterns, so -0.0 != 0.0 and comparisons are exact."""
    a = np.asarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def ml_e2m1_codes(x):
    """ml_dtypes' E2M1 cast as 4-bit codes (one code per byte, in the low nibble)."""
    return np.asarray(x).astype(F4).view(np.uint8) & np.uint8(0xF)


def ml_e4m3_codes(x):
    return np.asarray(x).astype(F8).view(np.uint8)


# ------------------------------------------------------------------------------------------------ decode

def test_e2m1_table_is_the_spec_table_and_matches_ml_dtypes():
    spec = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
    codes = np.arange(16, dtype=np.uint8)
    got = quant.e2m1_decode(codes)
    assert got.dtype == np.float32 and got.shape == (16,)
    assert np.array_equal(bits(got), bits(spec))
    assert np.array_equal(bits(got), bits(codes.view(F4).astype(np.float32)))


def test_e4m3_decode_all_256_codes_bit_exact():
    got = quant.e4m3_decode(ALL_E4M3)
    ref = ALL_E4M3.view(F8).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (256,)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert set(np.flatnonzero(nan)) == {0x7F, 0xFF}
    assert np.array_equal(bits(got[~nan]), bits(ref[~nan]))
    assert got[0x7E] == 448.0 and got[0xFE] == -448.0 and got[0x01] == 2.0 ** -9 and got[0x08] == 2.0 ** -6
    assert bits(got[0x80]) == bits(np.float32(-0.0))


def test_decode_keeps_shape_and_rejects_bad_codes():
    codes = np.array([[0x12, 0x7E], [0xFE, 0x00]], dtype=np.uint8)
    assert quant.e4m3_decode(codes).shape == (2, 2)
    with pytest.raises(DtypeError, match="codes has dtype int64, expected uint8"):
        quant.e4m3_decode(codes.astype(np.int64))
    with pytest.raises(InputError, match="e2m1_decode: codes holds code 18"):
        quant.e2m1_decode(np.array([1, 18], dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ encode

def _probe_values(table, dtype):
    """Every finite grid value, every midpoint (the ties), one ulp either side of each, and random values."""
    grid = np.unique(np.abs(table[np.isfinite(table)]).astype(np.float64))
    mids = (grid[1:] + grid[:-1]) / 2
    mids = mids.astype(dtype)                                   # exact: midpoints need one more bit
    near = np.concatenate([np.nextafter(mids, dtype(0)), np.nextafter(mids, dtype(np.inf))])
    rng = np.random.default_rng(1)
    rand = np.exp(rng.uniform(np.log(grid[1] / 4), np.log(grid[-1]), 2000)).astype(dtype)
    x = np.concatenate([grid.astype(dtype), mids, near, rand, np.array([0.0], dtype)])
    return np.concatenate([x, -x])


def nearest_even_codes(x, table):
    """Brute force: the code of the nearest finite table value; a tie goes to the even (lower-bit 0) code."""
    codes = np.flatnonzero(np.isfinite(table) & ~np.signbit(table))               # the non-negative codes
    dist = np.abs(np.abs(x.astype(np.float64))[:, None] - table[codes].astype(np.float64)[None, :])
    best = dist == dist.min(axis=1, keepdims=True)
    pick = np.where(best.sum(1) > 1, np.argmax(best & (codes % 2 == 0), axis=1), np.argmax(best, axis=1))
    sign = np.signbit(x).astype(np.uint8) << np.uint8(7 if len(table) == 256 else 3)
    return codes[pick].astype(np.uint8) | sign


# ml_dtypes casts float64 through float32 (a double rounding just below a tie), so for float64 inputs the
# oracle is the brute-force nearest-even search, and ml_dtypes only where x is exactly a float32.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_e4m3_encode_matches_ml_dtypes_including_ties(dtype):
    x = _probe_values(quant.E4M3_VALUES, dtype)
    got = quant.e4m3_encode(x)
    assert got.dtype == np.uint8 and got.shape == x.shape
    assert np.array_equal(got, nearest_even_codes(x, quant.E4M3_VALUES))
    exact32 = x.astype(np.float32) == x
    assert np.array_equal(got[exact32], ml_e4m3_codes(x[exact32]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_e2m1_encode_matches_ml_dtypes_including_ties(dtype):
    x = _probe_values(quant.E2M1_VALUES, dtype)
    got = quant.e2m1_encode(x)
    assert got.dtype == np.uint8 and got.shape == x.shape
    assert np.array_equal(got, nearest_even_codes(x, quant.E2M1_VALUES))
    exact32 = x.astype(np.float32) == x
    assert np.array_equal(got[exact32], ml_e2m1_codes(x[exact32]))
    # the ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype)
    assert np.array_equal(quant.E2M1_VALUES[quant.e2m1_encode(ties)], [0, 1, 1, 2, 2, 4, 4])


def test_encoders_saturate_and_handle_nan():
    big = np.array([449.0, 463.9, 464.0, 1e6, np.inf, -500.0, -np.inf], dtype=np.float32)
    assert np.array_equal(quant.e4m3_encode(big), [0x7E] * 5 + [0xFE] * 2)
    assert np.array_equal(quant.e4m3_encode(np.array([np.nan, -np.nan], np.float32)), [0x7F, 0xFF])
    big4 = np.array([6.5, 7.0, 1e9, np.inf, -8.0], dtype=np.float64)
    assert np.array_equal(quant.e2m1_encode(big4), [7, 7, 7, 7, 15])
    assert np.array_equal(quant.e2m1_encode(big4[:3]), ml_e2m1_codes(big4[:3]))   # ml_dtypes saturates too
    with pytest.raises(InputError, match="NaN"):
        quant.e2m1_encode(np.array([1.0, np.nan], np.float32))
    with pytest.raises(DtypeError, match="e4m3_encode"):
        quant.e4m3_encode(np.array([1, 2], np.int32))


# ------------------------------------------------------------------------------------------------ packing

@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 3), st.integers(1, 40))
@example(seed=0, rows=1, pairs=1)
def test_pack_unpack_round_trip(seed, rows, pairs):
    q = np.random.default_rng(seed).integers(0, 16, (rows, 2 * pairs)).astype(np.uint8)
    packed = quant.pack_nibbles(q)
    assert packed.dtype == np.uint8 and packed.shape == (rows, pairs)
    assert np.array_equal(packed & 0xF, q[:, 0::2]) and np.array_equal(packed >> 4, q[:, 1::2])
    assert np.array_equal(quant.unpack_nibbles(packed), q)


def test_pack_low_nibble_is_even_element_and_errors():
    assert quant.pack_nibbles(np.array([0x1, 0x2, 0xF, 0x0], np.uint8)).tolist() == [0x21, 0x0F]
    with pytest.raises(ShapeError, match="even last dimension"):
        quant.pack_nibbles(np.zeros(3, np.uint8))
    with pytest.raises(InputError, match="4-bit codes"):
        quant.pack_nibbles(np.array([16, 0], np.uint8))
    with pytest.raises(DtypeError, match="packed has dtype float32"):
        quant.unpack_nibbles(np.zeros(2, np.float32))


# ------------------------------------------------------------------------------------------------ NVFP4

def nvfp4_reference(w):
    """Independent re-derivation of ModelOpt's NVFP4 quantizer (one expert, [out, in]): block scales cast by
    ml_dtypes, codes by the brute-force nearest-even search, values decoded by ml_dtypes."""
    g = np.float32(np.abs(w).max()) / np.float32(6 * 448)
    g_div = g if g > 0 else np.float32(1)
    blocks = w.reshape(w.shape[0], -1, 16)
    ratio = np.abs(blocks).max(-1).astype(np.float32) / (np.float32(6) * g_div)
    ratio = np.where(ratio == 0, np.float32(1), np.maximum(ratio, np.float32(2.0 ** -9)))
    s = ratio.astype(F8)
    s_f32 = s.astype(np.float32)
    scaled = blocks / (s_f32 * g_div)[..., None].astype(w.dtype)
    codes = nearest_even_codes(scaled.ravel(), quant.E2M1_VALUES).reshape(w.shape)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    # W_hat = (e2m1 * block scale) * global, in float32
    w_hat = (codes.reshape(blocks.shape).view(F4).astype(np.float32) * s_f32[..., None]) * g
    return packed, s.view(np.uint8), np.float32(g), w_hat.reshape(w.shape), codes


def random_weight(seed, lead, out, inn, dtype=np.float32):
    """Normal weights whose 16-blocks span three decades of magnitude, with some all-zero blocks."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((*lead, out, inn // 16, 16)) * 10.0 ** rng.uniform(-3, 0, (*lead, out, inn // 16, 1))
    w[rng.random((*lead, out, inn // 16)) < 0.1] = 0.0
    return (w * 10.0 ** rng.integers(-4, 3)).reshape(*lead, out, inn).astype(dtype)


# half the E2M1 grid gap around each representable magnitude (the larger of the two sides)
HALF_STEP = {0.0: 0.25, 0.5: 0.25, 1.0: 0.25, 1.5: 0.25, 2.0: 0.5, 3.0: 0.5, 4.0: 1.0, 6.0: 1.0}


@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 5), st.integers(1, 4), st.sampled_from([np.float32, np.float64]))
@example(seed=0, out=1, n_blocks=1, dtype=np.float32)
def test_nvfp4_quantize_matches_rederivation_and_error_bound(seed, out, n_blocks, dtype):
    w = random_weight(seed, (), out, 16 * n_blocks, dtype)
    q = quant.nvfp4_quantize(w)
    assert q.packed.shape == (out, 8 * n_blocks) and q.packed.dtype == np.uint8
    assert q.block_scale.shape == (out, n_blocks) and q.block_scale.dtype == np.uint8
    assert q.global_scale.shape == () and q.global_scale.dtype == np.float32
    assert q.shape == w.shape
    packed, s, g, w_hat, codes = nvfp4_reference(w)
    assert np.array_equal(q.packed, packed)
    assert np.array_equal(q.block_scale, s)
    assert bits(q.global_scale) == bits(g)
    got = quant.nvfp4_dequantize(q.packed, q.block_scale, q.global_scale)
    assert got.dtype == np.float32 and got.shape == w.shape
    assert np.array_equal(bits(got), bits(w_hat))
    # |w - w_hat| <= half an E2M1 step * block scale * global (+ float32 rounding of w_hat); the blocks here
    # are within 3 decades of the tensor's amax, so every block scale is a normal E4M3 number
    step = np.vectorize(HALF_STEP.get)(np.abs(quant.E2M1_VALUES[codes])).astype(np.float64)
    scale = np.repeat(quant.E4M3_VALUES[s].astype(np.float64), 16, axis=-1) * np.float64(g)
    err = np.abs(w.astype(np.float64) - got.astype(np.float64))
    assert np.all(err <= step * scale * (1 + 1e-6))


def test_nvfp4_tiny_blocks_and_zero_tensor():
    # a block 1e-6 of the tensor's amax: its scale clamps at the E4M3 minimum 2^-9 and it still re-derives
    w = np.zeros((2, 32), np.float32)
    w[0, :16] = np.linspace(-1, 1, 16)
    w[1, 16:] = 1e-6
    q = quant.nvfp4_quantize(w)
    packed, s, g, w_hat, _ = nvfp4_reference(w)
    assert np.array_equal(q.packed, packed) and np.array_equal(q.block_scale, s)
    assert q.block_scale[1, 1] == 0x01 and q.block_scale[0, 1] == 0x38          # 2^-9 and the zero block's 1.0
    assert np.array_equal(bits(quant.nvfp4_dequantize(q.packed, q.block_scale, q.global_scale)), bits(w_hat))
    zero = quant.nvfp4_quantize(np.zeros((3, 16), np.float64))
    assert zero.global_scale == 0 and np.all(zero.packed == 0) and np.all(zero.block_scale == 0x38)
    assert np.all(quant.nvfp4_dequantize(zero.packed, zero.block_scale, zero.global_scale) == 0)


def test_nvfp4_stacked_experts_have_one_global_scale_each():
    w = random_weight(3, (3,), 4, 32)
    q = quant.nvfp4_quantize(w)
    assert q.packed.shape == (3, 4, 16) and q.block_scale.shape == (3, 4, 2) and q.global_scale.shape == (3,)
    deq = quant.nvfp4_dequantize(q.packed, q.block_scale, q.global_scale)
    for e in range(3):
        one = quant.nvfp4_quantize(w[e])
        assert np.array_equal(q[e].packed, one.packed) and np.array_equal(q[e].block_scale, one.block_scale)
        assert bits(q[e].global_scale) == bits(one.global_scale)
        assert np.array_equal(bits(deq[e]), bits(quant.nvfp4_dequantize(one.packed, one.block_scale,
                                                                         one.global_scale)))
    # ModelOpt stores weight_scale_2 as [] or [1]: both are accepted
    one = q[0]
    assert np.array_equal(quant.nvfp4_dequantize(one.packed, one.block_scale, one.global_scale.reshape(1)),
                          deq[0])


@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 9), st.integers(1, 3), st.integers(1, 4),
       st.sampled_from([np.float32, np.float64]))
@example(seed=0, out=9, n_blocks=3, rows_per_tile=4, dtype=np.float64)
def test_nvfp4_matmul_equals_dequantize_then_matmul(seed, out, n_blocks, rows_per_tile, dtype):
    rng = np.random.default_rng(seed)
    q = quant.nvfp4_quantize(random_weight(seed, (), out, 16 * n_blocks))
    x = rng.standard_normal((2, 3, 16 * n_blocks)).astype(dtype)
    y = quant.nvfp4_matmul(x, q.packed, q.block_scale, q.global_scale, rows_per_tile=rows_per_tile)
    assert y.shape == (2, 3, out) and y.dtype == dtype
    ref = x @ quant.nvfp4_dequantize(q.packed, q.block_scale, q.global_scale).astype(dtype).T
    assert_close(y, ref, "quant_matmul", dtype)
    assert_close(linear(x, q), ref, "quant_matmul", dtype, what="linear(x, NVFP4Weight)")


def test_nvfp4_rejects_bad_shapes_and_dtypes():
    q = quant.nvfp4_quantize(random_weight(0, (), 4, 32))
    p, s, g = q.packed, q.block_scale, q.global_scale
    with pytest.raises(ShapeError, match="in=24 columns, expected a multiple of 16"):
        quant.nvfp4_quantize(np.ones((2, 24), np.float32))
    with pytest.raises(ShapeError, match="expected \\[..., out, in\\]"):
        quant.nvfp4_quantize(np.ones(16, np.float32))
    with pytest.raises(InputError, match="NaN or inf"):
        quant.nvfp4_quantize(np.full((1, 16), np.inf, np.float32))
    with pytest.raises(DtypeError, match="nvfp4_quantize"):
        quant.nvfp4_quantize(np.ones((1, 16), np.float16))
    with pytest.raises(ShapeError, match="in=8 is not a multiple of 16"):
        quant.nvfp4_dequantize(p[:, :4], s[:, :1], g)
    with pytest.raises(ShapeError, match="block_scale has shape \\[4, 1\\], expected \\[4, 2\\]"):
        quant.nvfp4_dequantize(p, s[:, :1], g)
    with pytest.raises(ShapeError, match="global_scale has shape \\[2\\]"):
        quant.nvfp4_dequantize(p, s, np.ones(2, np.float32))
    with pytest.raises(DtypeError, match="packed has dtype int8, expected uint8"):
        quant.nvfp4_dequantize(p.view(np.int8), s, g)
    with pytest.raises(DtypeError, match="block_scale has dtype float32"):
        quant.nvfp4_dequantize(p, s.astype(np.float32), g)
    with pytest.raises(DtypeError, match="global_scale has dtype float64, expected float32"):
        quant.nvfp4_dequantize(p, s, g.astype(np.float64))
    with pytest.raises(ShapeError, match="x has shape \\[2, 16\\], expected \\[..., 32\\]"):
        quant.nvfp4_matmul(np.ones((2, 16), np.float32), p, s, g)
    with pytest.raises(DtypeError, match="nvfp4_matmul"):
        quant.nvfp4_matmul(np.ones((2, 32), np.int64), p, s, g)
    with pytest.raises(ShapeError, match="index stacked experts"):
        quant.nvfp4_matmul(np.ones((2, 32), np.float32), p[None], s[None], g[None])
    with pytest.raises(InputError, match="rows_per_tile"):
        quant.nvfp4_matmul(np.ones((2, 32), np.float32), p, s, g, rows_per_tile=0)


# ------------------------------------------------------------------------------------------------ FP8

@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 6), st.integers(1, 40), st.sampled_from([np.float32, np.float64]))
def test_fp8_quantize_matches_rederivation_and_error_bound(seed, out, inn, dtype):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, inn)) * 10.0 ** rng.integers(-4, 3)).astype(dtype)
    q = quant.fp8_quantize(w)
    scale = np.float32(np.abs(w).max()) / np.float32(448)
    assert q.data.dtype == np.uint8 and q.data.shape == w.shape and q.scale.dtype == np.float32
    assert bits(q.scale) == bits(scale)
    ref_codes = nearest_even_codes((w / dtype(scale)).ravel(), quant.E4M3_VALUES).reshape(w.shape)
    assert np.array_equal(q.data, ref_codes)
    got = quant.fp8_dequantize(q.data, q.scale)
    # W_hat = e4m3(data) * weight_scale
    assert np.array_equal(bits(got), bits(q.data.view(F8).astype(np.float32) * scale))
    # half an E4M3 step: 2^-4 relative for normals, 2^-10 * scale absolute for subnormals (+ float32 rounding)
    err = np.abs(w.astype(np.float64) - got)
    assert np.all(err <= (2.0 ** -4 * np.abs(w) + 2.0 ** -10 * scale) * (1 + 1e-6))


def test_fp8_matmul_stacked_zero_and_errors():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 5, 7)).astype(np.float32)
    w[1] = 0.0
    q = quant.fp8_quantize(w)
    assert q.scale.shape == (2,) and q.scale[1] == 0 and np.all(quant.fp8_dequantize(q.data[1], q.scale[1]) == 0)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((3, 7)).astype(dtype)
        y = quant.fp8_matmul(x, q.data[0], q.scale[0], rows_per_tile=2)
        assert y.dtype == dtype and y.shape == (3, 5)
        assert_close(y, x @ quant.fp8_dequantize(q.data[0], q.scale[0]).astype(dtype).T, "quant_matmul", dtype)
        assert_close(linear(x, q[0]), y, "quant_matmul", dtype, what="linear(x, FP8Weight)")
    with pytest.raises(DtypeError, match="data has dtype float32"):
        quant.fp8_dequantize(w, q.scale)
    with pytest.raises(ShapeError, match="scale has shape \\[3\\]"):
        quant.fp8_dequantize(q.data, np.ones(3, np.float32))
    with pytest.raises(ShapeError, match="expected \\[..., 7\\]"):
        quant.fp8_matmul(np.ones((1, 6), np.float32), q.data[0], q.scale[0])
    with pytest.raises(InputError, match="NaN or inf"):
        quant.fp8_quantize(np.array([[np.nan]], np.float32))
