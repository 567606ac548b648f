"""nemo_scratch.ops.ssd against its own definition: the recurrence (ssd_scan_sequential).

- the chunked SSD equals the recurrence for EVERY chunk size (divisors, non-divisors, chunk > t), outputs
  and final states, with and without D and an initial state, for several h/g ratios, float32 and float64;
- an initial state carried through two calls equals one call over the concatenation (both forms);
- ssd_step repeated equals the scan;
- discretize_dt is a stable softplus with a floor and a ceiling; segsum matches its definition, and the fast
  twin's segsum_by_rows is segsum bit for bit (NaN and inf included);
- the module imports with NumPy alone.
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.errors import InputError, ShapeError
from nemo_scratch.ops.ssd import discretize_dt, segsum, ssd_scan_chunked, ssd_scan_sequential, ssd_step
from nemo_scratch.ops.ssd_fast import segsum_by_rows, ssd_scan_chunked_fast

DTYPES = st.sampled_from(["float32", "float64"])


def make_inputs(seed, b, t, h_per_g, g, p, n, dtype, with_d=True, with_state=True):
    """Random SSD inputs of realistic ranges: dt > 0 (as after discretize_dt), A < 0."""
    rng = np.random.default_rng(seed)
    h = g * h_per_g

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return dict(
        x=normal(b, t, h, p),
        dt=rng.uniform(0.01, 1.0, (b, t, h)).astype(dtype),
        A=-rng.uniform(0.1, 2.0, h).astype(dtype),
        B=normal(b, t, g, n),
        C=normal(b, t, g, n),
        D=normal(h) if with_d else None,
        initial_state=normal(b, h, p, n) if with_state else None,
    )


shapes = dict(seed=st.integers(0, 2**16), b=st.integers(1, 2), t=st.integers(1, 9),
              h_per_g=st.sampled_from([1, 2, 3]), g=st.integers(1, 2), p=st.integers(1, 3), n=st.integers(1, 4),
              dtype=DTYPES, with_d=st.booleans(), with_state=st.booleans())


@given(**shapes)
@example(seed=0, b=1, t=1, h_per_g=1, g=1, p=1, n=1, dtype="float32", with_d=False, with_state=False)
@example(seed=1, b=2, t=9, h_per_g=3, g=2, p=2, n=3, dtype="float32", with_d=True, with_state=True)
def test_chunked_equals_sequential_for_every_chunk(seed, b, t, h_per_g, g, p, n, dtype, with_d, with_state):
    args = make_inputs(seed, b, t, h_per_g, g, p, n, dtype, with_d, with_state)
    y_ref, s_ref = ssd_scan_sequential(**args)
    assert y_ref.shape == (b, t, g * h_per_g, p) and y_ref.dtype == dtype
    assert s_ref.shape == (b, g * h_per_g, p, n) and s_ref.dtype == dtype
    for chunk in range(1, t + 3):  # every divisor and non-divisor of t, and chunk > t
        y, s = ssd_scan_chunked(chunk=chunk, **args)
        assert_close(y, y_ref, "ssd", what=f"y, chunk={chunk}")
        assert_close(s, s_ref, "ssd", what=f"final_state, chunk={chunk}")


@given(**shapes)
@example(seed=1, b=2, t=9, h_per_g=3, g=2, p=2, n=3, dtype="float32", with_d=True, with_state=True)
def test_fast_twin_equals_the_readable_scan(seed, b, t, h_per_g, g, p, n, dtype, with_d, with_state):
    """ssd_fast.ssd_scan_chunked_fast (batched matmuls, what the numpy backend runs) is the readable scan."""
    args = make_inputs(seed, b, t, h_per_g, g, p, n, dtype, with_d, with_state)
    for chunk in range(1, t + 3):
        y_ref, s_ref = ssd_scan_chunked(chunk=chunk, **args)
        y, s = ssd_scan_chunked_fast(chunk=chunk, **args)
        assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and s.dtype == s_ref.dtype
        assert_close(y, y_ref, "ssd", what=f"y, chunk={chunk}")
        assert_close(s, s_ref, "ssd", what=f"final_state, chunk={chunk}")


def test_real_chunk_size_on_a_longer_sequence():
    """chunk=128 (the real models' size) against t=300: two full chunks and a partial third."""
    args = make_inputs(7, 1, 300, 2, 1, 2, 3, "float32")
    y_ref, s_ref = ssd_scan_sequential(**args)
    for scan in (ssd_scan_chunked, ssd_scan_chunked_fast):
        y, s = scan(chunk=128, **args)
        assert_close(y, y_ref, "ssd", what=f"{scan.__name__} y")
        assert_close(s, s_ref, "ssd", what=f"{scan.__name__} final_state")


@given(seed=st.integers(0, 2**16), t=st.integers(2, 10), cut=st.floats(0.0, 1.0), chunk=st.integers(1, 4),
       dtype=DTYPES)
@example(seed=0, t=2, cut=0.0, chunk=1, dtype="float32")
def test_initial_state_carried_through_two_calls(seed, t, cut, chunk, dtype):
    args = make_inputs(seed, 2, t, 2, 2, 2, 3, dtype)
    split = 1 + int(cut * (t - 2))  # 1 <= split <= t - 1
    timed = {"x", "dt", "B", "C"}
    first = {k: v[:, :split] if k in timed else v for k, v in args.items()}
    second = {k: v[:, split:] if k in timed else v for k, v in args.items()}
    for name, scan in [("sequential", ssd_scan_sequential),
                       ("chunked", lambda **a: ssd_scan_chunked(chunk=chunk, **a))]:
        y_all, s_all = scan(**args)
        y1, s1 = scan(**first)
        y2, s2 = scan(**{**second, "initial_state": s1})
        assert_close(np.concatenate([y1, y2], axis=1), y_all, "ssd", what=f"{name}: y over two calls")
        assert_close(s2, s_all, "ssd", what=f"{name}: final state over two calls")


@given(seed=st.integers(0, 2**16), b=st.integers(1, 2), t=st.integers(1, 8), h_per_g=st.sampled_from([1, 2, 4]),
       g=st.integers(1, 2), dtype=DTYPES, with_d=st.booleans())
@example(seed=0, b=1, t=1, h_per_g=1, g=1, dtype="float64", with_d=False)
def test_step_repeated_equals_scan(seed, b, t, h_per_g, g, dtype, with_d):
    args = make_inputs(seed, b, t, h_per_g, g, 3, 2, dtype, with_d)
    y_ref, s_ref = ssd_scan_chunked(chunk=3, **args)
    state, ys = args["initial_state"], []
    for s in range(t):
        y, state = ssd_step(args["x"][:, s], args["dt"][:, s], args["A"], args["B"][:, s], args["C"][:, s],
                            args["D"], state)
        assert y.shape == args["x"][:, s].shape and y.dtype == dtype and state.dtype == dtype
        ys.append(y)
    assert_close(np.stack(ys, axis=1), y_ref, "ssd", what="stepped y")
    assert_close(state, s_ref, "ssd", what="stepped state")


def test_step_matches_selective_state_update_formula():
    """One step written out per head (spec 3.3): dA = exp(dt A); state = state dA + dt B x; y = state C + D x."""
    a = make_inputs(3, 1, 1, 2, 2, 2, 3, "float64")
    x, dt, B, C, s0 = a["x"][:, 0], a["dt"][:, 0], a["B"][:, 0], a["C"][:, 0], a["initial_state"]
    y, s1 = ssd_step(x, dt, a["A"], B, C, a["D"], s0)
    for hh in range(4):
        gg = hh // 2  # repeat-interleave: heads 0,1 -> group 0; heads 2,3 -> group 1
        want = np.exp(dt[0, hh] * a["A"][hh]) * s0[0, hh] + dt[0, hh] * np.outer(x[0, hh], B[0, gg])
        assert_close(s1[0, hh], want, "ssd_step", what=f"state of head {hh}")
        assert_close(y[0, hh], want @ C[0, gg] + a["D"][hh] * x[0, hh], "ssd_step", what=f"y of head {hh}")


def test_inputs_are_not_mutated():
    args = make_inputs(5, 1, 5, 1, 1, 2, 2, "float32")
    before = {k: v.copy() for k, v in args.items()}
    ssd_scan_chunked(chunk=2, **args)
    ssd_scan_chunked_fast(chunk=2, **args)
    ssd_scan_sequential(**args)
    ssd_step(args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0], args["D"],
             args["initial_state"])
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_segsum_matches_its_definition():
    a = np.random.default_rng(0).standard_normal((2, 5))
    got = segsum(a)
    assert got.shape == (2, 5, 5) and got.dtype == a.dtype
    for i in range(5):
        for j in range(5):
            want = a[:, j + 1:i + 1].sum(-1) if i >= j else np.full(2, -np.inf)
            np.testing.assert_allclose(got[:, i, j], want, rtol=1e-14, atol=1e-14)


