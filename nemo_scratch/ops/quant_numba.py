"""Decode-and-multiply GEMVs on the CPU in Numba: y = x @ W^T for a few rows of x, W decoded 128 inputs at a time.

Reference:  nemo_scratch.ops.quant.bf16_matmul, dense_matmul, fp8_matmul, nvfp4_matmul (the NumPy tiles);
            the dispatch that picks this kernel: nemo_scratch.ops.quant_fast.bf16_matmul_fast (and its siblings)
Test:       tests/test_quant_fast.py::test_kernel_matches_the_reference_and_the_float32_kernel,
            ::test_stored_and_float32_models_give_bitwise_the_same_logits, ::test_non_finite_weights_*
Tolerance:  tests/tolerances.py ("quant_matmul", float32) against the reference; bit-exact across formats
            (a packed weight and its decoded float32 values give the same y)
Versions:
  gemv_v1_lane_sums   ONE kernel for the four formats. Each output row r is cut into chunks of LANES inputs;
                      a chunk is decoded into a float32 scratch of LANES values (BF16: bits << 16; FP8: E4M3
                      table * scale; NVFP4: (E2M1 table * E4M3 block scale) * global scale, the reference's order;
                      float32: copied), then every row i of x adds x[i, k] * w[k] into lane k % LANES of its
                      accumulator. The lanes are summed by a fixed halving tree. Why lanes: with fastmath off,
                      a single running sum cannot be vectorised (it would reorder the additions); LANES
                      independent sums are plain elementwise updates, which the loop vectoriser turns into
                      SIMD without changing a single rounding. The decode writes into the scratch and the
                      products read it, so the arithmetic is the same code for every format: a BF16 weight and
                      its float32 upcast give bitwise the same y, and so do "stored" and "float32" models.
                      x is zero-padded to a multiple of LANES and a short last chunk is zero-filled, so every
                      chunk runs the same fixed-width loops (0 * 0 adds +0 to a lane).
  Parallel: output rows are split into tasks of TASK_ROWS rows (prange, Numba's thread pool; one scratch a task).
  Batch 1 (m = 1, the decode step) takes a branch that holds x's one row: the same sums, about 1.5x faster.
  Performance notes (bench/cpu_gemv.py measures): with fastmath off, the vectoriser needs every hot loop in
  one function, over fixed-width (LANES) trips, with the scratch and accumulators allocated there; a helper
  it does not inline (numba's inline="always" does), a variable-width accumulate loop or a loop bound not
  written as a multiple of LANES each made it 4-8x slower. Hence the inline decoders and the padded x.
Build:      @numba.njit(fastmath=False, cache=True), float32 compute; the row-task loop parallel=True.
"""

import numba
import numpy as np
from llvmlite import ir

from .quant import E2M1_VALUES, E4M3_VALUES, NVFP4_BLOCK

LANES = 128       # partial sums per (row of x, output): input k adds into lane k % LANES (a multiple of 16)
TASK_ROWS = 64    # output rows a parallel task
DENSE, BF16, FP8, NVFP4 = 0, 1, 2, 3   # weight formats (the ``fmt`` argument)
E2M1 = E2M1_VALUES                     # globals: Numba freezes them into the compiled code
E4M3 = E4M3_VALUES
SHIFT = np.uint32(16)

JIT = dict(fastmath=False, cache=True)


@numba.njit(inline="always", **JIT)
def _decode_bf16(bits, r, k0, width, chunk):  # u16 [o,n] -> chunk u32 [LANES] (the float32 bit patterns)
    row = bits[r]
    if width == LANES:
        for j in range(LANES):
            # f32 bits = bf16 bits << 16
            chunk[j] = np.uint32(row[k0 + j]) << SHIFT
    else:
        chunk[:] = 0
        for j in range(width):
            chunk[j] = np.uint32(row[k0 + j]) << SHIFT


