"""Shared helpers of every backend test: numba on the CUDA simulator or a GPU, cupy on the CPU CUDA emulator
(tests/cuda_emu) or a GPU.

Import this module BEFORE anything imports numba: at import it turns the CUDA simulator on
(``NUMBA_ENABLE_CUDASIM=1``) when there is no CUDA GPU and the variable is unset, because numba reads it
once, at its own import. One process therefore runs numba either on the simulator or on the GPU:

- no GPU (CI, laptops): ``SIMULATOR`` is True; ``numba-sim`` runs (marker ``sim``, tiny shapes) and
  ``cupy-emu`` runs (marker ``cuda_emu``: the real .cu kernels and launchers on the CPU emulator); the ``gpu``
  runs skip with the reason "no CUDA GPU";
- a GPU: ``SIMULATOR`` is False; ``numba-gpu`` and ``cupy-gpu`` run with realistic shapes; ``numba-sim`` skips
  and says that the GPU runs it (force the simulator with NUMBA_ENABLE_CUDASIM=1); ``cupy-emu`` skips where
  cupy is installed, because ``cupy-gpu`` runs the same kernels on the device.

A backend test is written once and parametrized over ``BACKEND_MODES``; the ``be`` fixture (conftest.py)
hands it the backend of that run, and ``mode`` picks the shape ranges (``dim``), e.g.::

    @pytest.mark.parametrize("backend, mode", BACKEND_MODES)
    @kernel_settings()
    @given(data=st.data())
    def test_op(be, mode, data):
        c = data.draw(dim(mode, "channels"))
        assert_close(run(be, be.op, ...), reference(...), "kernel_op")
"""

import contextlib
import ctypes
import functools
import importlib.util
import os
import sys

import numpy as np
import pytest
from hypothesis import strategies as st


@functools.lru_cache(maxsize=None)
def gpu_available():
    """True when the CUDA driver reports at least one device. Never raises; imports neither numba nor cupy."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return libcuda.cuInit(0) == 0 and libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except Exception:  # no driver library, a broken install, not Linux: no GPU
        return False


def cupy_available():
    """True when a GPU is present and cupy is installed (without importing cupy)."""
    return gpu_available() and importlib.util.find_spec("cupy") is not None


def _simulator_mode():
    """Turn the simulator on when there is no GPU (and the user did not choose); report numba's mode."""
    if "numba" in sys.modules:  # too late to choose: report what numba was imported with
        return bool(sys.modules["numba"].config.ENABLE_CUDASIM)
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and not gpu_available():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")


SIMULATOR = _simulator_mode()
if SIMULATOR:
    # The simulator runs each CUDA thread as a Python thread that hands over at every syncthreads; a short
    # switch interval makes those hand-overs 2-3x faster.
    sys.setswitchinterval(1e-4)

# Hypothesis examples per property test. One process runs either the CPU modes (numba-sim: every CUDA thread
# a Python thread; cupy-emu: every CUDA thread a fiber) or the GPU ones, so one number per process.
EXAMPLES = 6 if SIMULATOR else 25

requires_sim = pytest.mark.skipif(
    not SIMULATOR, reason="CUDA simulator off in this process: a CUDA GPU is present and runs these kernels "
                          "in the gpu-marked twin of this test (NUMBA_ENABLE_CUDASIM=1 forces the simulator)")
requires_gpu = pytest.mark.skipif(
    SIMULATOR or not gpu_available(),
    reason="no CUDA GPU" if not gpu_available() else
           "no CUDA GPU for numba: NUMBA_ENABLE_CUDASIM=1 put numba on the simulator in this process")
requires_cupy = pytest.mark.skipif(
    not cupy_available(), reason="no CUDA GPU" if not gpu_available() else "no CUDA GPU usable: cupy is not installed")
requires_emu = pytest.mark.skipif(
    cupy_available(), reason="a CUDA GPU and cupy are present: the cupy-gpu run of this test runs the same kernels "
                             "on the device (the emulator is for machines without one)")

# The two runs of a numba-only test (tests/test_backend_numba_only.py): simulator, GPU.
MODES = [pytest.param("sim", marks=[pytest.mark.sim, requires_sim], id="sim"),
         pytest.param("gpu", marks=[pytest.mark.gpu, requires_gpu], id="gpu")]

