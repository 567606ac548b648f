"""The fast twins of quant.py's matmuls: a few rows of x run a fused Numba CPU kernel, more rows Numba-decoded tiles.

Same contract, same numbers, as ``quant.bf16_matmul``, ``dense_matmul``, ``fp8_matmul`` and ``nvfp4_matmul``
(tests/test_quant_fast.py holds them to each other); what the numpy backend and the reference namespace run
(ops/reference.py). The rule, the same for every format:

    kernel  if  numba imports, x is a float32 NumPy array with 1 <= m <= GEMV_ROWS rows (m = x.size / in),
                every weight array is a C-contiguous NumPy array (memory-mapped, in memory, or a virtual
                device's), and the environment variable NEMO_SCRATCH_CPU_KERNELS is not "0";
    tiles   for more rows under the same conditions (x and the weights plain arrays): quant.py's own tiles and
            BLAS calls, each tile decoded by a serial Numba loop instead of NumPy (the same exact values: bitwise
            the reference's y); a float32 weight has nothing to decode and runs the reference;
    else    the readable reference (NumPy tiles; float64 oracle mode always).

Why: at batch 1 a decode step is a chain of GEMVs over big weights, and the NumPy tiles write a float32 tile
and read it back for one BLAS GEMV; the kernel (ops/quant_numba.py) decodes as it multiplies and reads each
stored byte once. BF16 and float32 weights go through the one kernel under the one rule, so "stored" and
"float32" models stay bitwise identical. More rows than GEMV_ROWS (prefill) is a GEMM, where BLAS on a decoded
tile wins (bench/cpu_gemv.py). ``rows_per_tile`` shapes the tiles only: the kernel has no tile temporary.
numba is optional (the ``cpu`` extra: ``pip install nemo_scratch[cpu]``): without it every call is the reference.
"""

import functools
import os

import numpy as np

from . import quant
from .common import get_xp
from .contracts import check_bf16_matmul, check_dense_matmul, check_fp8_matmul, check_nvfp4_matmul

GEMV_ROWS = 4       # rows of x up to which the kernel runs (bench/cpu_gemv.py: BF16 tiles win from m = 8)
ENABLED = os.environ.get("NEMO_SCRATCH_CPU_KERNELS", "1") != "0"
_KERNEL = []        # [the quant_numba module, or None when numba does not import]: imported at first use


def kernel_module():
    """ops/quant_numba.py, or None without numba. Imported once, at the first small matmul (never at import:
    the reference needs NumPy alone)."""
    if not _KERNEL:
        # Numba's OpenMP workers sleep between launches instead of spinning (libgomp reads this when Numba first
        # loads it, at the first kernel): spinning, they take the cores from the OpenBLAS threads that run
        # between our kernels: 5-10x slower on 2 cores (bench/cpu_gemv.py --omp-wait-policy ACTIVE). A process-wide
        # setting, so only a default: a value the user set is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            from . import quant_numba
        except ImportError:
            quant_numba = None
        _KERNEL.append(quant_numba)
    return _KERNEL[0]


def _host(a):  # a NumPy array (a virtual device's array too) -> a read-only plain ndarray view of it
    view = np.asarray(a).view()
    view.flags.writeable = False   # one Numba signature for memory-mapped (read-only) and in-memory weights
    return view


@functools.cache
def _unused(dtype):  # a stand-in for the weight arrays a format does not use (one per dtype, read-only)
    return _host(np.zeros((1, 1), dtype))