@given(q=st.integers(1, 40), lead=st.lists(st.integers(1, 3), max_size=2),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
@example(q=3, lead=[1], dtype="float32", seed=0)
def test_the_fast_twins_segsum_is_the_readable_one_bit_for_bit(q, lead, dtype, seed):
    a = (-3 * np.random.default_rng(seed).random((*lead, q))).astype(dtype)
    if a.size > 2:
        a.reshape(-1)[[0, -1]] = np.nan, np.inf          # non-finite steps land where the readable form puts them
    want, got = segsum(a), segsum_by_rows(a)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_discretize_dt_is_a_stable_clipped_softplus(dtype):
    raw = np.array([[-200.0, -5.0, 0.0, 3.0, 200.0]], dtype=dtype)
    bias = np.array([0.0, 0.5, -1.0, 1.0, 0.0], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow in exp for |x| = 200
        dt = discretize_dt(raw, bias)
        floored = discretize_dt(raw, bias, dt_min=1e-3, dt_max=2.0)
    assert dt.shape == raw.shape and dt.dtype == dtype and floored.dtype == dtype
    z = (raw + bias).astype(np.float64)[0, 1:4]
    want = np.log1p(np.exp(z))
    assert_close(dt[0, 1:4], want.astype(dtype), "activation", what="softplus")
    assert dt[0, 0] >= 0 and dt[0, 0] < 1e-30 and dt[0, 4] == 200.0
    assert floored[0, 0] == np.asarray(1e-3, dtype) and floored[0, 4] == 2.0


def test_chunk_must_be_a_positive_integer():
    args = make_inputs(0, 1, 3, 1, 1, 1, 1, "float32")
    with pytest.raises(InputError, match="chunk"):
        ssd_scan_chunked(chunk=0, **args)


def test_heads_must_be_a_multiple_of_groups():
    args = make_inputs(0, 1, 3, 1, 3, 1, 1, "float32")  # h = 3 ...
    args["B"], args["C"] = args["B"][:, :, :2], args["C"][:, :, :2]  # ... g = 2
    with pytest.raises(ShapeError, match="groups"):
        ssd_scan_sequential(**args)


def test_module_needs_nothing_but_numpy():
    heavy = ("torch", "numba", "cupy", "scipy", "ml_dtypes", "transformers", "safetensors")
    code = ("import sys, nemo_scratch.ops.ssd; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {heavy!r}]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
