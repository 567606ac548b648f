"""What is particular to the cupy backend's Mamba-path kernels (kernels_cuda/{conv,ssd,norm}.cu); the property
tests they share with the numba backend are in tests/test_backend_mamba.py (parametrized over both).

On a CUDA GPU with cupy (marker ``gpu``): pinned chunk-boundary cases up to the model's chunk of 128, and
one call of every kernel at Nemotron 3 Ultra's Mamba shapes (256 heads x 64, state 128, 8 groups,
conv_dim 18432). Tolerances: tests/tolerances.py ``kernel_*`` keys.

Without a GPU the ``gpu`` tests skip with the reason "no CUDA GPU"; the argument checks (which run before
cupy is imported) and the backend's "no GPU" error are tested everywhere.
"""

import gpu_harness  # noqa: F401  (first: turns the numba simulator on before anything imports numba)
import numpy as np
import pytest
from gpu_harness import arrays, cupy_available, requires_cupy, run, ssd_inputs
from tolerances import assert_close

from nemo_scratch.backends import get_backend
from nemo_scratch.backends.cupy import conv as conv_cupy
from nemo_scratch.backends.cupy import norm as norm_cupy
from nemo_scratch.backends.cupy import ssd as ssd_cupy
from nemo_scratch.errors import BackendError, DtypeError, InputError, ShapeError
from nemo_scratch.ops import conv, norm, ssd


def backend():
    return get_backend("cupy")


@pytest.mark.gpu
@requires_cupy
@pytest.mark.parametrize("t, chunk", [(1, 4), (4, 4), (5, 4), (9, 4), (3, 1), (6, 100), (300, 128), (257, 64)])
def test_ssd_scan_chunk_boundaries(t, chunk):
    """Pinned cases: one step, exactly one chunk, one past it, a ragged last chunk, chunk 1, chunk > t, and
    the model's chunk of 128 with a ragged tail."""
    make, be = arrays(t * 100 + chunk), backend()
    x, dt, A, B, C = ssd_inputs(make, 2, t, 4, 3, 2, 33)
    D, init = make(4), make(2, 4, 3, 33)
    y, final = run(be, be.ssd_scan, x, dt, A, B, C, chunk, D=D, initial_state=init)
    y_ref, final_ref = ssd.ssd_scan_chunked(x, dt, A, B, C, chunk, D=D, initial_state=init)
    assert_close(y, y_ref, "kernel_ssd", what="ssd_scan y")
    assert_close(final, final_ref, "kernel_ssd", what="ssd_scan final_state")


# ---------------------------------------------------------------------------------------------------------
# Nemotron 3 Ultra's Mamba shapes (spec 3): h=256, p=64, n=128, g=8, conv_dim=18432, i=16384, d=8192

ULTRA = dict(h=256, p=64, n=128, g=8, w=4, d=8192)


