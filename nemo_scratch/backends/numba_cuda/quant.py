"""NVFP4 / FP8 weights in Numba-CUDA: the one E2M1/E4M3 decode, dequantisation, and the fused matmuls.

Reference:  nemo_scratch.ops.quant.e2m1_decode, nemo_scratch.ops.quant.e4m3_decode,
            nemo_scratch.ops.quant.nvfp4_dequantize, nemo_scratch.ops.quant.nvfp4_matmul,
            nemo_scratch.ops.quant.fp8_matmul (nemo_scratch.ops.linear.linear sends packed weights here)
Test:       tests/test_backend_numba_only.py::test_decode_every_code_bit_exact, ::test_kernels_compile_for_sm90;
            tests/test_backend_quant.py::test_nvfp4_dequantize_*, ::test_nvfp4_matmul_*, ::test_fp8_matmul_*,
            ::test_matmul_pinned, ::test_linear_*; tests/test_backend_core.py::test_mlp_*
Tolerance:  decodes and dequantisation bit-exact (bit patterns compared); matmuls ("kernel_quant_matmul", float32)
Versions:
  e2m1_value / e4m3_value
      THE device decode of the package (every kernel here and the expert GEMMs of moe.py call it): the value is
      rebuilt from the bit fields as an exact integer times a power of two; E4M3 subnormals (exp = 0) and NaN
      (0x7F/0xFF) included. minifloat_decode_v1_thread_per_code runs it over an array of codes (its test).
  nvfp4_dequantize_v1_thread_per_byte
      one thread per packed byte: two E2M1 nibbles * E4M3 block scale * global scale, multiplied in that order
      (e2m1 * scale is exact, so the one rounding is the last multiply, as in the reference). The same idea as
      kernels_cuda/quant.cu's.
  matmul_v1_smem_tile
      out[out_rows[r], n] = act(sum_kk x[x_rows[r], kk] * W_g[n, kk]) for the rows r of group g
      (offsets[g] <= r < offsets[g+1]): TILE x TILE outputs a block, x and W tiles staged in shared memory, W
      decoded element by element on its way in. A plain matmul is one group; moe.py runs every expert as a
      group (grouped GEMM).
  matmul_v2_warp_per_column
      m <= GEMV_ROWS rows of x (decode, batch 1): GEMV_LANES threads (a warp) per output feature stride over
      the input width (coalesced reads of the packed weight), decode in registers, accumulate every row of x,
      then one shared-memory tree over the lanes. Why: at m = 1, v1 keeps TILE-1 of its TILE thread rows idle
      in the inner products; v2 puts every thread on a dot product (kernels_cuda/quant.cu's matmuls are the
      same idea, with warp shuffles). (Reasoned, not yet timed on a GPU.)
  The weight formats are device functions with one signature, fetch(wa, wb, wc, g, n, kk) -> W_g[n, kk]:
  dense (wa float32 [g,out,in]), NVFP4 (packed, block_scale, global_scale), FP8 (data, -, scale); each matmul
  kernel is built once per format (a closure over its fetch function, which numba compiles in as a constant).
Build:      @cuda.jit(fastmath=False); float32 compute (the binder runs a float64 x, oracle mode, on the
            reference).
"""

import math
from functools import lru_cache

import numpy as np
from numba import cuda, float32, int32

from ...ops.common import get_xp
from .runtime import JIT, cdiv, contiguous, launch_1d, simulator_enabled

# Output tile of matmul_v1_smem_tile (TILE x TILE threads a block). Under the simulator every thread is a Python
# thread: 4 x 4 keeps a block cheap; the tests cross both sizes with non-multiples.
TILE = 4 if simulator_enabled() else 16
TILE_PAD = TILE + 1  # the W tile is read down its columns: one float of padding avoids bank conflicts
# matmul_v2_warp_per_column: at most GEMV_ROWS rows of x (one accumulator each in registers); GEMV_OUTS output features
# a block, GEMV_LANES threads (a power of two; a warp on a GPU) on each feature's dot product.
GEMV_ROWS = 4
GEMV_OUTS = 8
GEMV_LANES = 4 if simulator_enabled() else 32
ACT_NONE, ACT_RELU2 = 0, 1


# ---------------------------------------------------------------------------------------------------------
# The decode (spec 9.3), shared by every kernel of the package

