"""The Mamba-path kernels of both GPU backends against the NumPy reference.

Kernels: nemo_scratch/backends/numba_cuda/{conv,ssd,norm}.py and kernels_cuda/{conv,ssd,norm}.cu (through
nemo_scratch/backends/cupy/). The property tests run for each of gpu_harness.BACKEND_MODES: numba with tiny
shapes on the CUDA simulator, and numba and cupy with realistic shapes on a device; the shapes cross
the warp (32), the block sizes and the SSD chunk with non-multiples, over several head/group ratios, batch
>= 1, with and without the optional arguments (bias, D, initial state). Tolerances: tests/tolerances.py
``kernel_*`` keys.
"""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import numpy as np
import pytest
from gpu_harness import (BACKEND_MODES, EXAMPLES, MODES, arrays, dim, heads_groups, maybe, numba_backend, run,
                         seeds, ssd_inputs)
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.backends import get_backend
from nemo_scratch.errors import DtypeError, InputError, ShapeError
from nemo_scratch.ops import conv, norm, ssd, ssd_fast




# ---------------------------------------------------------------------------------------------------------
# conv1d

@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, with_state=st.booleans(), with_bias=st.booleans(),
       activation=st.sampled_from(["silu", None]), strided=st.booleans())
def test_causal_conv1d_matches_reference(backend, mode, data, seed, with_state, with_bias, activation, strided):
    b, t, c, w = (data.draw(dim(mode, k)) for k in ("batch", "time", "channels", "conv_width"))
    make, be = arrays(seed), get_backend(backend)
    # strided: x is a column slice of a wider activation, as the model's xBC slice of in_proj's output
    x = make(b, t, c + 3)[:, :, 1:c + 1] if strided else make(b, t, c)
    weight, bias, state = make(c, w), maybe(with_bias, make(c)), maybe(with_state, make(b, c, w))
    y, new_state = run(be, be.causal_conv1d, x, weight, bias, state, activation=activation)
    y_ref, state_ref = conv.causal_conv1d(x, weight, bias, state, activation=activation)
    assert_close(y, y_ref, "kernel_conv1d", what="causal_conv1d y")
    # the new state is a copy of raw inputs: exact
    assert new_state.shape == state_ref.shape and new_state.dtype == state_ref.dtype
    assert np.array_equal(new_state, state_ref)


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, with_bias=st.booleans(), activation=st.sampled_from(["silu", None]),
       in_place=st.booleans())
def test_causal_conv1d_step_matches_reference(backend, mode, data, seed, with_bias, activation, in_place):
    b, c, w = (data.draw(dim(mode, k)) for k in ("batch", "channels", "conv_width"))
    make, be = arrays(seed), get_backend(backend)
    x, state, weight, bias = make(b, c), make(b, c, w), make(c, w), maybe(with_bias, make(c))
    y_ref, state_ref = conv.causal_conv1d_step(x, state, weight, bias, activation=activation)
    dev_state = be.asarray(state.copy())
    y, new_state = be.causal_conv1d_step(be.asarray(x), dev_state, be.asarray(weight),
                                         None if bias is None else be.asarray(bias), activation=activation,
                                         out_state=dev_state if in_place else None)
    # in place: the state buffer itself is the new state; else the input state is untouched
    assert (new_state is dev_state) == in_place
    if not in_place:
        assert np.array_equal(be.to_numpy(dev_state), state)
    assert_close(be.to_numpy(y), y_ref, "kernel_conv1d", what="causal_conv1d_step y")
    assert np.array_equal(be.to_numpy(new_state), state_ref)


# ---------------------------------------------------------------------------------------------------------
# norms

@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, lead=st.integers(0, 2))
def test_rms_norm_matches_reference(backend, mode, data, seed, lead):
    shape = tuple(data.draw(dim(mode, "rows")) for _ in range(lead)) + (data.draw(dim(mode, "width")),)
    make, be = arrays(seed), get_backend(backend)
    x, weight = make(*shape, lo=-3.0, hi=3.0), make(shape[-1])
    assert_close(run(be, be.rms_norm, x, weight, 1e-5), norm.rms_norm(x, weight, 1e-5), "kernel_rms_norm")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds)
def test_gated_rms_norm_matches_reference(backend, mode, data, seed):
    rows, groups, width = (data.draw(dim(mode, k)) for k in ("rows", "groups", "width"))
    lead = (rows,) if data.draw(st.booleans()) else (1, rows)
    make, be = arrays(seed), get_backend(backend)
    y, z = make(*lead, groups * width, lo=-3.0, hi=3.0), make(*lead, groups * width, lo=-4.0, hi=4.0)
    weight = make(groups * width)
    got = run(be, be.gated_rms_norm, y, z, weight, groups, 1e-5)
    assert_close(got, norm.gated_rms_norm(y, z, weight, groups, 1e-5), "kernel_gated_rms_norm")