@pytest.mark.gpu
@requires_cupy
def test_every_kernel_at_ultra_shapes():
    """Each kernel once at the real model's widths: a prefill of 2 chunks of 128 plus a ragged tail, and a
    decode step at batch 8 (the reference runs on the CPU at the same shapes)."""
    h, p, n, g, w, d = (ULTRA[k] for k in ("h", "p", "n", "g", "w", "d"))
    i, c = h * p, h * p + 2 * g * n
    make, be = arrays(2026), backend()
    b, t = 1, 2 * 128 + 17
    x, weight, bias, state = make(b, t, c), make(c, w), make(c), make(b, c, w)
    y, new_state = run(be, be.causal_conv1d, x, weight, bias, state)
    y_ref, state_ref = conv.causal_conv1d(x, weight, bias, state)
    assert_close(y, y_ref, "kernel_conv1d", what="ultra causal_conv1d")
    assert np.array_equal(new_state, state_ref)
    y, new_state = run(be, be.causal_conv1d_step, x[:, 0], state, weight, bias)
    y_ref, state_ref = conv.causal_conv1d_step(x[:, 0], state, weight, bias)
    assert_close(y, y_ref, "kernel_conv1d", what="ultra causal_conv1d_step")
    assert np.array_equal(new_state, state_ref)

    xs, dt, A, B, C = ssd_inputs(make, b, t, h, p, g, n)
    D, init = make(h), make(b, h, p, n)
    y, final = run(be, be.ssd_scan, xs, dt, A, B, C, 128, D=D, initial_state=init)
    y_ref, final_ref = ssd.ssd_scan_chunked(xs, dt, A, B, C, 128, D=D, initial_state=init)
    assert_close(y, y_ref, "kernel_ssd", what="ultra ssd_scan y")
    assert_close(final, final_ref, "kernel_ssd", what="ultra ssd_scan final_state")

    bs = 8
    xs, dt, A, B, C = ssd_inputs(make, bs, 1, h, p, g, n)
    state = make(bs, h, p, n, lo=-3.0, hi=3.0)
    y, new_state = run(be, be.ssd_step, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)
    y_ref, state_ref = ssd.ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)
    assert_close(y, y_ref, "kernel_ssd_step", what="ultra ssd_step y")
    assert_close(new_state, state_ref, "kernel_ssd_step", what="ultra ssd_step new_state")

    yg, z, wn = make(bs, i, lo=-3.0, hi=3.0), make(bs, i, lo=-4.0, hi=4.0), make(i)
    assert_close(run(be, be.gated_rms_norm, yg, z, wn, g, 1e-5), norm.gated_rms_norm(yg, z, wn, g, 1e-5),
                 "kernel_gated_rms_norm", what="ultra gated_rms_norm")
    xd, wd = make(bs, d, lo=-3.0, hi=3.0), make(d)
    assert_close(run(be, be.rms_norm, xd, wd, 1e-5), norm.rms_norm(xd, wd, 1e-5), "kernel_rms_norm",
                 what="ultra rms_norm")


@pytest.mark.gpu
@requires_cupy
def test_float64_runs_the_reference():
    """The kernels compute in float32; float64 calls (oracle mode) run the reference on cupy arrays."""
    make, be = arrays(3), backend()
    f64 = lambda *shape: make(*shape).astype(np.float64)  # noqa: E731
    x, w, state, weight = f64(2, 5, 6), f64(6, 4), f64(2, 6, 4), f64(6)
    xs, dt, A, B, C = (a.astype(np.float64) for a in ssd_inputs(make, 2, 5, 4, 3, 2, 3))
    cases = [
        (be.rms_norm, norm.rms_norm, "rms_norm", (x, weight, 1e-5)),
        (be.gated_rms_norm, norm.gated_rms_norm, "gated_rms_norm", (x, f64(2, 5, 6), weight, 3, 1e-5)),
        (be.causal_conv1d, conv.causal_conv1d, "conv1d", (x, w, None, state)),
        (be.causal_conv1d_step, conv.causal_conv1d_step, "conv1d", (x[:, 0], state, w, f64(6))),
        (be.ssd_scan, ssd.ssd_scan_chunked, "ssd", (xs, dt, A, B, C, 2, f64(4), f64(2, 4, 3, 3))),
        (be.ssd_step, ssd.ssd_step, "ssd_step", (xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], f64(4), f64(2, 4, 3, 3))),
    ]
    for op, ref, key, args in cases:
        got, want = run(be, op, *args), ref(*args)
        for g_, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert g_.dtype == np.float64
            assert_close(g_, r, key, what=op.__name__)  # cupy's exp/sum round differently from numpy's


@pytest.mark.gpu
@requires_cupy
def test_backend_binds_the_kernels_and_keeps_arrays_on_the_device():
    from nemo_scratch.backends.cupy import KERNELS
    from nemo_scratch.backends.numpy_backend import NumpyBackend

    be = backend()
    assert be.name == "cupy" and be.xp.__name__ == "cupy"
    for op, (module, entry) in KERNELS.items():
        fn = getattr(be, op)
        assert fn.__name__ == entry and fn.__module__ == f"nemo_scratch.backends.cupy.{module}", op
    reference_ops = [k for k, v in vars(NumpyBackend).items() if isinstance(v, staticmethod) and k not in KERNELS]
    for op in reference_ops:  # no kernel: the reference function itself (it runs on cupy arrays)
        assert getattr(be, op) is getattr(NumpyBackend, op), op
    dev = be.asarray(np.ones((2, 3), dtype=np.float32))
    assert isinstance(dev, be.xp.ndarray) and isinstance(be.rms_norm(dev, be.asarray(np.ones(3, np.float32)),
                                                                     1e-5), be.xp.ndarray)
    assert isinstance(be.to_numpy(dev), np.ndarray)


