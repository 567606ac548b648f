"""Print the environment a GPU result came from: device, driver, CUDA, and the versions of every package used.

    python tools/gpu_env.py          (tools/gpu_check.sh runs it first and keeps its output as env.txt)

Never fails on a missing package: it prints "absent" for it (a step that needs it will fail and say why).
"""

import importlib
import platform
import sys


def version(name):
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # absent, or broken: both are facts worth recording
        return f"absent ({type(exc).__name__})"
    return getattr(module, "__version__", "present")


def main():
    print(f"python {sys.version.split()[0]} on {platform.platform()}")
    for name in ("numpy", "cupy", "numba", "numba_cuda", "torch", "transformers", "hypothesis", "pytest",
                 "safetensors", "ml_dtypes", "tokenizers"):
        print(f"{name:<13} {version(name)}")
    try:
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        free, total = cupy.cuda.runtime.memGetInfo()
        print(f"GPU {dev.id}: {props['name'].decode()} (sm_{props['major']}{props['minor']}, "
              f"{props['multiProcessorCount']} SMs, {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free), "
              f"{cupy.cuda.runtime.getDeviceCount()} device(s)")
        print(f"CUDA driver {cupy.cuda.runtime.driverGetVersion()}, runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
              f"NVRTC {cupy.cuda.nvrtc.getVersion()}")
        try:
            from cupy.cuda import nccl

            print(f"NCCL {nccl.get_version() if nccl.available else 'not available'}")
        except Exception as exc:
            print(f"NCCL absent ({type(exc).__name__}: {exc})")
    except Exception as exc:
        print(f"GPU: none usable through cupy ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
