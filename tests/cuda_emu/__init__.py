"""A CPU emulator of the CUDA C subset of kernels_cuda/*.cu and of the CuPy subset of nemo_scratch.backends.cupy.

It lets CI, which has no GPU, run the cupy backend's real kernels and launchers (the cupy-emu run of tests/test_backend_*.py):

    with cuda_emu.installed():                  # sys.modules["cupy"] = the emulator, backend caches cleared
                                                # (installed(devices=3): three emulated devices)
        be = nemo_scratch.backends.get_backend("cupy")
        y = be.to_numpy(be.rms_norm(be.asarray(x), be.asarray(w), 1e-5))

emu.h       CUDA on the host: one fiber per CUDA thread, barriers and warp shuffles, checked (see its header)
compiler.py .cu text -> C++ -> a g++-built shared library, cached on disk by hash
arrays.py   device arrays (guarded buffers), several devices and the current one, a memory pool per device
device.py   the fake ``cupy`` module: RawModule, the checked kernel launch, cuda.Device, cuda.runtime

Limits (README.md): correctness only, no timing; races beyond barriers are not detected; full-warp masks only.
"""

import contextlib
import sys

from .compiler import EmulatorError, build_many, gxx
from .device import make_module

__all__ = ["EmulatorError", "gxx", "installed", "precompile_kernels"]


def precompile_kernels():
    """Build every kernels_cuda/*.cu with the cupy loader's own options, in parallel (a no-op when cached)."""
    from nemo_scratch.backends.cupy.loader import COMPILE_OPTIONS, KERNELS_DIR, kernel_source

    files = sorted(p.name for p in KERNELS_DIR.glob("*.cu"))
    build_many([(kernel_source(name), COMPILE_OPTIONS) for name in files])
    return files


@contextlib.contextmanager
def installed(devices=1):
    """The emulator as ``cupy`` inside the block only, with ``devices`` emulated devices: the previous
    sys.modules["cupy"] (if any) comes back afterwards, and the cupy backend (nemo_scratch.backends._CACHE) and
    the loader's compiled modules are forgotten on entry and on exit, so nothing emulated leaks into code that
    runs later."""
    from nemo_scratch import backends
    from nemo_scratch.backends.cupy import loader

    def forget():
        backends._CACHE.pop("cupy", None)
        loader.get_module.cache_clear()

    previous = sys.modules.get("cupy")
    fake = make_module(devices)
    forget()
    sys.modules["cupy"] = fake
    try:
        yield fake
    finally:
        forget()
        if previous is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = previous
