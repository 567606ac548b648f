"""Launchers of kernels_cuda/quant.cu: NVFP4 dequantisation and the fused W4A16 / W8A16 matmuls.

Reference:  nemo_scratch.ops.quant.nvfp4_dequantize, nemo_scratch.ops.quant.nvfp4_matmul,
            nemo_scratch.ops.quant.fp8_matmul (nemo_scratch.ops.linear.linear sends packed weights here)
Test:       tests/test_backend_quant.py::test_nvfp4_*, ::test_fp8_matmul_*, ::test_matmul_pinned, ::test_linear_*
Tolerance:  dequantize bit-exact; matmuls tests/tolerances.py ("kernel_quant_matmul", float32)
Arguments are checked by ops/contracts.py before the launch. The matmuls compute in float32 (the binder runs
a float64 x, oracle mode, on the reference).
"""

import math

import numpy as np

from .loader import cdiv, device_f32, get_kernel, i64, launch_1d, on_this_device

CU_FILE = "quant.cu"
KERNELS = {
    "dequantize": "nvfp4_dequantize_v1_thread_per_byte",
    # (format, rows a block) -> kernel; quant.cu's matmul_rows<MB> instantiations
    ("nvfp4", 1): "nvfp4_matmul_v2_warp_per_column_m1",
    ("nvfp4", 4): "nvfp4_matmul_v2_warp_per_column_m4",
    ("nvfp4", 16): "nvfp4_matmul_v2_warp_per_column_m16",
    ("fp8", 1): "fp8_matmul_v2_warp_per_column_m1",
    ("fp8", 4): "fp8_matmul_v2_warp_per_column_m4",
    ("fp8", 16): "fp8_matmul_v2_warp_per_column_m16",
}
MM_WARPS = 8  # output columns a matmul block (quant.cu)


def _device_u8(xp, a):
    """A C-contiguous uint8 device array; NVFP4 rows are read 8 bytes at a time, so it must be 8-aligned."""
    a = on_this_device(xp, a, np.uint8)
    assert a.data.ptr % 8 == 0, "packed codes must start on an 8-byte boundary (whole rows of in/2 bytes)"
    return a


def nvfp4_dequantize_cupy(packed, block_scale, global_scale):  # [..., out, in/2] u8, [..., out, in/16] u8, [...]
    """-> float32 [..., out, in], bit-exact with the reference: (e2m1 * e4m3(scale)) * global."""
    *lead, out, half = packed.shape
    inn = 2 * half
    import cupy as xp

    packed, block_scale = _device_u8(xp, packed), _device_u8(xp, block_scale)
    (global_scale,) = device_f32(xp, global_scale)
    w = xp.empty((*lead, out, inn), dtype=np.float32)
    launch_1d(get_kernel(CU_FILE, KERNELS["dequantize"]), packed.size,
              (packed, block_scale, global_scale, w, i64(packed.size), i64(out * inn // 2)))
    return w


def _matmul(xp, fmt, x, n_out, n_in, weight_args):  # [..., in] -> [..., out]
    """y = x W^T with W decoded in registers; M = prod(x.shape[:-1]) rows in blocks of 1, 4 or 16."""
    lead = x.shape[:-1]
    m = math.prod(lead)
    (x,) = device_f32(xp, x)
    y = xp.empty((m, n_out), dtype=np.float32)
    if m and n_out:
        mb = 1 if m == 1 else 4 if m <= 4 else 16
        kernel = get_kernel(CU_FILE, KERNELS[(fmt, mb)])
        kernel((cdiv(m, mb), cdiv(n_out, MM_WARPS)), (MM_WARPS * 32,),
               (x.reshape(m, n_in), *weight_args, y, i64(m), i64(n_out), i64(n_in)))
    return y.reshape(*lead, n_out)


def nvfp4_matmul_cupy(x, packed, block_scale, global_scale):  # [..., in], [out, in/2] u8 -> [..., out]
    """W4A16: y = x @ dequantize(W)^T; the float32 weight never exists in global memory."""
    out, inn = packed.shape[0], 2 * packed.shape[1]
    import cupy as xp

    weight_args = (_device_u8(xp, packed), _device_u8(xp, block_scale), *device_f32(xp, global_scale))
    return _matmul(xp, "nvfp4", x, out, inn, weight_args)


def fp8_matmul_cupy(x, data, scale):  # [..., in], [out, in] u8, [] f32 -> [..., out]
    """W8A16: y = x @ (e4m3(data) * scale)^T, decoded in registers."""
    out, inn = data.shape
    import cupy as xp

    weight_args = (_device_u8(xp, data), *device_f32(xp, scale))
    return _matmul(xp, "fp8", x, out, inn, weight_args)