# ---------------------------------------------------------------------------------------------------------
# SSD



@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, with_d=st.booleans(), with_state=st.booleans())
def test_ssd_scan_matches_reference(backend, mode, data, seed, with_d, with_state):
    b, t, chunk, p, n = (data.draw(dim(mode, k)) for k in ("batch", "time", "chunk", "head_dim", "state"))
    h, g = data.draw(heads_groups(mode))
    make, be = arrays(seed), get_backend(backend)
    x, dt, A, B, C = ssd_inputs(make, b, t, h, p, g, n)
    D, init = maybe(with_d, make(h)), maybe(with_state, make(b, h, p, n))
    y, final = run(be, be.ssd_scan, x, dt, A, B, C, chunk, D=D, initial_state=init)
    y_ref, final_ref = ssd.ssd_scan_chunked(x, dt, A, B, C, chunk, D=D, initial_state=init)
    assert_close(y, y_ref, "kernel_ssd", what=f"ssd_scan y (t={t}, chunk={chunk})")
    assert_close(final, final_ref, "kernel_ssd", what=f"ssd_scan final_state (t={t}, chunk={chunk})")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, with_d=st.booleans(), in_place=st.booleans())
def test_ssd_step_matches_reference(backend, mode, data, seed, with_d, in_place):
    b, p, n = (data.draw(dim(mode, k)) for k in ("batch", "head_dim", "step_state"))
    h, g = data.draw(heads_groups(mode))
    make, be = arrays(seed), get_backend(backend)
    x, dt, A, B, C = ssd_inputs(make, b, 1, h, p, g, n)
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    D, state = maybe(with_d, make(h)), make(b, h, p, n, lo=-3.0, hi=3.0)
    y_ref, state_ref = ssd.ssd_step(x, dt, A, B, C, D, state)
    dev_state = be.asarray(state.copy())
    y, new_state = be.ssd_step(*(be.asarray(a) for a in (x, dt, A, B, C)), None if D is None else be.asarray(D),
                               dev_state, out_state=dev_state if in_place else None)
    assert (new_state is dev_state) == in_place
    if not in_place:
        assert np.array_equal(be.to_numpy(dev_state), state)
    assert_close(be.to_numpy(y), y_ref, "kernel_ssd_step", what="ssd_step y")
    assert_close(be.to_numpy(new_state), state_ref, "kernel_ssd_step", what="ssd_step new_state")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t, chunk", [(1, 4), (4, 4), (5, 4), (9, 4), (3, 1), (6, 100)])
def test_ssd_scan_chunk_boundaries(mode, t, chunk):
    """Pinned cases: one step, exactly one chunk, one past it, a ragged last chunk, chunk 1, chunk > t."""
    make, be = arrays(t * 100 + chunk), numba_backend()
    x, dt, A, B, C = ssd_inputs(make, 2, t, 4, 2, 2, 3)
    D, init = make(4), make(2, 4, 2, 3)
    y, final = run(be, be.ssd_scan, x, dt, A, B, C, chunk, D=D, initial_state=init)
    y_ref, final_ref = ssd.ssd_scan_chunked(x, dt, A, B, C, chunk, D=D, initial_state=init)
    assert_close(y, y_ref, "kernel_ssd", what="ssd_scan y")
    assert_close(final, final_ref, "kernel_ssd", what="ssd_scan final_state")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_empty_sequence_keeps_the_state(backend, mode):
    """t = 0: no token, the conv and SSM states come back unchanged (launches of zero threads are skipped)."""
    make, be = arrays(7), get_backend(backend)
    state = make(2, 5, 4)
    y, new_state = run(be, be.causal_conv1d, make(2, 0, 5), make(5, 4), make(5), state)
    assert y.shape == (2, 0, 5) and np.array_equal(new_state, state)
    x, dt, A, B, C = ssd_inputs(make, 2, 0, 2, 3, 1, 4)
    init = make(2, 2, 3, 4)
    y, final = run(be, be.ssd_scan, x, dt, A, B, C, 4, initial_state=init)
    assert y.shape == (2, 0, 2, 3) and np.array_equal(final, init)


