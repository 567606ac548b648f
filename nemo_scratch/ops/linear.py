"""One ``linear(x, w)`` for every weight format: dense arrays, BF16, packed NVFP4, FP8 (decoded inside the op).

A composite op: it is written once, here, over the primitive matmuls, and every backend runs this very
function with its own primitives underneath (``ops=backend``: the GPU backends' fused NVFP4/FP8 kernels).
"""

from .common import reference_ops
from .contracts import check_linear
from .formats import BF16Weight, FP8Weight, NVFP4Weight


def linear(x, w, ops=None):  # [..., in], w [out, in] -> [..., out]
    """y = x @ W^T. Stored weights are decoded tile by tile inside the matmul (W4A16 / W8A16 / BF16).

    ``ops`` supplies the primitive matmuls (nvfp4_matmul, fp8_matmul, bf16_matmul, dense_matmul): a backend,
    or None for the reference.
    """
    check_linear(x, w)
    ops = ops or reference_ops()
    if isinstance(w, NVFP4Weight):
        return ops.nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale)
    if isinstance(w, FP8Weight):
        return ops.fp8_matmul(x, w.data, w.scale)
    if isinstance(w, BF16Weight):
        return ops.bf16_matmul(x, w.bits)
    # y = x W^T  (a float weight: BLAS a tile at a time on NumPy, one cuBLAS call on CuPy arrays)
    return ops.dense_matmul(x, w)
