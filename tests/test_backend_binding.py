"""How a backend is put together (backends/numpy_backend.py): composite ops written once, one contract per op,
one binder ``check -> float32 ? kernel : reference`` for every KERNELS row.

These tests use a spy backend built from a fake kernel module, so they run anywhere (no GPU, no simulator);
the numba backend on the simulator is checked too where it runs.
"""

import inspect
import sys
import types

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import numpy as np
import pytest
from gpu_harness import numba_backend, requires_sim

import nemo_scratch
from nemo_scratch.backends import cupy as cupy_pkg
from nemo_scratch.backends import get_backend
from nemo_scratch.backends import numba_cuda as numba_pkg
from nemo_scratch.backends.gpu_common import Unsupported
from nemo_scratch.backends.numpy_backend import NumpyBackend
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import DtypeError, ShapeError
from nemo_scratch.model.blocks import DECODE_MAX_NEW_TOKENS, attention_op
from nemo_scratch.ops import contracts, moe, norm

COMPOSITES = ("linear", "mlp", "latent_moe")


def backend_ops():
    """Every op a backend carries: the primitives (staticmethods) and the composites (methods)."""
    return {k for k, v in vars(NumpyBackend).items() if isinstance(v, staticmethod)} | set(COMPOSITES)


def test_every_op_has_one_public_contract():
    assert backend_ops() == set(contracts.CHECKS)
    for op, check in contracts.CHECKS.items():
        assert check.__name__.startswith("check_") and not check.__name__.startswith("check__"), op


@pytest.mark.parametrize("kernels", [numba_pkg.KERNELS, cupy_pkg.KERNELS], ids=["numba", "cupy"])
def test_gpu_backends_list_kernels_only(kernels):
    """A composite is never a kernel row: the GPU backends inherit the reference's composition."""
    assert kernels and not set(kernels) & set(COMPOSITES)
    assert set(kernels) <= backend_ops()


@pytest.fixture
def spy(monkeypatch):
    """A backend whose rms_norm and route rows are fake kernels recording their calls."""
    calls = []
    module = types.ModuleType("spy_kernels")

    def rms_norm_spy(x, weight, eps):
        calls.append("rms_norm")
        return np.full(x.shape, 7.0, dtype=np.float32)

    def route_spy(x, gate_weight, correction_bias, top_k, *args):
        calls.append("route")
        raise Unsupported("the spy declines every router call")

    module.rms_norm_spy, module.route_spy = rms_norm_spy, route_spy
    monkeypatch.setitem(sys.modules, "spy_pkg.spy_kernels", module)

    class SpyBackend(NumpyBackend):
        name = "spy"
        KERNELS = {"rms_norm": ("spy_kernels", "rms_norm_spy"), "route": ("spy_kernels", "route_spy")}
        KERNEL_PACKAGE = "spy_pkg"

        def __init__(self):
            self.bind_kernels()

    return SpyBackend(), calls


def test_binder_runs_the_kernel_for_float32_and_the_reference_for_float64(spy):
    be, calls = spy
    x, w = np.ones((2, 8), dtype=np.float32), np.ones(8, dtype=np.float32)
    assert np.all(be.rms_norm(x, w, 1e-5) == 7.0) and calls == ["rms_norm"]
    got = be.rms_norm(x.astype(np.float64), w.astype(np.float64), 1e-5)
    assert got.dtype == np.float64 and calls == ["rms_norm"]          # the kernel was not called again
    np.testing.assert_array_equal(got, norm.rms_norm(x.astype(np.float64), w.astype(np.float64), 1e-5))
    assert inspect.unwrap(be.rms_norm).__name__ == "rms_norm_spy"


def test_binder_checks_before_any_kernel(spy):
    be, calls = spy
    x = np.ones((2, 8), dtype=np.float32)
    with pytest.raises(ShapeError, match="rms_norm: weight has shape"):
        be.rms_norm(x, np.ones(5, dtype=np.float32), 1e-5)
    with pytest.raises(DtypeError, match="rms_norm: arguments mix"):
        be.rms_norm(x, np.ones(8, dtype=np.float64), 1e-5)
    assert calls == []


def test_a_kernel_that_declines_runs_the_reference(spy):
    be, calls = spy
    rng = np.random.default_rng(0)
    x, gate = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    idx, w = be.route(x, gate, None, 2)
    ref_idx, ref_w = moe.route(x, gate, None, 2)
    assert calls == ["route"]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(w, ref_w)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    make_random_checkpoint(out, preset("tiny"), seed=3)
    return out


def _count_latent_moe(monkeypatch):
    calls = []
    reference = moe.latent_moe

    def counted(*args, **kwargs):
        calls.append(kwargs.get("ops"))
        return reference(*args, **kwargs)

    monkeypatch.setattr(moe, "latent_moe", counted)
    return calls


def test_the_model_runs_the_reference_latent_moe(tiny_dir, monkeypatch):
    """The MoE mixer's routed path is ops.moe.latent_moe itself, with the backend as its primitives."""
    model = nemo_scratch.load(tiny_dir)
    calls = _count_latent_moe(monkeypatch)
    model.forward([[1, 2, 3, 4]])
    assert len(calls) == model.cfg.count("moe") and all(ops is model.backend for ops in calls)


@pytest.mark.sim
@requires_sim
def test_the_numba_model_runs_the_reference_latent_moe(tiny_dir, monkeypatch):
    be = numba_backend()
    assert type(be).latent_moe is NumpyBackend.latent_moe and type(be).linear is NumpyBackend.linear
    model = nemo_scratch.load(tiny_dir, backend="numba")
    calls = _count_latent_moe(monkeypatch)
    model.forward([[1, 2, 3]])
    assert len(calls) == model.cfg.count("moe") and all(ops is be for ops in calls)


def test_the_decode_attention_rule():
    be = get_backend("numpy")
    assert attention_op(be, 1, 10) == be.gqa_decode
    assert attention_op(be, DECODE_MAX_NEW_TOKENS, DECODE_MAX_NEW_TOKENS + 1) == be.gqa_decode
    assert attention_op(be, DECODE_MAX_NEW_TOKENS + 1, 100) == be.gqa_attention   # a long continuation
    assert attention_op(be, 4, 4) == be.gqa_attention                               # a prefill (no cache)
