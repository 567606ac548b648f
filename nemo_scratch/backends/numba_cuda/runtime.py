"""What every Numba kernel module shares: simulator detection, the array module, launch sizes, device helpers.

Importing this module imports numba (and numba.cuda), which never touches a GPU: the driver is only asked
when a kernel is first launched or ``choose_xp`` runs. The backend package (``numba_cuda/__init__.py``)
imports this module lazily, at backend construction, so ``import nemo_scratch.backends`` needs no numba.

Simulator: numba picks the CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1`` is set *before* numba is first
imported; the choice is then fixed for the process. ``simulator_enabled`` reports the mode numba is in.
Under the simulator kernels run on NumPy arrays (xp = numpy); on a GPU on CuPy arrays (xp = cupy), which
numba reads through the CUDA array interface without a copy.

Launch sizes: 1-D kernels use ``threads_per_block()`` threads a block; row-reduction kernels use
``reduce_threads(width)``, a power of two (the tree reduction in ``block_sum`` halves it). Under the
simulator every CUDA thread is a Python thread, so blocks are kept at one warp (32); the kernels are written
for any block size, and the tests cross both 32 and the GPU sizes with non-multiples.

Build flags: every kernel is ``@cuda.jit(fastmath=False)`` (IEEE expf, division and sqrt, no flush to zero).
"""

import math

import numpy as np
from numba import config as numba_config
from numba import cuda, float32

from ...errors import BackendError
from ..gpu_common import SMEM_LIMIT_BYTES, cdiv, state_buffer  # noqa: F401  (re-exported for the kernels)
from ..gpu_common import launch_1d as _launch_1d

# Threads per block on a GPU: 1-D (elementwise) kernels, and the cap of row-reduction kernels.
GPU_THREADS = 256
GPU_REDUCE_THREADS = 128
# Under the simulator (one Python thread per CUDA thread): one warp.
SIM_THREADS = 32
# Shared-memory size of a block reduction; must be >= any block size used with block_sum.
MAX_REDUCE_THREADS = 256

JIT = dict(fastmath=False)  # the build flags of every kernel in this package


def simulator_enabled():
    """True when numba runs kernels on the CUDA simulator (NUMBA_ENABLE_CUDASIM=1 before numba's import)."""
    return bool(numba_config.ENABLE_CUDASIM)


def choose_xp():
    """The array module of the numba backend: numpy under the simulator, cupy on a GPU.

    Raises BackendError when there is neither a GPU nor the simulator, or no cupy on a GPU.
    """
    if simulator_enabled():
        return np
    try:
        gpu = cuda.is_available()
    except Exception as exc:  # a broken driver install must read as "no GPU", not crash
        gpu, why = False, f" ({type(exc).__name__}: {exc})"
    else:
        why = ""
    if not gpu:
        raise BackendError("numba backend: no CUDA GPU is available (numba.cuda.is_available() is False"
                           f"{why}) and the CUDA simulator is off; set NUMBA_ENABLE_CUDASIM=1 before numba "
                           "is imported to run the kernels on the simulator")
    try:
        import cupy
    except ImportError:
        raise BackendError("numba backend needs cupy for device arrays (install the gpu-cuda12 or "
                           "gpu-cuda13 extra: pip install -e .[gpu-cuda12])") from None
    return cupy


def threads_per_block():
    """Block size of the 1-D (one thread per output element) kernels."""
    return SIM_THREADS if simulator_enabled() else GPU_THREADS


def reduce_threads(width):
    """Block size of a kernel that reduces rows of ``width`` elements: the power of two >= width, capped."""
    cap = SIM_THREADS if simulator_enabled() else GPU_REDUCE_THREADS
    threads = 1
    while threads < min(width, cap):
        threads *= 2
    return threads


def kernel_args(args):
    """Kernel arguments, with read-only host (NumPy) arrays marked ``cuda.In``.

    numba copies a host array to the device before a launch and, unless it is marked ``cuda.In``, back
    after it; the simulator does the same with its copies. Copying back into a read-only array (weights
    from a memory-mapped checkpoint) would fail. Device (CuPy) arrays are passed through untouched.
    """
    return [cuda.In(a) if isinstance(a, np.ndarray) and not a.flags.writeable else a for a in args]


def launch_1d(kernel, n, *args):
    """Launch ``kernel`` with one thread per item of ``n`` (the kernel checks ``i < n``); nothing if n == 0."""
    _launch_1d(kernel, n, kernel_args(args), threads_per_block())


def launch_rows(kernel, rows, width, *args):
    """Launch ``kernel`` with one block per row; the block's threads stride over the row's ``width``."""
    if rows > 0:
        kernel[rows, reduce_threads(width)](*kernel_args(args))


def contiguous(xp, *arrays):
    """C-contiguous versions of the arrays (no copy when already contiguous); None stays None."""
    return [None if a is None else xp.ascontiguousarray(a) for a in arrays]


def zeros_if_none(xp, a, shape):
    """``a``, or float32 zeros of ``shape`` standing in for an optional argument (bias, D, initial state)."""
    return xp.zeros(shape, dtype=np.float32) if a is None else a


# ---------------------------------------------------------------------------------------------------------
# Device functions (float32 throughout: every literal is float32 so nothing is promoted to float64)

@cuda.jit(device=True, **JIT)
def silu(v):
    """silu(v) = v * sigmoid(v), through e = exp(-|v|) <= 1 so nothing overflows. nemo_scratch.ops.norm.sigmoid
    computes 1 / (1 + exp(-v)) and lets exp overflow to inf; both reach the same limits, within a few ulp."""
    e = math.exp(-abs(v))
    # sigmoid(v) = 1 / (1 + e) for v >= 0, e / (1 + e) for v < 0
    sig = float32(1.0) / (float32(1.0) + e) if v >= float32(0.0) else e / (float32(1.0) + e)
    return v * sig


@cuda.jit(device=True, **JIT)
def block_sum(v, smem):
    """Sum of ``v`` over the block's threads (blockDim.x a power of two), returned to every thread.

    A shared-memory tree reduction: portable to the simulator, which has no warp shuffles.
    """
    tid = cuda.threadIdx.x
    smem[tid] = v
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            smem[tid] += smem[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = smem[0]
    cuda.syncthreads()  # smem may be reused by the caller's next reduction
    return total