@pytest.mark.gpu
@requires_cupy
def test_out_state_is_checked():
    make, be = arrays(5), backend()
    xs, dt, A, B, C = (be.asarray(a) for a in ssd_inputs(make, 1, 1, 4, 2, 2, 3))
    state = be.asarray(make(1, 4, 2, 3))
    with pytest.raises(DtypeError, match="out_state"):
        be.ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, state, out_state=state.astype(np.float64))
    with pytest.raises(ShapeError, match="out_state"):
        be.ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, state, out_state=be.asarray(make(1, 4, 2, 4)))
    conv_state = be.asarray(make(2, 8, 4))
    with pytest.raises(ShapeError, match="out_state"):
        be.causal_conv1d_step(be.asarray(make(2, 8)), conv_state, be.asarray(make(8, 4)), None,
                              out_state=be.asarray(make(2, 8, 8))[:, :, ::2])  # not contiguous


def test_cupy_backend_without_a_gpu_says_what_is_missing():
    """Where cupy or a GPU is missing, get_backend("cupy") raises BackendError naming what is missing."""
    if cupy_available():
        assert backend().name == "cupy"
        return
    with pytest.raises(BackendError, match="cupy backend"):
        backend()


def test_bad_arguments_raise_package_errors_before_any_gpu_work():
    """The launchers check their arguments before cupy is imported: these run (and raise) without a GPU."""
    make = arrays(5)
    x, weight = make(2, 3, 8), make(8)
    with pytest.raises(DtypeError, match="rms_norm"):
        norm_cupy.rms_norm_cupy(x, weight.astype(np.float64), 1e-5)
    with pytest.raises(ShapeError, match="weight"):
        norm_cupy.rms_norm_cupy(x, make(7), 1e-5)
    with pytest.raises(ShapeError, match="n_groups"):
        norm_cupy.gated_rms_norm_cupy(x, x, weight, 3, 1e-5)
    with pytest.raises(ShapeError, match="z"):
        norm_cupy.gated_rms_norm_cupy(x, x[:, :2], weight, 2, 1e-5)
    with pytest.raises(InputError, match="activation"):
        conv_cupy.causal_conv1d_cupy(x, make(8, 4), None, activation="gelu")
    with pytest.raises(ShapeError, match="state"):
        conv_cupy.causal_conv1d_cupy(x, make(8, 4), None, make(2, 8, 3))
    with pytest.raises(ShapeError, match="state"):
        conv_cupy.causal_conv1d_step_cupy(x[:, 0], make(2, 8, 3), make(8, 4), None)
    with pytest.raises(ShapeError, match="bias"):
        conv_cupy.causal_conv1d_step_cupy(x[:, 0], make(2, 8, 4), make(8, 4), make(7))
    xs, dt, A, B, C = ssd_inputs(make, 1, 4, 3, 2, 2, 3)
    with pytest.raises(ShapeError, match="groups"):
        ssd_cupy.ssd_scan_chunked_cupy(xs, dt, A, B, C, 2)
    xs, dt, A, B, C = ssd_inputs(make, 1, 4, 4, 2, 2, 3)
    with pytest.raises(InputError, match="chunk"):
        ssd_cupy.ssd_scan_chunked_cupy(xs, dt, A, B, C, 0)
    with pytest.raises(InputError, match="chunk=5000"):
        ssd_cupy.ssd_scan_chunked_cupy(np.zeros((1, 5000, 4, 2), np.float32), np.zeros((1, 5000, 4), np.float32),
                                       A, np.zeros((1, 5000, 2, 3), np.float32), np.zeros((1, 5000, 2, 3), np.float32),
                                       5000)
    with pytest.raises(DtypeError, match="ssd_step"):
        ssd_cupy.ssd_step_cupy(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, make(1, 4, 2, 3).astype(np.float64))
    with pytest.raises(InputError, match="state"):
        ssd_cupy.ssd_step_cupy(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, None)
    with pytest.raises(ShapeError, match="state"):
        ssd_cupy.ssd_step_cupy(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, make(1, 4, 3, 3))
