"""Compile kernels_cuda/*.cu with CuPy (cupy.RawModule, NVRTC) and hand out kernels by name.

The .cu sources live in the repository's top-level ``kernels_cuda/`` folder, found relative to the installed
package (``nemo_scratch/../kernels_cuda``: a checkout or an editable install), never relative to the
current directory. Each file is compiled once per process (``get_module`` is cached; CuPy also caches the
binary on disk under ~/.cupy/kernel_cache). Compile options: C++17 and the include path of common.cuh;
no fast-math (NVRTC's default is IEEE-exact expf, division and sqrt, without flush to zero).

Importing this module imports neither cupy nor anything that touches a GPU.
"""

import functools
from pathlib import Path

import numpy as np

import nemo_scratch

from ...errors import BackendError, DeviceError
from ..gpu_common import SMEM_LIMIT_BYTES, cdiv, state_buffer  # noqa: F401  (re-exported for the launchers)
from ..gpu_common import launch_1d as _launch_1d

KERNELS_DIR = Path(nemo_scratch.__file__).resolve().parent.parent / "kernels_cuda"
COMPILE_OPTIONS = ("-std=c++17", f"-I{KERNELS_DIR}")

THREADS = 256          # threads a block of every kernel (a multiple of the warp: the reductions need it)


def kernel_source(filename):
    """The text of ``kernels_cuda/<filename>``; BackendError if the sources are not next to the package."""
    path = KERNELS_DIR / filename
    if not path.is_file():
        raise BackendError(f"cupy backend: kernel source {path} not found; the CUDA C sources ship with a "
                           "checkout of the repository (install it with `pip install -e .`)")
    return path.read_text()


@functools.lru_cache(maxsize=None)
def get_module(filename):
    """``cupy.RawModule`` of one .cu file (compiled by NVRTC at the first kernel launch)."""
    import cupy

    return cupy.RawModule(code=kernel_source(filename), options=COMPILE_OPTIONS)


def get_kernel(filename, name):
    """The ``extern "C"`` kernel ``name`` of ``kernels_cuda/<filename>``."""
    return get_module(filename).get_function(name)


def launch_1d(kernel, n, args):
    """One thread per item of ``n`` in blocks of THREADS (the kernel checks its index against n)."""
    _launch_1d(kernel, n, args, THREADS)


def i32(v):
    """A kernel ``int`` argument. CuPy passes a Python int as a 64-bit long long, so wrap every int."""
    return np.int32(v)


def i64(v):
    """A kernel ``long long`` argument."""
    return np.int64(v)


def f32(v):
    """A kernel ``float`` argument (a Python float would be passed as a double)."""
    return np.float32(v)


# A null pointer argument. CuPy turns a ``None`` kernel argument into 0xffffffff, not NULL (cupy issue
# #9046), so an optional array that is absent is passed as a 64-bit zero.
NULL = np.uint64(0)


def on_this_device(xp, a, dtype):
    """``a`` as a C-contiguous device array of ``dtype`` (no copy when already so). An array that lives on
    another device than the current one is refused, naming both: a launch never copies an operand between
    devices behind the caller's back (CuPy would, through peer access); only the pipeline's hops move data."""
    if isinstance(a, xp.ndarray):
        here, there = xp.cuda.runtime.getDevice(), a.device.id
        if there != here:
            raise DeviceError(f"a {a.dtype} {list(a.shape)} operand is on device {there} but the kernel launches "
                              f"on device {here}: move it there first (a weight placed on the wrong device)")
    return xp.ascontiguousarray(xp.asarray(a, dtype=dtype))


def device_f32(xp, *arrays):
    """C-contiguous float32 device arrays (no copy when already so); None becomes NULL (a null pointer)."""
    return [NULL if a is None else on_this_device(xp, a, np.float32) for a in arrays]
