"""The Mamba-path kernels of both GPU backends against the NumPy reference: causal conv1d (prefill and decode
step), RMSNorm and the gated group RMSNorm, the SSD chunked scan and its single-token state update.

Kernels: nemo_scratch/backends/numba_cuda/{conv,ssd,norm}.py and kernels_cuda/{conv,ssd,norm}.cu (through
nemo_scratch/backends/cupy/). Every test runs for each gpu_harness.BACKEND_MODES run (``be`` fixture): numba
on the CUDA simulator and cupy on the CPU CUDA emulator (both in CI), numba and cupy on a device. Shapes
(gpu_harness.DIMS) cross the warp (32), the block sizes and the SSD chunk with non-multiples, over several
head/group ratios, batch >= 1, with and without the optional arguments (bias, D, initial state); pinned cases
add the chunk boundaries and the block edges, and on a GPU one call of every kernel runs at Nemotron 3
Ultra's shapes. Tolerances: tests/tolerances.py ``kernel_*`` keys. The contract (float64, errors, empty
inputs) is tested in tests/test_backend_contract.py.
"""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import numpy as np
import pytest
from gpu_harness import (BACKEND_MODES, arrays, backend_modes, dim, heads_groups, kernel_settings, maybe, pinned,
                         run, seeds, ssd_inputs)
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.ops import conv, norm, ssd

EMU_GPU = ("emu", "gpu")


# ---------------------------------------------------------------------------------------------------------
# conv1d

def check_causal_conv1d(be, seed, b, t, c, w, with_state, with_bias, activation, strided):
    make = arrays(seed)
    # strided: x is a column slice of a wider activation, as the model's xBC slice of in_proj's output
    x = make(b, t, c + 3)[:, :, 1:c + 1] if strided else make(b, t, c)
    weight, bias, state = make(c, w), maybe(with_bias, make(c)), maybe(with_state, make(b, c, w))
    y, new_state = run(be, be.causal_conv1d, x, weight, bias, state, activation=activation)
    y_ref, state_ref = conv.causal_conv1d(x, weight, bias, state, activation=activation)
    assert_close(y, y_ref, "kernel_conv1d", what=f"causal_conv1d y b={b} t={t} c={c} w={w}")
    # the new state is a copy of raw inputs: exact
    assert new_state.shape == state_ref.shape and new_state.dtype == state_ref.dtype
    assert np.array_equal(new_state, state_ref)


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, with_state=st.booleans(), with_bias=st.booleans(),
       activation=st.sampled_from(["silu", None]), strided=st.booleans())
def test_causal_conv1d_matches_reference(be, mode, data, seed, with_state, with_bias, activation, strided):
    b, t, c, w = (data.draw(dim(mode, k)) for k in ("batch", "time", "channels", "conv_width"))
    check_causal_conv1d(be, seed, b, t, c, w, with_state, with_bias, activation, strided)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "a-block-and-one", dict(seed=1, b=2, t=5, c=257, w=4, with_state=True, with_bias=True,
                                      activation="silu", strided=True)),
]))
def test_causal_conv1d_pinned(be, mode, case):
    check_causal_conv1d(be, **case)


def check_causal_conv1d_step(be, seed, b, c, w, with_bias, activation, in_place):
    make = arrays(seed)
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
    assert_close(be.to_numpy(y), y_ref, "kernel_conv1d", what=f"causal_conv1d_step y b={b} c={c} w={w}")
    assert np.array_equal(be.to_numpy(new_state), state_ref)


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, with_bias=st.booleans(), activation=st.sampled_from(["silu", None]),
       in_place=st.booleans())
def test_causal_conv1d_step_matches_reference(be, mode, data, seed, with_bias, activation, in_place):
    b, c, w = (data.draw(dim(mode, k)) for k in ("batch", "channels", "conv_width"))
    check_causal_conv1d_step(be, seed, b, c, w, with_bias, activation, in_place)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "a-block-and-one", dict(seed=2, b=2, c=257, w=4, with_bias=False, activation="silu", in_place=True)),
]))
def test_causal_conv1d_step_pinned(be, mode, case):
    check_causal_conv1d_step(be, **case)


# ---------------------------------------------------------------------------------------------------------
# norms

def check_rms_norm(be, seed, shape):
    make = arrays(seed)
    x, weight = make(*shape, lo=-3.0, hi=3.0), make(shape[-1])
    assert_close(run(be, be.rms_norm, x, weight, 1e-5), norm.rms_norm(x, weight, 1e-5), "kernel_rms_norm",
                 what=f"rms_norm {shape}")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, lead=st.integers(0, 2))
def test_rms_norm_matches_reference(be, mode, data, seed, lead):
    shape = tuple(data.draw(dim(mode, "rows")) for _ in range(lead)) + (data.draw(dim(mode, "width")),)
    check_rms_norm(be, seed, shape)


def check_gated_rms_norm(be, seed, lead, groups, width):
    make = arrays(seed)
    y, z = make(*lead, groups * width, lo=-3.0, hi=3.0), make(*lead, groups * width, lo=-4.0, hi=4.0)
    weight = make(groups * width)
    got = run(be, be.gated_rms_norm, y, z, weight, groups, 1e-5)
    assert_close(got, norm.gated_rms_norm(y, z, weight, groups, 1e-5), "kernel_gated_rms_norm",
                 what=f"gated_rms_norm {lead} {groups} x {width}")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds)