@cuda.jit(device=True, **JIT)
def e2m1_value(code):  # uint8 nibble -> float32
    # code = sign<<3 | exp<<1 | man; exp 0: man * 0.5 (0, 0.5); else 2^(exp-1) * (1 + man/2) = (2+man) 2^(exp-2)
    code = int32(code)  # signed: numba would unify unsigned and signed integer branches to float64
    exp = (code >> 1) & 3
    man = code & 1
    if exp == 0:
        val = float32(man) * float32(0.5)
    else:
        val = float32((2 + man) << (exp - 1)) * float32(0.5)
    return -val if code & 8 else val


@cuda.jit(device=True, **JIT)
def e4m3_value(code):  # uint8 FP8 E4M3FN bit pattern -> float32
    code = int32(code)
    exp = (code >> 3) & 15
    man = code & 7
    if exp == 15 and man == 7:
        return float32(math.nan)  # 0x7F / 0xFF: the only NaNs; E4M3FN has no infinities
    if exp == 0:
        # subnormal: 2^-6 * man/8 = man * 2^-9
        val = float32(man) * float32(2.0 ** -9)
    else:
        # normal: 2^(exp-7) * (1 + man/8) = (8 + man) * 2^exp * 2^-10 (an exact integer times a power of two)
        val = float32((8 + man) << exp) * float32(2.0 ** -10)
    return -val if code & 128 else val


@cuda.jit(device=True, **JIT)
def dense_weight(w, unused_b, unused_c, g, n, kk):  # w float32 [g,out,in]
    return w[g, n, kk]


@cuda.jit(device=True, **JIT)
def nvfp4_weight(packed, block_scale, global_scale, g, n, kk):  # [g,out,in/2] u8, [g,out,in/16] u8, [g] f32
    # W[n, kk] = e2m1[nibble kk] * e4m3[block_scale[n, kk/16]] * global_scale  (low nibble = even kk)
    byte = int32(packed[g, n, kk >> 1])
    code = (byte >> 4) if kk & 1 else (byte & 15)
    return (e2m1_value(code) * e4m3_value(block_scale[g, n, kk >> 4])) * global_scale[g]


@cuda.jit(device=True, **JIT)
def fp8_weight(data, unused_b, scale, g, n, kk):  # [g,out,in] u8, -, [g] f32
    # W[n, kk] = e4m3[data[n, kk]] * scale
    return e4m3_value(data[g, n, kk]) * scale[g]


FETCH = {"dense": dense_weight, "nvfp4": nvfp4_weight, "fp8": fp8_weight}


# ---------------------------------------------------------------------------------------------------------
# Kernels

@cuda.jit(**JIT)
def minifloat_decode_v1_thread_per_code(codes, out, e4m3):
    # codes [n] u8 -> out [n] f32: the device decode, one thread a code (tests it over every code)
    i = cuda.grid(1)
    if i < codes.shape[0]:
        out[i] = e4m3_value(codes[i]) if e4m3 else e2m1_value(codes[i])


@cuda.jit(**JIT)
def nvfp4_dequantize_v1_thread_per_byte(packed, block_scale, global_scale, out):
    # [g,out,in/2] u8, [g,out,in/16] u8, [g] f32 -> out [g,out,in] f32; one thread per packed byte
    i = cuda.grid(1)
    half = packed.shape[2]
    if i < packed.shape[0] * packed.shape[1] * half:
        g_n = i // half
        g, n, j = g_n // packed.shape[1], g_n % packed.shape[1], i % half
        out[g, n, 2 * j] = nvfp4_weight(packed, block_scale, global_scale, g, n, 2 * j)
        out[g, n, 2 * j + 1] = nvfp4_weight(packed, block_scale, global_scale, g, n, 2 * j + 1)


