"""Shared helpers of every backend test (numba on the simulator or a GPU, cupy on a GPU).

Import this module BEFORE anything imports numba: at import it turns the CUDA simulator on
(``NUMBA_ENABLE_CUDASIM=1``) when there is no CUDA GPU and the variable is unset, because numba reads it
once, at its own import. One process therefore runs numba either on the simulator or on the GPU:

- no GPU (CI, laptops): ``SIMULATOR`` is True; tests marked ``sim`` run with tiny shapes, ``gpu`` ones skip
  with the reason "no CUDA GPU";
- a GPU: ``SIMULATOR`` is False; ``gpu`` tests run with realistic shapes, ``sim`` ones skip and say that
  the GPU runs them (force the simulator with NUMBA_ENABLE_CUDASIM=1).

A property test is written once and parametrized over ``MODES``: ``mode`` picks the marker, the skip, and
the shape ranges (``dim``), e.g.::

    @pytest.mark.parametrize("mode", MODES)
    @settings(max_examples=EXAMPLES)
    @given(data=st.data())
    def test_op(mode, data):
        c = data.draw(dim(mode, "channels"))
"""

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

# Threads a block under the simulator (backends/numba_cuda/runtime.py SIM_THREADS) and on a GPU
# (GPU_THREADS / GPU_REDUCE_THREADS): the sizes a shape must cross, with non-multiples.
WARP = 32
SIM_BLOCK = 32
GPU_BLOCKS = (128, 256)

# Hypothesis examples per property test: the simulator runs every CUDA thread as a Python thread.
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

# The two runs of one numba property test: tiny shapes on the simulator, realistic shapes on a GPU.
MODES = [pytest.param("sim", marks=[pytest.mark.sim, requires_sim], id="sim"),
         pytest.param("gpu", marks=[pytest.mark.gpu, requires_gpu], id="gpu")]


# The runs of one Mamba-path property test across both GPU backends (tests/test_backend_mamba.py).
BACKEND_MODES = [pytest.param("numba", "sim", marks=[pytest.mark.sim, requires_sim], id="numba-sim"),
                 pytest.param("numba", "gpu", marks=[pytest.mark.gpu, requires_gpu], id="numba-gpu"),
                 pytest.param("cupy", "gpu", marks=[pytest.mark.gpu, requires_cupy], id="cupy-gpu")]


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


# name -> (simulator (lo, hi, boundaries), GPU (lo, hi, boundaries)). Simulator ranges keep a launch to a
# few hundred threads while still crossing one warp/block of 32; GPU ranges are the real model's sizes.
DIMS = {
    "batch": ((1, 2, ()), (1, 4, ())),
    "time": ((1, 9, ()), (1, 300, (128,))),                      # prefill length; crosses the chunk too
    "chunk": ((1, 5, ()), (16, 128, (64, 128))),
    "channels": ((1, 40, (WARP,)), (1, 1100, (WARP,) + GPU_BLOCKS)),   # conv channels c
    "conv_width": ((1, 4, ()), (2, 4, ())),
    "width": ((1, 70, (WARP,)), (1, 2100, (WARP, 1024) + GPU_BLOCKS)),  # a reduced row (norm group, state n)
    "rows": ((1, 3, ()), (1, 70, ())),
    "head_dim": ((1, 3, ()), (1, 80, (WARP, 64))),
    "state": ((1, 5, ()), (1, 140, (WARP, 128))),                # ssd state size n in a scan
    "step_state": ((1, 40, (WARP,)), (1, 140, (WARP, 128))),     # n in a decode step (the reduced axis)
    "groups": ((1, 2, ()), (1, 8, ())),
}


def dim(mode, name):
    """The Hypothesis strategy for dimension ``name`` (a key of DIMS) in ``mode`` ("sim" or "gpu")."""
    lo, hi, boundaries = DIMS[name][0 if mode == "sim" else 1]
    return crossing(lo, hi, *boundaries)


@st.composite
def heads_groups(draw, mode):
    """(h, g) with h % g == 0, head/group ratios 1, 2, 3 (sim) or 1..8 (GPU): head hh reads group hh // (h/g)."""
    g = draw(dim(mode, "groups"))
    ratio = draw(st.integers(1, 3 if mode == "sim" else 8))
    return g * ratio, g


def arrays(seed):
    """A factory of bounded float32 arrays drawn from one seed (faster than element-wise Hypothesis arrays).

    ``make(*shape, lo=-1.0, hi=1.0)`` -> float32 uniform in [lo, hi).
    """
    rng = np.random.default_rng(seed)

    def make(*shape, lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi, size=shape).astype(np.float32)

    return make


seeds = st.integers(0, 2**32 - 1)
