"""Decode-and-multiply GEMVs on the CPU in Numba: y = x @ W^T for a few rows of x, W decoded 128 inputs at a time.

Reference:  nemo_scratch.ops.quant.bf16_matmul, .dense_matmul, .fp8_matmul, .nvfp4_matmul (the NumPy tiles);
            the dispatch that picks this kernel is nemo_scratch.ops.quant_fast
Test:       tests/test_quant_fast.py (kernel vs reference on every format, m = 1..9, shapes crossing the lane
            width, the row tasks and the 16-input NVFP4 block; every format bitwise equal to the float32 kernel
            on the decoded weights; stored vs float32 model logits bitwise equal)
Tolerance:  ("quant_matmul", float32) against the reference; bit-exact across formats (same values, same sums)
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
  Performance notes (bench/cpu_gemv.py measures): the hot loops must sit in one function with the scratch
  allocated there (a called helper, or a loop bound not written as a multiple of LANES, made them 4-8x slower:
  the vectoriser then cannot prove the scratch and accumulators apart from x), hence the inline decoders.
Build:      @numba.njit(fastmath=False, cache=True), float32 compute; the row-task loop parallel=True.
"""

import numba
import numpy as np

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
    """xp [m, npad]: x zero-padded to a multiple of LANES, n its real width; the weight is wf (DENSE), wh (BF16), wb (FP8 data, NVFP4 packed) with ws (NVFP4 block
    scales); scale: the FP8 scale or the NVFP4 global scale."""
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


@numba.njit(parallel=True, **JIT)
def gemv(fmt, xp, n, wf, wh, wb, ws, scale, y):  # y [m, out] = x [m, n] @ W [out, n]^T
    out = y.shape[1]
    for task in numba.prange((out + TASK_ROWS - 1) // TASK_ROWS):
        _gemv_rows(fmt, xp, n, wf, wh, wb, ws, scale, y, task * TASK_ROWS, min(out, (task + 1) * TASK_ROWS))