def test_gated_rms_norm_matches_reference(be, mode, data, seed):
    rows, groups, width = (data.draw(dim(mode, k)) for k in ("rows", "groups", "width"))
    check_gated_rms_norm(be, seed, (rows,) if data.draw(st.booleans()) else (1, rows), groups, width)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "rms-a-block-and-one", dict(seed=3, shape=(3, 3, 257))),
]))
def test_rms_norm_pinned(be, mode, case):
    check_rms_norm(be, **case)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (("sim",) + EMU_GPU, "a-warp-and-one", dict(seed=4, lead=(2,), groups=2, width=33)),
]))
def test_gated_rms_norm_pinned(be, mode, case):
    check_gated_rms_norm(be, **case)


# ---------------------------------------------------------------------------------------------------------
# SSD

def check_ssd_scan(be, seed, b, t, chunk, h, p, g, n, with_d, with_state):
    make = arrays(seed)
    x, dt, A, B, C = ssd_inputs(make, b, t, h, p, g, n)
    D, init = maybe(with_d, make(h)), maybe(with_state, make(b, h, p, n))
    y, final = run(be, be.ssd_scan, x, dt, A, B, C, chunk, D=D, initial_state=init)
    y_ref, final_ref = ssd.ssd_scan_chunked(x, dt, A, B, C, chunk, D=D, initial_state=init)
    assert_close(y, y_ref, "kernel_ssd", what=f"ssd_scan y (t={t}, chunk={chunk}, h={h}, g={g}, n={n})")
    assert_close(final, final_ref, "kernel_ssd", what=f"ssd_scan final_state (t={t}, chunk={chunk})")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, with_d=st.booleans(), with_state=st.booleans())
def test_ssd_scan_matches_reference(be, mode, data, seed, with_d, with_state):
    b, t, chunk, p, n = (data.draw(dim(mode, k)) for k in ("batch", "time", "chunk", "head_dim", "state"))
    h, g = data.draw(heads_groups(mode))
    check_ssd_scan(be, seed, b, t, chunk, h, p, g, n, with_d, with_state)


# (t, chunk): one step, exactly one chunk, one past it, a ragged last chunk, chunk 1, chunk > t; and (emulator,
# GPU) the model's chunk of 128 with a ragged tail, and a chunk longer than one 32-row tile of C.B^T
CHUNK_CASES = [(1, 4), (4, 4), (5, 4), (9, 4), (3, 1), (6, 100)]


@pytest.mark.parametrize("backend, mode, case", pinned(
    [(("sim",) + EMU_GPU, f"t{t}-chunk{q}", dict(t=t, chunk=q)) for t, q in CHUNK_CASES]
    + [(EMU_GPU, f"t{t}-chunk{q}", dict(t=t, chunk=q)) for t, q in [(300, 128), (257, 64)]]))
def test_ssd_scan_chunk_boundaries(be, mode, case):
    t, chunk = case["t"], case["chunk"]
    p, n = (2, 3) if mode == "sim" else (3, 33)   # emulator and GPU: n crosses a warp
    check_ssd_scan(be, t * 100 + chunk, 2, t, chunk, 4, p, 2, n, with_d=True, with_state=True)


def check_ssd_step(be, seed, b, h, p, g, n, with_d, in_place):
    make = arrays(seed)
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
    assert_close(be.to_numpy(y), y_ref, "kernel_ssd_step", what=f"ssd_step y b={b} h={h} p={p} n={n}")
    assert_close(be.to_numpy(new_state), state_ref, "kernel_ssd_step", what="ssd_step new_state")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, with_d=st.booleans(), in_place=st.booleans())
def test_ssd_step_matches_reference(be, mode, data, seed, with_d, in_place):
    b, p, n = (data.draw(dim(mode, k)) for k in ("batch", "head_dim", "step_state"))
    h, g = data.draw(heads_groups(mode))
    check_ssd_step(be, seed, b, h, p, g, n, with_d, in_place)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "60-rows-ragged-8-warp-block", dict(seed=8, b=2, h=6, p=5, g=2, n=65, with_d=True, in_place=True)),
]))
def test_ssd_step_pinned(be, mode, case):
    check_ssd_step(be, **case)


# ---------------------------------------------------------------------------------------------------------
# Nemotron 3 Ultra's Mamba shapes (spec 3): h=256, p=64, n=128, g=8, conv_dim=18432, i=16384, d=8192

ULTRA = dict(h=256, p=64, n=128, g=8, w=4, d=8192)


@pytest.mark.parametrize("backend, mode", backend_modes("gpu"))
def test_every_mamba_kernel_at_ultra_shapes(be, mode):
    """Each kernel once at the real model's widths: a prefill of 2 chunks of 128 plus a ragged tail, and a
    decode step at batch 8 (the reference runs on the CPU at the same shapes)."""
    h, p, n, g, w, d = (ULTRA[k] for k in ("h", "p", "n", "g", "w", "d"))
    i, c = h * p, h * p + 2 * g * n
    make = arrays(2026)
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
