"""Launchers of kernels_cuda/norm.cu: RMSNorm and the Mamba-2 gated group RMSNorm.

Reference:  nemo_scratch.ops.norm.rms_norm, nemo_scratch.ops.norm.gated_rms_norm
Test:       tests/test_backend_mamba.py::test_rms_norm_*, ::test_gated_rms_norm_*
Tolerance:  tests/tolerances.py ("kernel_rms_norm", "kernel_gated_rms_norm", float32)
One block per normalised row (rms_norm) or per (row, group) (gated_rms_norm); the leading axes are flattened.
Arguments are checked by ops/contracts.py before the launch (float32 only).
"""

import math

from .loader import THREADS, cdiv, device_f32, f32, get_kernel, i32, i64

CU_FILE = "norm.cu"
KERNELS = {
    "rms_norm": "rms_norm_v1_block_per_group",
    "gated_rms_norm": "gated_rms_norm_v1_block_per_group",
}


def _row_threads(width):
    """Threads a block for rows of ``width``: whole warps, at most THREADS."""
    return min(THREADS, 32 * max(1, cdiv(width, 32)))


def rms_norm_cupy(x, weight, eps):  # [..., d], [d] -> [..., d]
    d = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    import cupy as xp

    x, weight = device_f32(xp, x, weight)
    out = xp.empty(x.shape, dtype=xp.float32)
    if rows > 0 and d > 0:
        get_kernel(CU_FILE, KERNELS["rms_norm"])((rows,), (_row_threads(d),),
                                                 (x, weight, out, i64(rows), i32(d), f32(eps)))
    return out


def gated_rms_norm_cupy(y, z, weight, n_groups, eps):  # [..., i], [..., i], [i] -> [..., i]
    i = y.shape[-1]
    rows = math.prod(y.shape[:-1])
    group_size = i // n_groups
    import cupy as xp

    y, z, weight = device_f32(xp, y, z, weight)
    out = xp.empty(y.shape, dtype=xp.float32)
    if rows > 0 and i > 0:
        get_kernel(CU_FILE, KERNELS["gated_rms_norm"])(
            (rows * n_groups,), (_row_threads(group_size),),
            (y, z, weight, out, i64(rows), i32(n_groups), i32(group_size), f32(eps)))
    return out
