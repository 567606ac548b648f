"""NVFP4 and FP8 block-scaled weights (ModelOpt layout), decoded bit-exactly. Spec section 9.

The containers NVFP4Weight / FP8Weight live in formats.py (re-exported here); the codecs follow.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, ShapeError
from .common import check_float, get_xp
from .contracts import (check_bf16_decode, check_bf16_matmul, check_codes, check_dense_matmul, check_e2m1_decode,
                        check_e4m3_decode, check_fp8_dequantize, check_fp8_matmul, check_nvfp4_dequantize,
                        check_nvfp4_matmul)
from .formats import BF16Weight, ExpertBank, FP8Weight, NVFP4Weight, map_arrays  # noqa: F401  (re-exported)


# ================================================================================================ codecs
# Everything below is pure array code written against ``xp`` (NumPy, or CuPy when handed CuPy arrays).
# Spec section 9.3. Glossary: codes are uint8 bit patterns; "values" are the floats they stand for.

E2M1_MAX = 6.0      # largest E2M1 magnitude (code 0b0111)
E4M3_MAX = 448.0    # largest finite E4M3FN magnitude (code 0x7E); 0x7F / 0xFF are NaN
NVFP4_BLOCK = 16    # elements per E4M3 block scale


def minifloat_value(code, exp_bits, man_bits, bias, has_nan):
    """The value of one sign|exponent|mantissa bit pattern (IEEE-like, no infinities).

    normal     (e > 0): (-1)^s * 2^(e - bias) * (1 + m / 2^man_bits)
    subnormal  (e = 0): (-1)^s * 2^(1 - bias) * (m / 2^man_bits)
    has_nan: the all-ones exponent+mantissa pattern is NaN (E4M3FN's 0x7F / 0xFF).
    """
    sign = -1.0 if (code >> (exp_bits + man_bits)) & 1 else 1.0
    e = (code >> man_bits) & ((1 << exp_bits) - 1)
    m = code & ((1 << man_bits) - 1)
    if has_nan and e == (1 << exp_bits) - 1 and m == (1 << man_bits) - 1:
        return float("nan")
    if e == 0:
        return sign * 2.0 ** (1 - bias) * (m / 2 ** man_bits)
    return sign * 2.0 ** (e - bias) * (1 + m / 2 ** man_bits)


# E2M1 (FP4): 1 sign, 2 exponent (bias 1), 1 mantissa bit -> [0, .5, 1, 1.5, 2, 3, 4, 6, -0, ..., -6]
E2M1_VALUES = np.array([minifloat_value(c, 2, 1, 1, False) for c in range(16)], dtype=np.float32)
# E4M3FN (FP8): 1 sign, 4 exponent (bias 7), 3 mantissa bits; subnormals; 0x7F/0xFF NaN; max 448
E4M3_VALUES = np.array([minifloat_value(c, 4, 3, 7, True) for c in range(256)], dtype=np.float32)


def e2m1_decode(codes):  # uint8 [...] (0..15) -> float32 [...]
    """FP4 E2M1 codes -> values, by table lookup (bit-exact)."""
    check_e2m1_decode(codes)
    return get_xp(codes).asarray(E2M1_VALUES)[codes]


def e4m3_decode(codes):  # uint8 [...] -> float32 [...]
    """FP8 E4M3FN bit patterns -> values, by a 256-entry table built from the bit fields (bit-exact)."""
    check_e4m3_decode(codes)
    return get_xp(codes).asarray(E4M3_VALUES)[codes]


def _round_to_grid(a, man_bits, min_exp, max_value):  # |x| [...] -> nearest grid value [...]
    """Round magnitudes onto a minifloat grid: round-to-nearest-even, saturating at max_value.

    Inside the binade [2^k, 2^(k+1)) the grid step is 2^(k - man_bits); below 2^min_exp (subnormals) it stays
    2^(min_exp - man_bits). Dividing by a power of two is exact, so one rint (ties to even) does the rounding.
    """
    xp = get_xp(a)
    a = xp.minimum(a, a.dtype.type(max_value))
    _, exp = xp.frexp(a)                                       # a = frac * 2^exp, frac in [0.5, 1)
    # k = floor(log2 a), held at min_exp for subnormals (and for a = 0)
    k = xp.maximum(exp - 1, min_exp)
    step = xp.ldexp(xp.ones_like(a), k - man_bits)
    return xp.rint(a / step) * step


def _encode(x, man_bits, min_exp, max_value, table):  # float [...] -> uint8 codes [...]
    """Shared body of the encoders: sign bit | index of the rounded magnitude among the table's positive values."""
    xp = get_xp(x)
    positive = table[: len(table) // 2]
    grid = xp.asarray(positive[np.isfinite(positive)], dtype=x.dtype)               # ascending, finite
    magnitude = _round_to_grid(xp.abs(xp.nan_to_num(x, nan=0.0)), man_bits, min_exp, max_value)
    codes = xp.searchsorted(grid, magnitude).astype(np.uint8)                        # exact grid hit
    # the sign is the top bit of the code (bit 3 of a nibble, bit 7 of a byte); IEEE signbit, so -0.0 -> -0
    sign_shift = np.uint8((len(table) - 1).bit_length() - 1)
    return codes | (xp.signbit(x).astype(np.uint8) << sign_shift)


def e2m1_encode(x):  # float32|float64 [...] -> uint8 codes [...] (0..15)
    """Round to the nearest E2M1 value (ties to even), saturating at +-6. NaN raises InputError."""
    check_float("e2m1_encode", x)
    if bool(get_xp(x).isnan(x).any()):
        raise InputError("e2m1_encode: x contains NaN, which E2M1 cannot represent")
    return _encode(x, man_bits=1, min_exp=0, max_value=E2M1_MAX, table=E2M1_VALUES)


def e4m3_encode(x):  # float32|float64 [...] -> uint8 E4M3FN bit patterns [...]
    """Round to the nearest E4M3FN value (ties to even), saturating at +-448 (so +-inf -> +-448).

    Deviation: a plain cast (ml_dtypes, torch) turns |x| >= 464 into NaN; scales must never be NaN, so we
    saturate, like ModelOpt's clamp before its cast. NaN stays NaN (0x7F, or 0xFF with the sign bit).
    """
    check_float("e4m3_encode", x)
    xp = get_xp(x)
    codes = _encode(x, man_bits=3, min_exp=-6, max_value=E4M3_MAX, table=E4M3_VALUES)
    return xp.where(xp.isnan(x), codes | np.uint8(0x7F), codes).astype(np.uint8)


def pack_nibbles(q):  # uint8 [..., 2m] (0..15) -> uint8 [..., m]
    """Two 4-bit codes per byte: packed = q[odd] << 4 | q[even] (low nibble = even element)."""
    check_codes(q, 15, op="pack_nibbles", arg="q")
    if q.ndim == 0 or q.shape[-1] % 2:
        raise ShapeError(f"pack_nibbles: q has shape {list(q.shape)}, expected an even last dimension")
    return (q[..., 1::2] << np.uint8(4)) | q[..., 0::2]


def unpack_nibbles(packed):  # uint8 [..., m] -> uint8 [..., 2m]
    """Inverse of pack_nibbles: q[..., 0::2] = b & 0xF, q[..., 1::2] = b >> 4."""
    check_codes(packed, 255, op="unpack_nibbles", arg="packed")
    xp = get_xp(packed)
    pairs = xp.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)   # [..., m, 2]
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# ------------------------------------------------------------------------------------------------ NVFP4

def _per_tensor(name, w, amax=None):
    """amax over the last two axes (one tensor, or one per stacked expert), or the given one (of the tensor ``w``
    is a slice of); rejects NaN/inf weights."""
    xp = get_xp(w)
    if w.ndim < 2:
        raise ShapeError(f"{name}: w has shape {list(w.shape)}, expected [..., out, in]")
    if not bool(xp.isfinite(w).all()):
        raise InputError(f"{name}: w contains NaN or inf; only finite weights can be quantized")
    if amax is not None:
        return xp.asarray(amax, dtype=np.float32)
    return xp.asarray(xp.abs(w).max(axis=(-2, -1)), dtype=np.float32)              # [...]


def _nonzero(scale):
    """A divisor that is 1 where the scale is 0 (an all-zero tensor or block: its codes are 0 anyway)."""
    return get_xp(scale).where(scale == 0, scale.dtype.type(1), scale)


def nvfp4_quantize(w, amax=None):  # float32|float64 [..., out, in] (in % 16 == 0) -> NVFP4Weight
    """Quantize like ModelOpt's NVFP4QTensor (dynamic weight scales; spec 9.3).

    global_scale = amax(|W|) / (6 * 448)                                   (per tensor, per expert if stacked)
    block_scale  = e4m3(clamp(block_amax / (6 * global_scale), min=2^-9)), 1.0 for an all-zero block
    codes        = rne_e2m1(W / (float(block_scale) * global_scale))
    An all-zero tensor gets global_scale 0 (it dequantizes to 0), block scales 1.0 and codes 0.
    Deviation: ModelOpt takes the sign from ``w < 0``; we use the IEEE sign bit, so an exact -0.0 weight gets
    code 8 (-0) instead of 0. Both decode to zero.
    ``amax`` (float32 [...]): the amax of a whole tensor of which ``w`` is a slice of rows; every step after
    the global scale is row by row, so quantizing the slices with it gives the whole tensor's codes and scales
    (checkpoint/stream.py quantizes large tensors this way, a slice at a time).
    """
    check_float("nvfp4_quantize", w)
    xp = get_xp(w)
    amax = _per_tensor("nvfp4_quantize", w, amax)                                    # [...]
    *lead, out, inn = w.shape
    if inn % NVFP4_BLOCK:
        raise ShapeError(f"nvfp4_quantize: w has in={inn} columns, expected a multiple of {NVFP4_BLOCK}")
    # weight_scale_2 = amax / (6 * 448), in float32 as ModelOpt computes it
    global_scale = amax / np.float32(E2M1_MAX * E4M3_MAX)                            # [...]
    g = _nonzero(global_scale)[..., None, None]                                     # [..., 1, 1]
    blocks = w.reshape(*lead, out, inn // NVFP4_BLOCK, NVFP4_BLOCK)                 # [..., out, in/16, 16]
    block_amax = xp.abs(blocks).max(axis=-1).astype(np.float32)                      # [..., out, in/16]
    # per_block_scale = block_amax / (6 * weight_scale_2); zero blocks -> 1.0; clamp(min=2^-9); to E4M3
    ratio = block_amax / (np.float32(E2M1_MAX) * g)
    ratio = xp.where(ratio == 0, np.float32(1), xp.maximum(ratio, np.float32(2.0 ** -9)))
    block_scale = e4m3_encode(ratio)                                                 # [..., out, in/16] u8
    # codes = rne_e2m1(W / (s_b * s_g)), the scale product in float32 like ModelOpt
    denom = xp.asarray(E4M3_VALUES)[block_scale] * g                                 # [..., out, in/16]
    codes = e2m1_encode(blocks / denom[..., None].astype(w.dtype))                   # [..., out, in/16, 16]
    packed = pack_nibbles(codes.reshape(*lead, out, inn))                            # [..., out, in/2]
    return NVFP4Weight(packed, block_scale, global_scale)


def _decode_nvfp4(packed, block_scale, global_scale):  # [..., r, in/2], [..., r, in/16], [...] -> f32 [..., r, in]
    """W[r, 16j + i] = (e2m1[code] * float(block_scale[r, j])) * global_scale, all in float32.

    e2m1 * e4m3 has at most 6 significant bits, so that product is exact and the one rounding is the final
    multiply. Deviation: ModelOpt multiplies code * (block_scale * global) and can differ by 1 ulp.
    """
    xp = get_xp(packed)
    *lead, rows, half = packed.shape
    values = xp.asarray(E2M1_VALUES)[unpack_nibbles(packed)]                         # [..., r, in]
    values = values.reshape(*lead, rows, half * 2 // NVFP4_BLOCK, NVFP4_BLOCK)       # [..., r, in/16, 16]
    scaled = values * xp.asarray(E4M3_VALUES)[block_scale][..., None]                # exact
    g = xp.asarray(global_scale).reshape(*lead, 1, 1, 1)   # a host scalar scale also works with device codes
    return (scaled * g).reshape(*lead, rows, half * 2)


def nvfp4_dequantize(packed, block_scale, global_scale):  # [..., out, in/2] u8, [..., out, in/16] u8, [...] f32
    """-> float32 [..., out, in], bit-exact (see _decode_nvfp4)."""
    check_nvfp4_dequantize(packed, block_scale, global_scale)
    return _decode_nvfp4(packed, block_scale, global_scale)


def _tiled_matmul(x, rows, decode_rows, rows_per_tile):  # [..., in] -> [..., out]
    """y = x @ W^T where decode_rows(r0, r1) returns W[r0:r1] in float32: only one tile is ever decoded."""
    xp = get_xp(x)
    y = xp.empty((*x.shape[:-1], rows), dtype=x.dtype)
    for r0 in range(0, rows, rows_per_tile):
        r1 = min(r0 + rows_per_tile, rows)
        # float32 -> float64 is exact, so an oracle-mode x sees the same weights
        y[..., r0:r1] = xp.matmul(x, decode_rows(r0, r1).astype(x.dtype, copy=False).T)
    return y


# ------------------------------------------------------------------------------------------------ BF16, dense

# float32 bytes of one tile of a dense or BF16 weight (NumPy): the decoded BF16 temporary never exceeds it, and
# a dense float32 weight is cut at the same rows, so the two modes run the same BLAS calls on the same values.
TILE_BYTES = 4 * 2**20


def tile_rows(x, rows, inn):
    """Output rows a tile of a dense / BF16 matmul: TILE_BYTES of float32 on NumPy; all rows on other array
    modules (a GPU's one cuBLAS call, no decode temporary there: the GPU backends upload BF16 as float32)."""
    return max(1, TILE_BYTES // (4 * max(inn, 1))) if get_xp(x).__name__ == "numpy" else max(rows, 1)


def bf16_decode(bits):  # uint16 [...] -> float32 [...]
    """bfloat16 bit patterns -> float32, exactly: a bfloat16 is the top half of a float32 (inf and NaN too)."""
    check_bf16_decode(bits)
    xp = get_xp(bits)
    # f32_bits = bf16_bits << 16   (shifted in place: one 4-byte temporary per element, which becomes the result)
    wide = bits.astype(xp.uint32)
    wide <<= xp.uint32(16)
    return wide.view(xp.float32)


def bf16_matmul(x, bits, rows_per_tile=None):  # [..., in], u16 [out, in] -> [..., out]
    """y = x @ W^T with W stored as bfloat16, decoded one tile of rows at a time (exact, so bitwise the same
    as dense_matmul on the float32 weight: the same tiles, the same BLAS calls)."""
    _, out, inn = check_bf16_matmul(x, bits, rows_per_tile)
    return _tiled_matmul(x, out, lambda r0, r1: bf16_decode(bits[r0:r1]), rows_per_tile or tile_rows(x, out, inn))


def dense_matmul(x, w, rows_per_tile=None):  # [..., in], [out, in] -> [..., out]
    """y = x @ W^T for a plain float weight, in the tiles bf16_matmul uses (one BLAS call per tile)."""
    _, out, inn = check_dense_matmul(x, w, rows_per_tile)
    return _tiled_matmul(x, out, lambda r0, r1: w[r0:r1], rows_per_tile or tile_rows(x, out, inn))


def nvfp4_matmul(x, packed, block_scale, global_scale, rows_per_tile=128):  # [..., in], [out, in/2] -> [..., out]
    """W4A16: y = x @ dequantize(W)^T, decoding rows_per_tile output rows at a time (never the whole W).

    The output has x's dtype (float32, or float64 in oracle mode; the decode itself is exact in float32).
    """
    _, out, _ = check_nvfp4_matmul(x, packed, block_scale, global_scale, rows_per_tile)
    return _tiled_matmul(x, out, lambda r0, r1: _decode_nvfp4(packed[r0:r1], block_scale[r0:r1], global_scale),
                         rows_per_tile)


# ------------------------------------------------------------------------------------------------ FP8

def fp8_quantize(w, amax=None):  # float32|float64 [..., out, in] -> FP8Weight
    """Per-tensor FP8 (ModelOpt): scale = amax / 448, data = e4m3(W / scale). All-zero tensor: scale 0.
    ``amax``: that of a whole tensor of which ``w`` is a slice of rows (see nvfp4_quantize)."""
    check_float("fp8_quantize", w)
    # weight_scale = amax / 448 (float32)
    scale = _per_tensor("fp8_quantize", w, amax) / np.float32(E4M3_MAX)             # [...]
    data = e4m3_encode(w / _nonzero(scale)[..., None, None].astype(w.dtype))        # [..., out, in] u8
    return FP8Weight(data, scale)


def _decode_fp8(data, scale):  # [..., r, in] u8, [...] f32 -> f32 [..., r, in]
    # W = e4m3(data) * weight_scale
    return get_xp(data).asarray(E4M3_VALUES)[data] * scale.reshape(*data.shape[:-2], 1, 1)


def fp8_dequantize(data, scale):  # [..., out, in] u8, [...] f32 -> float32 [..., out, in]
    check_fp8_dequantize(data, scale)
    return _decode_fp8(data, scale)


def fp8_matmul(x, data, scale, rows_per_tile=128):  # [..., in], [out, in] u8, [] f32 -> [..., out]
    """W8A16: y = x @ dequantize(W)^T, decoded tile by tile; output in x's dtype."""
    _, out, _ = check_fp8_matmul(x, data, scale, rows_per_tile)
    return _tiled_matmul(x, out, lambda r0, r1: _decode_fp8(data[r0:r1], scale), rows_per_tile)