# The runs of every backend test: (backend, mode). Without a GPU the first two run, with one the last two.
BACKEND_MODES = [pytest.param("numba", "sim", marks=[pytest.mark.sim, requires_sim], id="numba-sim"),
                 pytest.param("cupy", "emu", marks=[pytest.mark.cuda_emu, requires_emu], id="cupy-emu"),
                 pytest.param("numba", "gpu", marks=[pytest.mark.gpu, requires_gpu], id="numba-gpu"),
                 pytest.param("cupy", "gpu", marks=[pytest.mark.gpu, requires_cupy], id="cupy-gpu")]


def backend_modes(*modes):
    """The BACKEND_MODES runs whose mode (or backend) is one of ``modes``: backend_modes("gpu"), ("cupy")."""
    return [p for p in BACKEND_MODES if set(p.values) & set(modes)]


def pinned(cases):
    """Parametrize ``(backend, mode, case)`` for pinned cases: ``cases`` is a list of (modes, name, kwargs);
    each case runs in every BACKEND_MODES run whose mode it names, with that run's marks and skips."""
    return [pytest.param(*p.values, kwargs, marks=p.marks, id=f"{p.id}-{name}")
            for p in BACKEND_MODES for modes, name, kwargs in cases if p.values[1] in modes]


def kernel_settings(max_examples=None):
    """``@settings`` of a backend property test: the loaded profile (``ci``), EXAMPLES examples, and the
    function_scoped_fixture health check off. That check warns that a function-scoped fixture is not reset
    between examples; the ``be`` fixture is shared by the examples of one test on purpose (a backend holds no
    state between calls, and entering the emulator once per test instead of once per example is what keeps
    the cupy-emu runs fast)."""
    from hypothesis import HealthCheck, settings

    base = settings()
    return settings(base, max_examples=max_examples or EXAMPLES,
                    suppress_health_check=(*base.suppress_health_check, HealthCheck.function_scoped_fixture))


@functools.lru_cache(maxsize=None)
def _emulator_built():
    """Every kernels_cuda/*.cu built for the emulator, once a session (g++, in parallel; cached on disk)."""
    import cuda_emu

    return cuda_emu.precompile_kernels()


@contextlib.contextmanager
def backend_for(backend, mode):
    """The backend object of one BACKEND_MODES run. For cupy-emu the CPU CUDA emulator is ``cupy`` inside the
    block only (cuda_emu.installed()), so nothing emulated leaks into the tests that run after it; a missing
    g++ fails here (cuda_emu.EmulatorError), it never skips."""
    from nemo_scratch.backends import get_backend

    if mode != "emu":
        yield get_backend(backend)
        return
    import cuda_emu

    _emulator_built()
    with cuda_emu.installed():
        yield get_backend(backend)


@contextlib.contextmanager
def cupy_hidden():
    """``import cupy`` fails inside the block (sys.modules["cupy"] = None). Every cupy launcher imports cupy
    before it allocates or launches anything, so an argument error raised in here was raised before any
    device work."""
    previous = sys.modules.get("cupy")
    sys.modules["cupy"] = None
    try:
        yield
    finally:
        if previous is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = previous


def runs_on_numpy_arrays(be):
    """True where the backend's arrays are NumPy arrays (numba-sim; cupy-emu, whose device arrays subclass
    numpy.ndarray): the reference then runs on NumPy itself, and float64 results are bit-identical to it."""
    return isinstance(be.asarray(np.zeros(1, np.float32)), np.ndarray)