def _gemv(x, out, inn, fmt, wf=None, wh=None, wb=None, ws=None, scale=np.float32(0)):  # -> [..., out] or None
    """The kernel's y = x @ W^T when the rule admits this call, else None (the caller runs the reference).
    ``fmt`` names the weight format, a constant of ops/quant_numba.py ("DENSE", "BF16", "FP8", "NVFP4")."""
    rows = x.size // inn if inn else 0
    arrays = [a for a in (x, wf, wh, wb, ws, scale) if a is not None]
    if not (ENABLED and 1 <= rows <= GEMV_ROWS and x.dtype == np.float32
            and all(isinstance(a, (np.ndarray, np.generic)) for a in arrays)
            and all(a.flags.c_contiguous for a in (wf, wh, wb, ws) if a is not None)):
        return None
    kernel = kernel_module()
    if kernel is None:
        return None
    for a in arrays[1:]:
        if type(a) is not np.ndarray or type(x) is not np.ndarray:
            # an ndarray subclass (a virtual device's array): a one-element product of x and each weight array
            # raises, as the reference's matmul would, when they sit on two devices
            np.multiply(x[(slice(0, 1),) * x.ndim], a[(slice(0, 1),) * a.ndim])
    # x zero-padded to a multiple of the kernel's lane width (a zero-filled weight tail: 0 * 0 adds +0)
    xp = np.zeros((rows, -(-inn // kernel.LANES) * kernel.LANES), dtype=np.float32)
    xp[:, :inn] = np.asarray(x).reshape(rows, inn)
    y = get_xp(x).empty((*x.shape[:-1], out), dtype=np.float32)   # on x's (virtual) device, like the tiles
    kernel.gemv(getattr(kernel, fmt), xp, inn, _unused(np.float32) if wf is None else _host(wf),
                _unused(np.uint16) if wh is None else _host(wh), _unused(np.uint8) if wb is None else _host(wb),
                _unused(np.uint8) if ws is None else _host(ws), np.float32(np.asarray(scale)),
                np.asarray(y).reshape(rows, out))
    return y


def _tiles(x, weights, out, inn, decode, rows_per_tile):  # [..., in] -> [..., out] or None
    """quant.py's tiles and BLAS calls with a Numba decode of each tile (the same values): for more rows than a
    GEMV, float32, when the kernel module imports and x and the weight arrays are plain C-contiguous arrays."""
    plain = all(type(a) in (np.ndarray, np.memmap) and a.flags.c_contiguous for a in weights)
    kernel = kernel_module() if ENABLED and plain and x.dtype == np.float32 and type(x) is np.ndarray else None
    if kernel is None:
        return None
    return quant._tiled_matmul(x, out, lambda r0, r1: decode(kernel, r0, r1), rows_per_tile)


def bf16_matmul_fast(x, bits, rows_per_tile=None):  # [..., in], u16 [out, in] -> [..., out]
    """quant.bf16_matmul; the fused kernel for a few float32 rows of x, Numba-decoded tiles for more."""
    _, out, inn = check_bf16_matmul(x, bits, rows_per_tile)

    def decode(kernel, r0, r1):
        tile = np.empty((r1 - r0, inn), dtype=np.uint32)
        kernel.decode_bf16_rows(_host(bits), r0, tile)
        return tile.view(np.float32)

    y = _gemv(x, out, inn, "BF16", wh=bits)
    if y is None:
        y = _tiles(x, (bits,), out, inn, decode, rows_per_tile or quant.tile_rows(x, out, inn))
    return quant.bf16_matmul(x, bits, rows_per_tile) if y is None else y


def dense_matmul_fast(x, w, rows_per_tile=None):  # [..., in], [out, in] -> [..., out]
    """quant.dense_matmul; the same kernel as bf16_matmul_fast under the same rule (bitwise the same y)."""
    _, out, inn = check_dense_matmul(x, w, rows_per_tile)
    y = _gemv(x, out, inn, "DENSE", wf=w) if w.dtype == np.float32 else None
    return quant.dense_matmul(x, w, rows_per_tile) if y is None else y


def fp8_matmul_fast(x, data, scale, rows_per_tile=128):  # [..., in], u8 [out, in], f32 [] -> [..., out]
    """quant.fp8_matmul; the fused kernel for a few float32 rows of x, Numba-decoded tiles for more."""
    _, out, inn = check_fp8_matmul(x, data, scale, rows_per_tile)

    def decode(kernel, r0, r1):
        tile = np.empty((r1 - r0, inn), dtype=np.float32)
        kernel.decode_fp8_rows(_host(data), np.float32(scale), r0, tile)
        return tile

    y = _gemv(x, out, inn, "FP8", wb=data, scale=scale)
    if y is None:
        y = _tiles(x, (data, np.asarray(scale)), out, inn, decode, rows_per_tile)
    return quant.fp8_matmul(x, data, scale, rows_per_tile) if y is None else y


def nvfp4_matmul_fast(x, packed, block_scale, global_scale, rows_per_tile=128):  # [..., in], u8 [out, in/2] ...
    """quant.nvfp4_matmul; the fused kernel for a few float32 rows of x, Numba-decoded tiles for more."""
    _, out, inn = check_nvfp4_matmul(x, packed, block_scale, global_scale, rows_per_tile)

    def decode(kernel, r0, r1):
        tile = np.empty((r1 - r0, inn), dtype=np.float32)
        kernel.decode_nvfp4_rows(_host(packed), _host(block_scale), np.float32(global_scale), r0, tile)
        return tile

    y = _gemv(x, out, inn, "NVFP4", wb=packed, ws=block_scale, scale=global_scale)
    if y is None:
        y = _tiles(x, (packed, block_scale, np.asarray(global_scale)), out, inn, decode, rows_per_tile)
    return quant.nvfp4_matmul(x, packed, block_scale, global_scale, rows_per_tile) if y is None else y
