"""The CUDA emulator's own promises (README.md), each checked: it runs barriers, shuffles and shared memory
right, and every misuse it claims to catch is caught as an error (or shows as NaN), never a crash or a silent
pass. Uses private fake-cupy module objects (device.make_module(), one or three devices): nothing is put in
sys.modules here.
"""

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cuda_emu
from cuda_emu.device import make_module

pytestmark = pytest.mark.cuda_emu
TESTS = Path(__file__).resolve().parent.parent

CHECKS_CU = r"""
extern "C" __global__ void block_sums(const float* __restrict__ x, float* __restrict__ out, int n) {
    __shared__ float partial[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < blockDim.x / 32; ++w) s += partial[w];
        out[blockIdx.x] = s;
    }
}
extern "C" __global__ void missing_barrier(float* __restrict__ out, int writer) {
    __shared__ float cell;
    if (threadIdx.x == writer) cell = 1.0f;
    out[blockIdx.x * blockDim.x + threadIdx.x] = cell;   // no __syncthreads() before the read
}
extern "C" __global__ void is_null(const float* __restrict__ maybe, int* __restrict__ flag) { *flag = !maybe; }
extern "C" __global__ void no_bounds_check(float* __restrict__ out) { out[threadIdx.x] = 1.0f; }
extern "C" __global__ void deadlock(float* __restrict__ out) {
    if (threadIdx.x == 0) __syncthreads(); else __syncwarp();
}
extern "C" __global__ void divergent_barrier(float* __restrict__ out) {
    if (threadIdx.x < 32)
        __syncthreads();
    else
        __syncthreads();
}
extern "C" __global__ void shuffle_from_exited(float* __restrict__ out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 16);
}
extern "C" __global__ void mixed_warp_ops(float* __restrict__ out) {
    if (threadIdx.x == 0) __syncwarp(); else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
extern "C" __global__ void partial_mask(float* __restrict__ out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}
extern "C" __global__ void far_write(float* __restrict__ out, long long offset) { out[offset] = 1.0f; }
extern "C" __global__ void divide(int* __restrict__ out, int d) { *out = 7 / d; }
extern "C" __global__ void smem_overrun(float* __restrict__ out, int n) {
    extern __shared__ float dyn[];
    dyn[n + threadIdx.x] = 1.0f;
}
"""


@pytest.fixture(scope="module")
def cp():
    """The emulated cupy module (not installed as "cupy": these tests call it directly)."""
    return make_module()


@pytest.fixture(scope="module")
def checks(cp):
    return cp.RawModule(code=CHECKS_CU, options=("-std=c++17",))


def test_emulator_runs_shuffles_barriers_and_shared_memory(cp, checks):
    x = np.random.default_rng(0).integers(-8, 9, 300).astype(np.float32)   # integer sums: exact in any order
    out = cp.empty(3, dtype=np.float32)
    checks.get_function("block_sums")((3,), (128,), (cp.asarray(x), out, np.int32(300)))
    assert np.array_equal(cp.asnumpy(out), np.add.reduceat(x, [0, 128, 256]))


@pytest.mark.parametrize("writer", [0, 127])
def test_emulator_exposes_a_missing_barrier(cp, checks, writer):
    """Threads run last-first in even blocks and first-first in odd ones: the read before the write shows."""
    out = cp.empty((2, 128), dtype=np.float32)
    checks.get_function("missing_barrier")((2,), (128,), (out, np.int32(writer)))
    assert np.isnan(cp.asnumpy(out)).any()


F32, I32 = np.float32, np.int32