@numba.njit(inline="always", **JIT)
def _decode_fp8(data, scale, r, k0, width, w):  # u8 [o,n], f32 -> w f32 [LANES]
    row = data[r]
    if width == LANES:
        for j in range(LANES):
            # W = e4m3(data) * weight_scale
            w[j] = E4M3[row[k0 + j]] * scale
    else:
        w[:] = 0
        for j in range(width):
            w[j] = E4M3[row[k0 + j]] * scale


@numba.njit(inline="always", **JIT)
def _decode_nvfp4(packed, block_scale, global_scale, r, k0, width, w):  # u8 [o,n/2], u8 [o,n/16], f32 -> w
    prow, srow = packed[r], block_scale[r]
    if width < LANES:
        w[:] = 0
    for jj in range(width // 2):
        byte = prow[k0 // 2 + jj]
        s = E4M3[srow[(k0 + 2 * jj) // NVFP4_BLOCK]]
        # W[16j + i] = (e2m1[code] * e4m3[block_scale]) * global_scale; low nibble = even element
        w[2 * jj] = (E2M1[byte & 15] * s) * global_scale
        w[2 * jj + 1] = (E2M1[byte >> 4] * s) * global_scale


@numba.njit(inline="always", **JIT)
def _copy_dense(wf, r, k0, width, w):  # f32 [o,n] -> w f32 [LANES]
    row = wf[r]
    if width == LANES:
        for j in range(LANES):
            w[j] = row[k0 + j]
    else:
        w[:] = 0
        for j in range(width):
            w[j] = row[k0 + j]


@numba.extending.intrinsic
def _f32_from_bits(typingctx, bits):  # uint32 -> float32 with the same 32 bits (a reinterpretation: exact)
    if bits != numba.types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return numba.types.float32(numba.types.uint32), codegen


@numba.njit(**JIT)
def _lane_sum(acc, base):  # acc [m*LANES] -> the sum of acc[base : base+LANES], by a fixed halving tree
    half = LANES // 2
    while half >= 1:
        for j in range(half):
            acc[base + j] += acc[base + j + half]
        half //= 2
    return acc[base]


@numba.njit(**JIT)
def _gemv_rows(fmt, xp, n, wf, wh, wb, ws, scale, y, r0, r1):  # y[:, r0:r1] = x @ W[r0:r1]^T
    """xp [m, npad]: x zero-padded to a multiple of LANES, n its real width; the weight is wf (DENSE), wh (BF16),
    wb (FP8 data, NVFP4 packed) with ws (NVFP4 block scales); scale: the FP8 scale or the NVFP4 global scale."""
    m, npad = xp.shape
    chunk = np.empty(LANES, np.uint32)
    w = chunk.view(np.float32)                 # the decoded chunk W[r, k0 : k0+LANES]
    acc = np.empty(m * LANES, np.float32)      # acc[i * LANES + j]: lane j of row i
    x0 = xp[0]
    for r in range(r0, r1):
        acc[:] = 0
        for k0 in range(0, npad - npad % LANES, LANES):    # (npad is a multiple of LANES: said so, it is 5x faster)
            width = min(LANES, n - k0)
            if fmt == BF16:
                _decode_bf16(wh, r, k0, width, chunk)
            elif fmt == FP8:
                _decode_fp8(wb, scale, r, k0, width, w)
            elif fmt == NVFP4:
                _decode_nvfp4(wb, ws, scale, r, k0, width, w)
            else:
                _copy_dense(wf, r, k0, width, w)
            # lane j of row i: acc += x[i, k0 + j] * W[r, k0 + j]
            if m == 1:                         # the batch-1 decode step: the same sums, x0 held
                for j in range(LANES):
                    acc[j] += x0[k0 + j] * w[j]
            else:
                for i in range(m):
                    xi = xp[i]
                    for j in range(LANES):
                        acc[i * LANES + j] += xi[k0 + j] * w[j]
        for i in range(m):
            y[i, r] = _lane_sum(acc, i * LANES)


@numba.njit(**JIT)
def _gemv1_rows(fmt, xp, n, wf, wh, y, r0, r1):  # y[0, r0:r1] = x[0] @ W[r0:r1]^T, W BF16 or DENSE
    """Batch 1 with a BF16 or float32 weight: the decode fused into the products (no scratch round trip), the
    same lanes and sums as _gemv_rows (its zero-filled last chunk adds +0 to lanes that are never -0: the
    same bits as leaving them alone, which this loop does)."""
    x0 = xp[0]
    acc = np.empty(LANES, np.float32)
    full = n - n % LANES
    for r in range(r0, r1):
        acc[:] = 0
        if fmt == BF16:
            row = wh[r]
            for k0 in range(0, full, LANES):
                for j in range(LANES):
                    # acc += x * W, W's float32 bits = bf16 bits << 16
                    acc[j] += x0[k0 + j] * _f32_from_bits(np.uint32(np.uint32(row[k0 + j]) << SHIFT))
        else:
            rowf = wf[r]
            for k0 in range(0, full, LANES):
                for j in range(LANES):
                    acc[j] += x0[k0 + j] * rowf[k0 + j]
        if fmt == BF16:
            for j in range(n - full):
                acc[j] += x0[full + j] * _f32_from_bits(np.uint32(np.uint32(row[full + j]) << SHIFT))
        else:
            for j in range(n - full):
                acc[j] += x0[full + j] * rowf[full + j]
        y[0, r] = _lane_sum(acc, 0)


@numba.njit(parallel=True, **JIT)
def gemv(fmt, xp, n, wf, wh, wb, ws, scale, y):  # y [m, out] = x [m, n] @ W [out, n]^T
    out = y.shape[1]
    batch1 = xp.shape[0] == 1 and (fmt == BF16 or fmt == DENSE)
    for task in numba.prange((out + TASK_ROWS - 1) // TASK_ROWS):
        r0, r1 = task * TASK_ROWS, min(out, (task + 1) * TASK_ROWS)
        if batch1:
            _gemv1_rows(fmt, xp, n, wf, wh, y, r0, r1)
        else:
            _gemv_rows(fmt, xp, n, wf, wh, wb, ws, scale, y, r0, r1)


# ------------------------------------------------------------------------------------------------ tile decodes
# For more rows than a GEMV (prefill), quant_fast runs quant.py's own tiles and BLAS calls, with these decodes
# of a tile of rows in place of the NumPy ones: the same float32 values (each decode is exact), so the same y
# bit for bit; one pass instead of NumPy's two (BF16: 2x sooner), 10-15x sooner for FP8 / NVFP4. Serial: a
# tile's GEMM that follows runs on OpenBLAS's threads, and a thread pool woken per tile costs more than it saves.

@numba.njit(**JIT)
def decode_bf16_rows(bits, r0, out_bits):  # u16 [o,n] -> out_bits u32 [r, n]: W[r0 : r0+r] as float32 bits
    for r in range(out_bits.shape[0]):
        row, o = bits[r0 + r], out_bits[r]
        for k in range(o.shape[0]):
            o[k] = np.uint32(row[k]) << SHIFT


@numba.njit(**JIT)
def decode_fp8_rows(data, scale, r0, out):  # u8 [o,n], f32 -> out f32 [r, n]
    for r in range(out.shape[0]):
        row, o = data[r0 + r], out[r]
        for k in range(o.shape[0]):
            o[k] = E4M3[row[k]] * scale


@numba.njit(**JIT)
def decode_nvfp4_rows(packed, block_scale, global_scale, r0, out):  # u8 [o,n/2], u8 [o,n/16], f32 -> f32 [r, n]
    for r in range(out.shape[0]):
        prow, srow, o = packed[r0 + r], block_scale[r0 + r], out[r]
        for kk in range(prow.shape[0]):
            byte = prow[kk]
            s = E4M3[srow[2 * kk // NVFP4_BLOCK]]
            o[2 * kk] = (E2M1[byte & 15] * s) * global_scale
            o[2 * kk + 1] = (E2M1[byte >> 4] * s) * global_scale
