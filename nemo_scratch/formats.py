"""NVFP4 next to the formats it competes with, as quantize-then-dequantize round trips (notebook 05).

Each round trip takes a float weight ``[..., out, in]`` (the last two axes are one tensor; a stacked expert
weight gets one per-tensor scale per expert, as ModelOpt does) and returns what a kernel would compute with,
in float32. ``FORMATS`` lists them with their storage cost in bits per weight, scales included (the 4-byte
per-tensor scales are left out: they vanish at real tensor sizes):

- ``nvfp4``: E2M1 codes, an E4M3 scale per 16 weights, an fp32 scale per tensor: 4 + 8/16 = 4.5 bits.
  The package's own ``ops/quant.py::nvfp4_quantize`` and ``nvfp4_dequantize`` (spec 9.3).
- ``int4``: the same layout with symmetric integers -7..7 instead of E2M1 (the grid is uniform instead of
  denser near zero): also 4.5 bits, the same-bits control for NVFP4.
- ``mxfp4``: E2M1 codes with a power-of-two (E8M0) scale per 32 weights (the OCP Microscaling format):
  4 + 8/32 = 4.25 bits.
- ``fp8``: E4M3 with one fp32 scale per tensor (ModelOpt's FP8, spec 9.2): 8 bits.
"""

from __future__ import annotations

import numpy as np

from .ops.common import check_float
from .ops.quant import (E4M3_MAX, E4M3_VALUES, e2m1_decode, e2m1_encode, e4m3_encode, fp8_dequantize,
                        fp8_quantize, nvfp4_dequantize, nvfp4_quantize)

INT4_MAX = 7           # symmetric 4-bit integers -7..7 (the code -8 is left unused, as symmetric schemes do)
E2M1_EMAX = 2          # the exponent of E2M1's largest binade (4 and 6): OCP MX scales by 2^(floor log2 amax - 2)


def _blocks(w, size):  # [..., out, in] -> [..., out, in/size, size]
    return w.reshape(*w.shape[:-1], w.shape[-1] // size, size)


def nvfp4_roundtrip(w):  # [..., out, in] -> float32 [..., out, in]
    """ModelOpt NVFP4: dequantize(quantize(w)) with the package's own ops."""
    q = nvfp4_quantize(w)
    return nvfp4_dequantize(q.packed, q.block_scale, q.global_scale)


def int4_roundtrip(w, block=16):  # [..., out, in] -> float32 [..., out, in]
    """NVFP4's two-level layout with uniform integer codes: g = amax / (7 * 448), s = e4m3(block_amax / (7 g)),
    q = clip(rint(w / (s g)), -7, 7), w^ = q s g."""
    check_float("int4_roundtrip", w)
    w32 = np.asarray(w, dtype=np.float32)
    g = np.abs(w32).max(axis=(-2, -1), keepdims=True) / np.float32(INT4_MAX * E4M3_MAX)        # [..., 1, 1]
    g = np.where(g == 0, np.float32(1), g)
    b = _blocks(w32, block)
    ratio = np.abs(b).max(axis=-1) / (np.float32(INT4_MAX) * g)                                  # [..., out, in/bs]
    s = E4M3_VALUES[e4m3_encode(np.where(ratio == 0, np.float32(1), np.maximum(ratio, np.float32(2.0 ** -9))))]
    step = (s * g)[..., None]                                                                    # [..., out, in/bs, 1]
    q = np.clip(np.rint(b / step), -INT4_MAX, INT4_MAX)
    return (q * step).reshape(w32.shape).astype(np.float32)


def mxfp4_roundtrip(w, block=32):  # [..., out, in] -> float32 [..., out, in]
    """OCP MXFP4: scale = 2^(floor(log2 block_amax) - 2) per 32 weights (E8M0), codes = e2m1(w / scale),
    saturating at 6 (a block's largest weight can lie in [6, 8) scale units)."""
    check_float("mxfp4_roundtrip", w)
    w32 = np.asarray(w, dtype=np.float32)
    b = _blocks(w32, block)
    amax = np.abs(b).max(axis=-1, keepdims=True)                                                 # [..., in/bs, 1]
    _, e = np.frexp(np.where(amax == 0, np.float32(1), amax))                                    # amax = f 2^e
    scale = np.ldexp(np.float32(1), e - 1 - E2M1_EMAX).astype(np.float32)                       # 2^(floor log2 - 2)
    return (e2m1_decode(e2m1_encode(b / scale)) * scale).reshape(w32.shape)


def fp8_roundtrip(w):  # [..., out, in] -> float32 [..., out, in]
    """ModelOpt FP8 per tensor: e4m3(w / (amax / 448)) * amax / 448."""
    q = fp8_quantize(w)
    return fp8_dequantize(q.data, q.scale)


# name -> (round trip, bits per weight with the block scales, what it is)
FORMATS = {
    "nvfp4": (nvfp4_roundtrip, 4 + 8 / 16, "E2M1 + E4M3 scale per 16"),
    "int4": (int4_roundtrip, 4 + 8 / 16, "int -7..7 + E4M3 scale per 16"),
    "mxfp4": (mxfp4_roundtrip, 4 + 8 / 32, "E2M1 + power-of-two scale per 32"),
    "fp8": (fp8_roundtrip, 8.0, "E4M3 + fp32 scale per tensor"),
}