@pytest.mark.parametrize("mode", MODES)
def test_read_only_host_arrays(mode):
    """Weights from a memory-mapped checkpoint are read-only NumPy arrays: numba must not copy back into them."""
    make, be = arrays(11), numba_backend()
    x, dt, A, B, C = ssd_inputs(make, 1, 5, 2, 3, 1, 4)
    D, weight, bias = make(2), make(6, 4), make(6)
    for a in (A, D, weight, bias):
        a.flags.writeable = False
    y, _ = be.ssd_scan(x, dt, A, B, C, 2, D=D)
    assert_close(be.to_numpy(y), ssd.ssd_scan_chunked(x, dt, A, B, C, 2, D=D)[0], "kernel_ssd")
    xc = make(1, 5, 6)
    assert_close(be.to_numpy(be.causal_conv1d(xc, weight, bias)[0]), conv.causal_conv1d(xc, weight, bias)[0],
                 "kernel_conv1d")


# ---------------------------------------------------------------------------------------------------------
# float64 (oracle mode) and errors: the same contract as the reference

@pytest.mark.parametrize("mode", MODES)
def test_float64_runs_the_reference(mode):
    """Kernels compute in float32; float64 calls run the reference itself (bit for bit on NumPy arrays)."""
    make, be = arrays(3), numba_backend()
    f64 = lambda *shape: make(*shape).astype(np.float64)  # noqa: E731
    x, w, state = f64(2, 5, 6), f64(6, 4), f64(2, 6, 4)
    weight = f64(6)
    cases = [
        (be.rms_norm, norm.rms_norm, "rms_norm", (x, weight, 1e-5)),
        (be.gated_rms_norm, norm.gated_rms_norm, "gated_rms_norm", (x, f64(2, 5, 6), weight, 3, 1e-5)),
        (be.causal_conv1d, conv.causal_conv1d, "conv1d", (x, w, None, state)),
        (be.causal_conv1d_step, conv.causal_conv1d_step, "conv1d", (x[:, 0], state, w, f64(6))),
    ]
    xs, dt, A, B, C = (a.astype(np.float64) for a in ssd_inputs(make, 2, 5, 4, 3, 2, 3))
    # ssd_scan (the model's prefill scan) falls back to the numpy backend's ssd_scan, the fast twin
    cases += [(be.ssd_scan, ssd_fast.ssd_scan_chunked_fast, "ssd", (xs, dt, A, B, C, 2, f64(4), f64(2, 4, 3, 3))),
              (be.ssd_scan_chunked, ssd.ssd_scan_chunked, "ssd", (xs, dt, A, B, C, 2, f64(4), f64(2, 4, 3, 3))),
              (be.ssd_step, ssd.ssd_step, "ssd_step", (xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], f64(4),
                                                       f64(2, 4, 3, 3)))]
    for op, ref, key, args in cases:
        got, want = run(be, op, *args), ref(*args)
        for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            if be.xp is np:
                assert g.dtype == np.float64 and np.array_equal(g, r), op.__name__
            else:  # the reference on CuPy arrays: CuPy's exp/sum round differently from NumPy's
                assert_close(g, r, key, what=op.__name__)


@pytest.mark.parametrize("mode", MODES)
def test_bad_arguments_raise_package_errors(mode):
    make, be = arrays(5), numba_backend()
    x, weight = make(2, 3, 8), make(8)
    with pytest.raises(DtypeError, match="rms_norm"):
        be.rms_norm(be.asarray(x), be.asarray(weight.astype(np.float64)), 1e-5)
    with pytest.raises(ShapeError, match="weight"):
        be.rms_norm(be.asarray(x), be.asarray(make(7)), 1e-5)
    with pytest.raises(ShapeError, match="n_groups"):
        be.gated_rms_norm(be.asarray(x), be.asarray(x), be.asarray(weight), 3, 1e-5)
    with pytest.raises(InputError, match="activation"):
        be.causal_conv1d(be.asarray(x), be.asarray(make(8, 4)), None, activation="gelu")
    with pytest.raises(ShapeError, match="state"):
        be.causal_conv1d_step(be.asarray(x[:, 0]), be.asarray(make(2, 8, 3)), be.asarray(make(8, 4)), None)
    xs, dt, A, B, C = (be.asarray(a) for a in ssd_inputs(make, 1, 4, 3, 2, 2, 3))
    with pytest.raises(ShapeError, match="groups"):
        be.ssd_scan(xs, dt, A, B, C, 2)
    xs, dt, A, B, C = (be.asarray(a) for a in ssd_inputs(make, 1, 4, 4, 2, 2, 3))
    with pytest.raises(InputError, match="chunk"):
        be.ssd_scan(xs, dt, A, B, C, 0)
    state = be.asarray(make(1, 4, 2, 3).astype(np.float64))
    with pytest.raises(DtypeError, match="out_state"):
        be.ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, be.asarray(make(1, 4, 2, 3)), out_state=state)
