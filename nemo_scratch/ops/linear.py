"""One ``linear(x, w)`` for every weight format: dense arrays, packed NVFP4, FP8 (decoded inside the op)."""

from .common import check_float, get_xp
from .quant import FP8Weight, NVFP4Weight


def linear(x, w):  # [..., in], w [out, in] -> [..., out]
    """y = x @ W^T. Packed weights are decoded tile by tile inside the matmul (W4A16 / W8A16)."""
    if isinstance(w, NVFP4Weight):
        from .quant import nvfp4_matmul

        return nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale)
    if isinstance(w, FP8Weight):
        from .quant import fp8_matmul

        return fp8_matmul(x, w.data, w.scale)
    check_float("linear", x, w)
    xp = get_xp(x, w)
    return xp.matmul(x, w.T)