@lru_cache(maxsize=None)
def matmul_v1_smem_tile(fmt):
    """The tiled (grouped) matmul for one weight format; see the header."""
    fetch = FETCH[fmt]

    @cuda.jit(**JIT)
    def kernel(x, x_rows, offsets, groups, wa, wb, wc, out, out_rows, act):
        # x [*, in], x_rows/out_rows [r] int64, offsets [g+1] int64, groups [z] int64, W_g [out, in] -> out [*, out]
        xs = cuda.shared.array((TILE, TILE), float32)
        ws = cuda.shared.array((TILE, TILE_PAD), float32)
        g = groups[cuda.blockIdx.z]
        row_end = offsets[g + 1]
        row0 = offsets[g] + cuda.blockIdx.y * TILE
        if row0 >= row_end:
            return  # the whole block leaves together (groups have different sizes)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        n0 = cuda.blockIdx.x * TILE
        n_in, n_out = x.shape[1], out.shape[1]
        r = row0 + ty
        acc = float32(0.0)
        for k0 in range(0, n_in, TILE):
            xs[ty, tx] = x[x_rows[r], k0 + tx] if r < row_end and k0 + tx < n_in else float32(0.0)
            # W tile [n, kk], decoded on its way into shared memory (consecutive tx read consecutive kk)
            ws[ty, tx] = fetch(wa, wb, wc, g, n0 + ty, k0 + tx) if n0 + ty < n_out and k0 + tx < n_in \
                else float32(0.0)
            cuda.syncthreads()
            for kk in range(TILE):
                acc += xs[ty, kk] * ws[tx, kk]
            cuda.syncthreads()
        if r < row_end and n0 + tx < n_out:
            if act == ACT_RELU2:
                # relu2(v) = max(v, 0)^2
                acc = max(acc, float32(0.0))
                acc = acc * acc
            out[out_rows[r], n0 + tx] = acc

    return kernel


@lru_cache(maxsize=None)
def matmul_v2_warp_per_column(fmt):
    """The decode-shaped matmul (m <= GEMV_ROWS) for one weight format; see the header."""
    fetch = FETCH[fmt]

    @cuda.jit(**JIT)
    def kernel(x, wa, wb, wc, out):
        # x [m, in], W_0 [out, in] -> out [m, out]; block = GEMV_OUTS features x GEMV_LANES lanes over in
        part = cuda.shared.array((GEMV_ROWS, GEMV_OUTS, GEMV_LANES), float32)
        acc = cuda.local.array(GEMV_ROWS, float32)
        lane, o = cuda.threadIdx.x, cuda.threadIdx.y
        n = cuda.blockIdx.x * GEMV_OUTS + o
        m = x.shape[0]
        for r in range(GEMV_ROWS):
            acc[r] = float32(0.0)
        if n < out.shape[1]:
            for kk in range(lane, x.shape[1], GEMV_LANES):
                w_nk = fetch(wa, wb, wc, 0, n, kk)
                for r in range(m):
                    acc[r] += x[r, kk] * w_nk
        for r in range(GEMV_ROWS):
            part[r, o, lane] = acc[r]
        cuda.syncthreads()
        # out[r, n] = sum over the lanes' partial dot products (a tree over the lanes, every row at once)
        stride = GEMV_LANES // 2
        while stride > 0:
            if lane < stride:
                for r in range(m):
                    part[r, o, lane] += part[r, o, lane + stride]
            cuda.syncthreads()
            stride //= 2
        if lane == 0 and n < out.shape[1]:
            for r in range(m):
                out[r, n] = part[r, o, 0]

    return kernel


# ---------------------------------------------------------------------------------------------------------
# Launchers

def weight_arrays(xp, w, fmt):
    """(wa, wb, wc) for the fetch of ``fmt``, each with a leading group axis; unused slots get a 1-element dummy.

    w: a float32 array [g, out, in] (dense), (packed, block_scale, global_scale) (nvfp4), (data, scale) (fp8).
    """
    dummy_u8 = xp.zeros((1, 1, 1), dtype=np.uint8)
    if fmt == "nvfp4":
        packed, block_scale, global_scale = w
        return contiguous(xp, packed, block_scale, global_scale.reshape(-1))
    if fmt == "fp8":
        data, scale = w
        return [xp.ascontiguousarray(data), dummy_u8, xp.ascontiguousarray(scale.reshape(-1))]
    return [xp.ascontiguousarray(w), dummy_u8, xp.zeros(1, dtype=np.float32)]


def grouped_matmul(fmt, x, x_rows, offsets, groups, weights, out, out_rows, act, max_rows):
    """out[out_rows[r]] = act(x[x_rows[r]] @ W_g^T) for each g in ``groups``, rows offsets[g] <= r < offsets[g+1].

    ``weights`` = weight_arrays(...) with a leading group axis; ``groups`` lists the groups that have rows
    (the experts that were hit: no block is spent on the others); ``max_rows`` bounds any group's row count
    (blocks past a group's end return at once). All arrays live on the device.
    """
    if groups.shape[0] == 0 or max_rows < 1 or out.shape[1] == 0:
        return out
    grid = (cdiv(int(out.shape[1]), TILE), cdiv(max_rows, TILE), int(groups.shape[0]))
    matmul_v1_smem_tile(fmt)[grid, (TILE, TILE)](x, x_rows, offsets, groups, *weights, out, out_rows, act)
    return out