@pytest.mark.parametrize("kernel, grid, block, out, extra, smem, message", [
    # grid (0,) launches one block, as CuPy's max(1, d) does; 40 threads write 32 floats
    ("no_bounds_check", (0,), (40,), (32, F32), (), 0, "outside the buffer of argument 'out'"),
    ("deadlock", (1,), (32,), (1, F32), (), 0, "deadlock"),
    ("divergent_barrier", (1,), (64,), (1, F32), (), 0, "different __syncthreads"),
    ("shuffle_from_exited", (1,), (32,), (32, F32), (), 0, "reads lane 16, which has exited"),
    ("mixed_warp_ops", (1,), (32,), (32, F32), (), 0, "different warp operations"),
    ("partial_mask", (1,), (32,), (32, F32), (), 0, "only the full-warp mask"),
    ("far_write", (1,), (1,), (1, F32), (np.int64(2**45),), 0, "memory fault"),
    ("divide", (1,), (1,), (1, I32), (I32(0),), 0, "division by zero"),
    ("smem_overrun", (1,), (32,), (1, F32), (I32(8),), 64, "past the end of the 64 bytes"),
    ("smem_overrun", (1,), (32,), (1, F32), (I32(0),), 49 * 1024, "exceeds the kernel's limit"),
    ("divide", (1, 70000), (1,), (1, I32), (I32(1),), 0, "grid"),
    ("divide", (1,), (1025,), (1, I32), (I32(1),), 0, "block"),
])
def test_emulator_reports_kernel_errors(cp, checks, kernel, grid, block, out, extra, smem, message):
    """Each is a launch error (the test process survives faults), never a silent wrong result."""
    with pytest.raises(cuda_emu.EmulatorError, match=message):
        checks.get_function(kernel)(grid, block, (cp.empty(out[0], dtype=out[1]), *extra), shared_mem=smem)


def test_emulator_checks_arguments_as_the_cupy_abi_needs_them(cp, checks):
    kernel = checks.get_function("is_null")
    flag, x = cp.zeros(1, dtype=np.int32), cp.zeros(4, dtype=np.float32)
    kernel((1,), (1,), (np.uint64(0), flag))   # loader.NULL: a 64-bit zero is a null pointer
    assert cp.asnumpy(flag)[0] == 1
    kernel((1,), (1,), (x, flag))
    assert cp.asnumpy(flag)[0] == 0
    bad = [((None, flag), "cupy issue #9046"),                             # CuPy sends None as 0xffffffff
           ((np.zeros(4, np.float32), flag), "expected a device array"),   # a host array
           ((x.astype(np.float64), flag), "float64 array"),
           ((cp.zeros(8, dtype=np.float32)[::2], flag), "non-contiguous"),
           ((x,), "1 arguments for 2 parameters")]
    for args, message in bad:
        with pytest.raises(cuda_emu.EmulatorError, match=message):
            kernel((1,), (1,), args)
    with pytest.raises(TypeError, match="expected tuple"):              # CuPy's Function.__call__(tuple grid, ..)
        kernel([1], (1,), (x, flag))
    with pytest.raises(cuda_emu.EmulatorError, match="numpy.int32"):   # CuPy sends a Python int as 64 bits
        checks.get_function("divide")((1,), (1,), (cp.zeros(1, dtype=np.int32), 3))
    with pytest.raises(TypeError, match="host numpy array"):             # as CuPy: no implicit host/device mix
        x + np.ones(4, np.float32)


@pytest.mark.parametrize("code, options, message", [
    ('extern "C" __global__ void k(float* o) { *o = __expf(1.0f); }', (), "fast_math_intrinsics_are_not_emulated"),
    ('extern "C" __global__ void k(float* o) { *o = 1.0f; }', ("--use_fast_math",), "is not emulated"),
    ('__shared__ float s[4];\nextern "C" __global__ void k(float* o) { *o = s[0]; }', (), "namespace scope"),
    ('struct P { float a; };\nextern "C" __global__ void k(P p, float* o) { *o = p.a; }', (), "does not pass"),
])
def test_emulator_refuses_what_it_does_not_emulate(cp, code, options, message):
    with pytest.raises(cuda_emu.EmulatorError, match=message):
        cp.RawModule(code=code, options=("-std=c++17", *options))


def test_missing_gxx_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(cuda_emu.EmulatorError, match="g\\+\\+ not found"):
        cuda_emu.gxx()


