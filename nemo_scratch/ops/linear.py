"""One ``linear(x, w)`` for every weight format: dense arrays, packed NVFP4, FP8 (decoded inside the op).

A composite op: it is written once, here, over the primitive matmuls, and every backend runs this very
function with its own primitives underneath (``ops=backend``: the GPU backends' fused NVFP4/FP8 kernels).
"""

from .common import get_xp, reference_ops
from .contracts import check_linear
from .formats import FP8Weight, NVFP4Weight


def linear(x, w, ops=None):  # [..., in], w [out, in] -> [..., out]
    """y = x @ W^T. Packed weights are decoded tile by tile inside the matmul (W4A16 / W8A16).

    ``ops`` supplies the primitives ``nvfp4_matmul`` and ``fp8_matmul``: a backend, or None for the reference.
    """
    check_linear(x, w)
    ops = ops or reference_ops()
    if isinstance(w, NVFP4Weight):
        return ops.nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale)
    if isinstance(w, FP8Weight):
        return ops.fp8_matmul(x, w.data, w.scale)
    # y = x W^T  (a dense weight: one BLAS matmul, cuBLAS on CuPy arrays)
    return get_xp(x, w).matmul(x, w.T)
