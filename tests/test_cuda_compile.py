"""Every kernels_cuda/*.cu compiles for sm_90, warning-free, without a GPU; launchers name real kernels.

- nvcc (``nvcc -arch=sm_90 -std=c++17 --Werror all-warnings -c``) and NVRTC (the compiler CuPy runs, with the
  cupy loader's own options, from the nvidia-cuda-nvrtc wheel of the dev extra) each compile every file.
  NVRTC has no C/C++ standard headers, so a .cu that only nvcc accepts is caught here, not on a GPU.
  Each compiler's test runs wherever that compiler is installed; where one is missing its test skips only
  if the other compiler is there (at least one always runs), and fails otherwise.
- Each launcher module of nemo_scratch/backends/cupy declares ``CU_FILE`` and ``KERNELS``; every kernel name
  it uses exists as an ``extern "C" __global__`` function of that file, so a rename cannot break the loader
  silently.
The .cu headers (reference symbol, test, tolerance key, versions, build flags) are checked with the Numba and
CuPy launcher headers in tests/test_kernel_headers.py.
"""

import ctypes
import ctypes.util
import glob
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import nemo_scratch.backends.cupy as cupy_pkg
from nemo_scratch.backends.cupy.loader import COMPILE_OPTIONS, KERNELS_DIR

CU_FILES = sorted(KERNELS_DIR.glob("*.cu"))
ARCH = "sm_90"


def find_nvrtc():
    """Path of libnvrtc: the nvidia-cuda-nvrtc wheel (cu13 or cu12 layout), else the system's; or None."""
    try:
        import nvidia

        for base in nvidia.__path__:
            hits = sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
            hits = [h for h in hits if "builtins" not in h]
            if hits:
                return hits[0]
    except ImportError:
        pass
    return ctypes.util.find_library("nvrtc")


NVCC = shutil.which("nvcc")
NVRTC = find_nvrtc()


def extern_c_kernels(source):
    """Names of the ``extern "C" __global__`` functions of a .cu source (comments ignored)."""
    code = re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.S)
    return set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', code))


def test_there_are_kernels_to_compile():
    assert {"conv.cu", "ssd.cu", "norm.cu"} <= {p.name for p in CU_FILES}
    assert (KERNELS_DIR / "common.cuh").is_file()


# ---------------------------------------------------------------------------------------------------------
# Compilers

@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm90_without_warnings(cu):
    if NVCC is None:
        if NVRTC is None:
            pytest.fail("neither nvcc nor NVRTC is installed: install the CUDA toolkit (nvcc) or the dev extra "
                        "(pip install -e .[dev], which brings nvidia-cuda-nvrtc)")
        pytest.skip(f"nvcc not on PATH; test_nvrtc_compiles_like_cupy compiles {cu.name} with NVRTC ({NVRTC})")
    cmd = [NVCC, f"-arch={ARCH}", "-std=c++17", "--Werror", "all-warnings", "-c", "-o", os.devnull, str(cu),
           "-I", str(KERNELS_DIR)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"nvcc failed on {cu.name}:\n{log}"
    assert "warning" not in log.lower(), f"nvcc warned on {cu.name}:\n{log}"


def nvrtc_compile(lib, source, name, options):
    """(result code, log) of compiling ``source`` with NVRTC."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram returned {rc}"
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvrtc_compiles_like_cupy(cu):
    """The source text and options cupy.RawModule gets (loader.COMPILE_OPTIONS), plus the target."""
    if NVRTC is None:
        if NVCC is None:
            pytest.fail("neither nvcc nor NVRTC is installed: install the dev extra (pip install -e .[dev], "
                        "which brings nvidia-cuda-nvrtc) or the CUDA toolkit")
        pytest.skip(f"NVRTC not installed (the dev extra brings nvidia-cuda-nvrtc); "
                    f"test_nvcc_compiles_for_sm90_without_warnings compiles {cu.name} with {NVCC}")
    lib = ctypes.CDLL(NVRTC)
    rc, log = nvrtc_compile(lib, cu.read_text(), cu.name, [*COMPILE_OPTIONS, f"-arch={ARCH}"])
    assert rc == 0, f"NVRTC failed on {cu.name} (result {rc}):\n{log}"
    assert "warning" not in log.lower(), f"NVRTC warned on {cu.name}:\n{log}"


def test_nvrtc_check_catches_a_broken_kernel():
    """The compile check can fail: a standard header (which NVRTC lacks) and a type error are reported."""
    if NVRTC is None:
        pytest.skip("NVRTC not installed (the dev extra brings nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(NVRTC)
    opts = [*COMPILE_OPTIONS, f"-arch={ARCH}"]
    ok = '#include "common.cuh"\nextern "C" __global__ void k(float* y) { y[0] = silu_f32(1.0f); }'
    rc, log = nvrtc_compile(lib, ok, "ok.cu", opts)
    assert rc == 0, log
    rc, log = nvrtc_compile(lib, '#include <vector>\nextern "C" __global__ void k(float* y) { y[0] = 1.0f; }',
                            "std.cu", opts)
    assert rc != 0 and "vector" in log
    rc, log = nvrtc_compile(lib, 'extern "C" __global__ void k(float* y) { y[0] = undefined_name; }', "bad.cu", opts)
    assert rc != 0 and "undefined_name" in log


# ---------------------------------------------------------------------------------------------------------
# Launchers <-> kernels

def launcher_modules():
    """The modules of nemo_scratch/backends/cupy that launch kernels (they define CU_FILE)."""
    mods = [importlib.import_module(f"{cupy_pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(cupy_pkg.__path__)]
    return [m for m in mods if hasattr(m, "CU_FILE")]


def test_mamba_launchers_are_found():
    names = {m.__name__.rsplit(".", 1)[1] for m in launcher_modules()}
    assert {"conv", "ssd", "norm"} <= names


@pytest.mark.parametrize("module", launcher_modules(), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_launcher_kernel_names_exist_in_the_cu_source(module):
    cu = KERNELS_DIR / module.CU_FILE
    assert cu.is_file(), f"{module.__name__}.CU_FILE = {module.CU_FILE!r}: no such file in {KERNELS_DIR}"
    defined = extern_c_kernels(cu.read_text())
    used = set(module.KERNELS.values())
    missing = used - defined
    assert not missing, f"{module.__name__} launches {sorted(missing)}, not extern \"C\" kernels of {cu.name}"
    # no kernel name hard-coded outside the KERNELS table
    literals = set(re.findall(r"""["'](\w+_v\d+_\w+)["']""", Path(module.__file__).read_text()))
    assert literals <= used, f"{module.__name__} names kernels outside KERNELS: {sorted(literals - used)}"


def test_registered_backend_ops_point_at_launchers():
    for op, (module, entry) in cupy_pkg.KERNELS.items():
        mod = importlib.import_module(f"{cupy_pkg.__name__}.{module}")
        assert callable(getattr(mod, entry, None)), f"KERNELS[{op!r}]: {module}.{entry} does not exist"
