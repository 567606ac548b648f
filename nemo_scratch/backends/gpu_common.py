"""What the launchers of both GPU backends share: the shared-memory limit, grid arithmetic, the 1-D launch,
and the buffer a decode step writes its new state into.

Imports neither numba nor cupy: a numba kernel is launched as ``kernel[grid, block](*args)``, a CuPy
RawKernel as ``kernel(grid, block, args)``, and ``launch_1d`` tells the two apart by that interface.
"""

import numpy as np

from ..errors import ShapeError
from ..ops.formats import BF16Weight, ExpertBank, map_arrays, stack_bank
from ..ops.quant import bf16_decode

# Dynamic shared memory a block may use without the opt-in attribute (48 KiB on every CUDA GPU since sm_20;
# sm_90 allows up to 227 KiB after cudaFuncSetAttribute / RawKernel.max_dynamic_shared_size_bytes).
SMEM_LIMIT_BYTES = 48 * 1024


class Unsupported(Exception):
    """Raised by a kernel entry point, before any launch, for an input the reference must run instead (the
    binder, backends/numpy_backend.py::guarded, then calls the reference)."""


def cdiv(a, b):
    """ceil(a / b) for non-negative integers."""
    return -(-a // b)


def launch_1d(kernel, n, args, threads):
    """One thread per item of ``n`` (the kernel checks its index against n) in blocks of ``threads``;
    nothing when n == 0 (a grid needs at least one block)."""
    if n <= 0:
        return
    blocks = cdiv(n, threads)
    if hasattr(kernel, "__getitem__"):       # numba: kernel[grid, block](*args)
        kernel[blocks, threads](*args)
    else:                                    # cupy RawKernel: kernel(grid, block, args)
        kernel((blocks,), (threads,), tuple(args))


def state_buffer(xp, out_state, shape, op):
    """The float32 buffer a decode-step kernel writes its new state into: ``out_state`` or a new array.

    ``out_state`` was checked by the op's contract (shape, dtype, C-contiguous). The step kernels read each
    state element before they write it, in the same thread, so ``out_state`` may be the input state itself:
    the in-place update of a decode loop.
    """
    if out_state is None:
        return xp.empty(shape, dtype=np.float32)
    if not isinstance(out_state, xp.ndarray):
        raise ShapeError(f"{op}: out_state is a {type(out_state).__module__}.{type(out_state).__name__}, "
                         f"expected a {xp.__name__} array (the kernel writes it in place)")
    return out_state


def upload(a, to_device, xp):
    """A host weight as a GPU backend holds it: arrays moved by ``to_device``, packed NVFP4/FP8 fields kept
    packed, BF16 decoded to float32 (the kernels read float32 or packed codes), and an expert bank stacked
    on the device into one [e, out, in] weight (what the grouped expert kernels read)."""
    if isinstance(a, ExpertBank):
        return stack_bank(ExpertBank([upload(w, to_device, xp) for w in a.experts]), xp)
    if isinstance(a, BF16Weight):
        return to_device(bf16_decode(np.asarray(a.bits)))
    return map_arrays(a, to_device)