def test_the_emulated_cupy_does_not_leak():
    """After installed(): the previous "cupy" module (or none) and no cached cupy backend. Checked in a fresh
    process, so that a broken restore could not leak into the tests that run after this one."""
    code = ("import sys, cuda_emu; from nemo_scratch.backends import _CACHE, get_backend\n"
            "sentinel = sys.modules['cupy'] = type(sys)('cupy')\n"
            "with cuda_emu.installed() as fake:\n"
            "    assert sys.modules['cupy'] is fake and get_backend('cupy').xp is fake\n"
            "assert sys.modules['cupy'] is sentinel and 'cupy' not in _CACHE\n"
            "del sys.modules['cupy']\n"
            "with cuda_emu.installed():\n"
            "    get_backend('cupy')\n"
            "assert 'cupy' not in sys.modules and 'cupy' not in _CACHE\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------------------
# Several devices

@pytest.fixture
def cp3():
    """A fresh emulated cupy with three devices (device 0 current)."""
    return make_module(devices=3)


def test_devices_current_device_and_per_device_allocation(cp3):
    assert cp3.cuda.runtime.getDeviceCount() == 3 and cp3.cuda.Device().id == 0
    pool = cp3.get_default_memory_pool()
    with cp3.cuda.Device(2) as dev:
        assert dev.id == 2 and cp3.cuda.Device().id == 2 and cp3.cuda.runtime.getDevice() == 2
        x = cp3.zeros(4, dtype=np.float32)
        with cp3.cuda.Device(1):
            assert cp3.cuda.Device().id == 1
        y = x + np.float32(1)                      # an operation's result: same device, charged there
        assert pool.used_bytes() == 32             # x and y; the guards are not counted
    assert x.device.id == 2 and y.device.id == 2 and x.device == cp3.cuda.Device(2)
    assert cp3.cuda.Device().id == 0 and pool.used_bytes() == 0
    del x, y
    gc.collect()
    with cp3.cuda.Device(2):
        assert pool.used_bytes() == 0
    with pytest.raises(cuda_emu.EmulatorError, match="has 3 device"):
        cp3.cuda.Device(3)


def test_asarray_under_another_device_copies(cp3):
    with cp3.cuda.Device(2):
        x = cp3.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    with cp3.cuda.Device(1):
        y = cp3.asarray(x)
        assert y.device.id == 1 and cp3.get_default_memory_pool().used_bytes() == 48
        with pytest.raises(NotImplementedError, match="non-contiguous"):   # CuPy's cross-device copy rule
            cp3.asarray(x[:, 1:])
    assert np.array_equal(cp3.asnumpy(y), cp3.asnumpy(x)) and y.ctypes.data != x.ctypes.data
    assert cp3.asarray(x) is not x and cp3.asarray(cp3.asarray(x)).device.id == 0
    assert cp3.emulator_runtime.copies == {(2, 1): {"count": 1, "bytes": 48}, (2, 0): {"count": 2, "bytes": 96}}


def test_numpy_ops_mixing_devices_fail_naming_both(cp3):
    """A deliberate difference from CuPy (which would enable peer access): every unplanned hop is an error."""
    x = cp3.ones(4, dtype=np.float32)
    with cp3.cuda.Device(1):
        y = cp3.ones(4, dtype=np.float32)
        with pytest.raises(cuda_emu.EmulatorError, match="device 0 but the current device is 1"):
            x * 2
    with pytest.raises(cuda_emu.EmulatorError, match="device 0 and device 1"):
        x + y
    with pytest.raises(cuda_emu.EmulatorError, match="device 0 and device 1"):
        cp3.concatenate([x, y])
    assert (x + x).device.id == 0 and cp3.arange(3).device.id == 0


def test_kernel_launch_refuses_a_pointer_from_another_device(cp3):
    checks = cp3.RawModule(code=CHECKS_CU, options=("-std=c++17",))
    kernel = checks.get_function("block_sums")
    x = np.arange(64, dtype=np.float32)
    with cp3.cuda.Device(1):
        x1, out1 = cp3.asarray(x), cp3.empty(1, dtype=np.float32)
    out0 = cp3.empty(1, dtype=np.float32)
    with pytest.raises(cuda_emu.EmulatorError, match="argument 'x'.* on device 1 but the launch is on device 0"):
        kernel((1,), (64,), (x1, out0, np.int32(64)))
    with cp3.cuda.Device(1):
        kernel((1,), (64,), (x1, out1, np.int32(64)))
    assert cp3.asnumpy(out1)[0] == x.sum()


def test_memory_pool_limit_per_device(cp3):
    pool = cp3.get_default_memory_pool()
    with cp3.cuda.Device(1):
        pool.set_limit(size=1024)
        kept = cp3.empty(200, dtype=np.float32)                  # 800 bytes
        with pytest.raises(cp3.cuda.memory.OutOfMemoryError, match="limit set to: 1,024"):
            cp3.empty(100, dtype=np.float32)                     # 800 + 400 > 1024
        assert pool.get_limit() == 1024 and pool.used_bytes() == 800 and kept.device.id == 1
    big = cp3.empty(1000, dtype=np.float32)                      # device 0 has no limit
    assert pool.get_limit() == 0 and pool.used_bytes() == 4000 and big.size == 1000