def run(be, op, *args, **kwargs):
    """Move numpy arrays and packed weights to the backend, run ``op``, bring every output back to numpy."""
    from nemo_scratch.ops.quant import FP8Weight, NVFP4Weight

    move = lambda a: be.asarray(a) if isinstance(a, (np.ndarray, NVFP4Weight, FP8Weight)) else a  # noqa: E731
    out = op(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
    return tuple(be.to_numpy(o) for o in out) if isinstance(out, tuple) else be.to_numpy(out)


def maybe(flag, array):
    return array if flag else None


def ssd_inputs(make, b, t, h, p, g, n):
    """x, dt (already discretized, > 0), A (< 0), B, C with the model's value ranges."""
    x = make(b, t, h, p, lo=-2.0, hi=2.0)
    dt = make(b, t, h, lo=0.01, hi=0.6)
    A = -np.exp(make(h, lo=-1.0, hi=1.5))
    return x, dt, A, make(b, t, g, n), make(b, t, g, n)


def numba_backend():
    """The numba backend of this process (simulator or GPU); constructing it must not fail here."""
    from nemo_scratch.backends import get_backend

    return get_backend("numba")


# ---------------------------------------------------------------------------------------------------------
# Shapes

# crossing(lo, hi, *boundaries): integers in [lo, hi], half of the draws next to k*B - 1, k*B, k*B + 1 (k = 1, 2)
from nemo_scratch.oracle.strategies import crossing  # noqa: E402  (numba-free: the simulator choice stands)


# name -> (lo, hi, boundaries) for the modes (sim, emu, gpu). The boundaries are the kernels' own launch
# sizes, which a shape must cross with non-multiples (tests/test_backend_{numba,cupy}_only.py check that these
# numbers still are those of the kernels):
#   sim  numba under the simulator (runtime.py SIM_THREADS = 32; attention.py TILE_K = 4, ROWS = 8,
#        SPLIT_KEYS = 8; moe.py TOKENS = 2, D_CHUNK = 8, ROUTER_THREADS = 16; quant.py TILE = 4, GEMV_ROWS = 4,
#        GEMV_OUTS = 8): a launch stays at a few hundred Python threads;
#   emu  the cupy kernels on the CPU emulator (loader.py THREADS = 256; attention.cu 32-key tiles and 32-row
#        blocks; moe.cu 4-token router blocks, 16-row expert tiles; quant.cu 8-column blocks, m blocks 1/4/16,
#        32 NVFP4 blocks of 16 a warp step; ssd.cu MAX_L_TILE = 32);
#   gpu  a device, either backend: the real model's sizes (numba's GPU tiles are 32 keys, 64 rows, 256-key
#        splits, 16-wide matmul tiles; cupy's those of emu).
DIMS = {
    #                    sim                        emu                          gpu
    # -- Mamba path
    "batch":            ((1, 2, ()),               (1, 2, ()),                  (1, 4, ())),
    "time":             ((1, 9, ()),               (1, 40, (32,)),              (1, 300, (128,))),
    "chunk":            ((1, 5, ()),               (1, 40, (32,)),              (16, 128, (32, 64, 128))),
    "channels":         ((1, 40, (32,)),           (1, 300, (32, 256)),         (1, 1100, (32, 128, 256))),
    "conv_width":       ((1, 4, ()),               (1, 4, ()),                  (2, 4, ())),
    "width":            ((1, 70, (32,)),           (1, 300, (32, 256)),         (1, 2100, (32, 128, 256, 1024))),
    "rows":             ((1, 3, ()),               (1, 3, ()),                  (1, 70, ())),
    "head_dim":         ((1, 3, ()),               (1, 5, ()),                  (1, 80, (32, 64))),
    "state":            ((1, 5, ()),               (1, 40, (32,)),              (1, 140, (32, 128))),
    "step_state":       ((1, 40, (32,)),           (1, 70, (32, 64)),           (1, 140, (32, 128))),
    "groups":           ((1, 2, ()),               (1, 2, ()),                  (1, 8, ())),
    "heads_per_group":  ((1, 3, ()),               (1, 3, ()),                  (1, 8, ())),
    # -- attention: prefill keys s and queries t (t <= s), decode keys, head dim, heads
    "keys":             ((1, 13, (4,)),            (1, 70, (32, 64)),           (1, 300, (32, 64, 128))),
    "queries":          ((1, 9, (8,)),             (1, 40, (32,)),              (1, 300, (32, 64))),
    "decode_keys":      ((1, 25, (4, 8)),          (1, 200, (32, 64)),          (1, 3000, (32, 256, 512, 1024))),
    "decode_queries":   ((1, 3, ()),               (1, 3, ()),                  (1, 4, ())),
    "attn_head_dim":    ((1, 4, ()),               (1, 70, (32, 64)),           (1, 256, (32, 64, 128, 256))),
    "kv_heads":         ((1, 2, ()),               (1, 2, ()),                  (1, 4, ())),
    "q_per_kv":         ((1, 3, ()),               (1, 8, ()),                  (1, 32, (8, 32))),
    # -- router: tokens t, width d, groups, experts a group
    "tokens":           ((1, 5, (2,)),             (1, 9, (4,)),                (1, 40, (4,))),
    "router_width":     ((1, 17, (8,)),            (1, 70, (32,)),              (1, 3000, (32, 256, 2688))),
    "n_group":          ((1, 4, ()),               (1, 4, ()),                  (1, 8, ())),
    "experts_per_group": ((1, 6, ()),              (1, 20, (16,)),              (1, 160, (32, 64, 128))),
    # -- routed experts and MLPs: tokens, experts, widths (dense/FP8 any width, NVFP4 whole 16-blocks)
    "moe_tokens":       ((1, 9, (4,)),             (1, 20, (16,)),              (1, 300, (16, 128))),
    "experts":          ((1, 4, ()),               (1, 5, ()),                  (1, 64, (32,))),
    "moe_width":        ((1, 9, (4,)),             (1, 40, (16, 32)),           (1, 600, (16, 256, 512))),
    "nvfp4_blocks":     ((1, 2, ()),               (1, 3, ()),                  (1, 40, (8, 16))),
    # -- NVFP4/FP8 matmuls (x [m, in] @ W[out, in]^T) and dequantisation
    "matmul_rows":      ((1, 9, (4,)),             (1, 40, (4, 16, 32)),        (1, 70, (4, 16, 32))),
    "matmul_out":       ((1, 17, (4, 8)),          (1, 40, (8, 32)),            (1, 600, (8, 16, 32, 128, 256))),
    "matmul_in_blocks": ((1, 2, ()),               (1, 40, (32,)),              (1, 160, (8, 32, 64))),
    "fp8_in":           ((1, 32, (16,)),           (1, 600, (16, 512)),         (1, 1100, (16, 512))),
    "dequant_rows":     ((1, 5, ()),               (1, 40, (8, 32)),            (1, 300, (8, 32, 256))),
    "dequant_blocks":   ((1, 3, ()),               (1, 40, (32,)),              (1, 200, (32, 128))),
}
MODE_COLUMN = {"sim": 0, "emu": 1, "gpu": 2}


def dim(mode, name):
    """The Hypothesis strategy for dimension ``name`` (a key of DIMS) in ``mode`` ("sim", "emu" or "gpu")."""
    lo, hi, boundaries = DIMS[name][MODE_COLUMN[mode]]
    return crossing(lo, hi, *boundaries)


def boundaries(mode, name):
    """The boundaries DIMS[name] crosses in ``mode`` (what the backend-only tests compare with the kernels)."""
    return DIMS[name][MODE_COLUMN[mode]][2]


@st.composite
def heads_groups(draw, mode):
    """(h, g) with h % g == 0 (head hh reads group hh // (h/g)), over several head/group ratios."""
    g = draw(dim(mode, "groups"))
    return g * draw(dim(mode, "heads_per_group")), g


def arrays(seed):
    """A factory of bounded float32 arrays drawn from one seed (faster than element-wise Hypothesis arrays).

    ``make(*shape, lo=-1.0, hi=1.0)`` -> float32 uniform in [lo, hi).
    """
    rng = np.random.default_rng(seed)

    def make(*shape, lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi, size=shape).astype(np.float32)

    return make


seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------------------
# Values: packed weights, exact router inputs, bit-exact comparison

def pack(fmt, w):
    """A float32 weight [..., out, in] as a checkpoint holds it: dense, NVFP4 (in % 16 == 0) or FP8."""
    from nemo_scratch.ops import quant

    return {"dense": lambda a: a, "nvfp4": quant.nvfp4_quantize, "fp8": quant.fp8_quantize}[fmt](w)


def random_nvfp4(rng, *shape):  # [..., out, in] -> NVFP4Weight with W of rms ~ 1.5 / sqrt(in)
    """A valid NVFP4 weight drawn code by code (quantizing an Ultra-sized float32 stack on the CPU is slow):
    random E2M1 codes, block scales 1 + m/8 (E4M3 exponent field 7), a global scale for an O(1) output."""
    from nemo_scratch.ops.quant import NVFP4Weight

    *lead, out, inn = shape
    packed = rng.integers(0, 256, size=(*lead, out, inn // 2), dtype=np.uint8)
    block_scale = rng.integers(0x38, 0x40, size=(*lead, out, inn // 16), dtype=np.uint8)
    global_scale = np.full(tuple(lead), 1.5 / np.sqrt(inn) / 4, dtype=np.float32)
    return NVFP4Weight(packed, block_scale, global_scale)


def dyadic(rng, shape, steps, scale):  # -> float32 multiples of scale in [-steps*scale, steps*scale]
    """Values on a coarse binary grid: dot products of them are exact in float32 in any summation order, so
    a kernel and the reference see bit-identical router logits."""
    return (rng.integers(-steps, steps + 1, size=shape) * scale).astype(np.float32)


def assert_bits_equal(got, ref, what):
    """Bit-exact float32 comparison (-0.0 included); NaN must sit at the same places."""
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32, what
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN positions differ"
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32)), f"{what}: bits differ"