def _matmul(fmt, x, weights, n_out):  # [..., in] -> [..., n_out]; weights with one group
    """x @ W^T for a weight of format ``fmt``: matmul_v2_warp_per_column for a few rows of x, matmul_v1_smem_tile otherwise."""
    xp = get_xp(x)
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = xp.ascontiguousarray(x.reshape(-1, n_in))
    m = x2.shape[0]
    out = xp.zeros((m, n_out), dtype=np.float32)
    if m == 0 or n_out == 0 or n_in == 0:
        return out.reshape(*lead, n_out)
    if m <= GEMV_ROWS:
        matmul_v2_warp_per_column(fmt)[cdiv(n_out, GEMV_OUTS), (GEMV_LANES, GEMV_OUTS)](x2, *weights, out)
    else:
        rows = xp.arange(m, dtype=np.int64)
        offsets, groups = xp.asarray(np.array([0, m], dtype=np.int64)), xp.zeros(1, dtype=np.int64)
        grouped_matmul(fmt, x2, rows, offsets, groups, weights, out, rows, ACT_NONE, m)
    return out.reshape(*lead, n_out)


def _decode(codes, e4m3):  # uint8 [...] -> float32 [...]
    xp = get_xp(codes)
    flat = xp.ascontiguousarray(codes.reshape(-1))
    out = xp.empty(flat.shape, dtype=np.float32)
    launch_1d(minifloat_decode_v1_thread_per_code, flat.size, flat, out, e4m3)
    return out.reshape(codes.shape)


def e2m1_decode_numba(codes):  # uint8 [...] (0..15) -> float32 [...]
    """Same contract as nemo_scratch.ops.quant.e2m1_decode (bit-exact), through the device decode."""
    return _decode(codes, False)


def e4m3_decode_numba(codes):  # uint8 [...] -> float32 [...]
    """Same contract as nemo_scratch.ops.quant.e4m3_decode (bit-exact), through the device decode."""
    return _decode(codes, True)


def nvfp4_dequantize_numba(packed, block_scale, global_scale):  # [..., out, in/2] u8, [..., out, in/16] u8, [...]
    """Same contract as nemo_scratch.ops.quant.nvfp4_dequantize: float32 [..., out, in], bit-exact."""
    *lead, n_out, half = packed.shape
    n_in = 2 * half
    xp = get_xp(packed, block_scale, global_scale)
    g = int(np.prod(lead, dtype=np.int64))
    wa, wb, wc = weight_arrays(xp, (packed.reshape(g, n_out, half), block_scale.reshape(g, n_out, n_in // 16),
                                    global_scale), "nvfp4")
    out = xp.empty((g, n_out, n_in), dtype=np.float32)
    launch_1d(nvfp4_dequantize_v1_thread_per_byte, g * n_out * half, wa, wb, wc, out)
    return out.reshape(*lead, n_out, n_in)


def nvfp4_matmul_numba(x, packed, block_scale, global_scale, rows_per_tile=128):  # [..., in], [out, in/2] -> [..., out]
    """Same contract as nemo_scratch.ops.quant.nvfp4_matmul (W4A16, decoded inside the matmul).

    rows_per_tile is the reference's decode tile (checked by the contract); the kernels tile by their own sizes.
    """
    n_out, half = packed.shape
    xp = get_xp(x, packed)
    weights = weight_arrays(xp, (packed.reshape(1, n_out, half), block_scale.reshape(1, n_out, half // 8),
                                 global_scale), "nvfp4")
    return _matmul("nvfp4", x, weights, n_out)


def fp8_matmul_numba(x, data, scale, rows_per_tile=128):  # [..., in], [out, in] u8, [] f32 -> [..., out]
    """Same contract as nemo_scratch.ops.quant.fp8_matmul (W8A16, decoded inside the matmul)."""
    n_out, n_in = data.shape
    xp = get_xp(x, data)
    return _matmul("fp8", x, weight_arrays(xp, (data.reshape(1, n_out, n_in), scale), "fp8"), n_out)
