"""nemo_scratch.ops.conv: the causal depthwise conv1d over a sequence and one token at a time.

- the sequence form equals its definition written as a loop (zero or given left context, t < w included);
- the returned state is the last w raw inputs, left zero-padded;
- the step form repeated equals the sequence form (from zeros and from an initial state);
- two sequence calls chained by the state equal one call over the concatenation.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.errors import InputError
from nemo_scratch.ops.conv import causal_conv1d, causal_conv1d_step

DTYPES = st.sampled_from(["float32", "float64"])


def make_inputs(seed, b, t, c, w, dtype, with_bias=True, with_state=True):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return (normal(b, t, c), normal(c, w), normal(c) if with_bias else None,
            normal(b, c, w) if with_state else None)


def conv_by_definition(x, weight, bias, state, activation):
    """y[t] = act(bias + sum_j weight[:, j] * xpad[t + j]), xpad = state[:, :, 1:] then x; one output at a time."""
    b, t, c = x.shape
    w = weight.shape[1]
    if state is None:
        state = np.zeros((b, c, w), dtype=x.dtype)
    xpad = np.concatenate([state[:, :, 1:].transpose(0, 2, 1), x], axis=1)        # [b, w-1+t, c]
    y = np.zeros_like(x)
    for tt in range(t):
        acc = np.zeros((b, c), dtype=x.dtype) if bias is None else np.broadcast_to(bias, (b, c)).copy()
        for j in range(w):
            acc += weight[:, j] * xpad[:, tt + j]
        y[:, tt] = acc * (1 / (1 + np.exp(-acc))) if activation == "silu" else acc
    return y


conv_shapes = dict(seed=st.integers(0, 2**16), b=st.integers(1, 2), t=st.integers(1, 7), c=st.integers(1, 5),
                   w=st.integers(1, 5), dtype=DTYPES, with_bias=st.booleans(), with_state=st.booleans(),
                   activation=st.sampled_from(["silu", None]))


@given(**conv_shapes)
@example(seed=0, b=1, t=2, c=1, w=4, dtype="float32", with_bias=True, with_state=False, activation="silu")
def test_sequence_matches_definition_and_keeps_last_w_inputs(seed, b, t, c, w, dtype, with_bias, with_state,
                                                             activation):
    x, weight, bias, state = make_inputs(seed, b, t, c, w, dtype, with_bias, with_state)
    y, new_state = causal_conv1d(x, weight, bias, state, activation=activation)
    assert y.shape == (b, t, c) and y.dtype == dtype
    assert new_state.shape == (b, c, w) and new_state.dtype == dtype
    assert_close(y, conv_by_definition(x, weight, bias, state, activation), "conv1d", what="y")
    # new_state = the last w columns of concat(state or zeros, x^T): raw inputs, oldest first
    history = np.concatenate([np.zeros((b, c, w), dtype) if state is None else state, x.transpose(0, 2, 1)], 2)
    np.testing.assert_array_equal(new_state, history[:, :, -w:])


@given(**conv_shapes)
@example(seed=0, b=1, t=1, c=2, w=4, dtype="float32", with_bias=False, with_state=True, activation=None)
def test_step_repeated_equals_sequence(seed, b, t, c, w, dtype, with_bias, with_state, activation):
    x, weight, bias, state = make_inputs(seed, b, t, c, w, dtype, with_bias, with_state)
    y_ref, state_ref = causal_conv1d(x, weight, bias, state, activation=activation)
    s = np.zeros((b, c, w), dtype) if state is None else state
    ys = []
    for tt in range(t):
        y, s = causal_conv1d_step(x[:, tt], s, weight, bias, activation=activation)
        assert y.shape == (b, c) and y.dtype == dtype and s.shape == (b, c, w)
        ys.append(y)
    assert_close(np.stack(ys, axis=1), y_ref, "conv1d", what="stepped y")
    np.testing.assert_array_equal(s, state_ref)


@given(seed=st.integers(0, 2**16), t1=st.integers(1, 5), t2=st.integers(1, 5), w=st.integers(1, 4), dtype=DTYPES)
@example(seed=0, t1=1, t2=1, w=4, dtype="float32")
def test_two_calls_chained_by_state_equal_one_call(seed, t1, t2, w, dtype):
    x, weight, bias, _ = make_inputs(seed, 2, t1 + t2, 3, w, dtype)
    y_all, s_all = causal_conv1d(x, weight, bias)
    y1, s1 = causal_conv1d(x[:, :t1], weight, bias)
    y2, s2 = causal_conv1d(x[:, t1:], weight, bias, state=s1)
    assert_close(np.concatenate([y1, y2], axis=1), y_all, "conv1d", what="y over two calls")
    np.testing.assert_array_equal(s2, s_all)


def test_inputs_are_not_mutated():
    x, weight, bias, state = make_inputs(1, 1, 3, 2, 4, "float32")
    before = [a.copy() for a in (x, weight, bias, state)]
    causal_conv1d(x, weight, bias, state)
    causal_conv1d_step(x[:, 0], state, weight, bias)
    for a, a0 in zip((x, weight, bias, state), before):
        np.testing.assert_array_equal(a, a0)


def test_unknown_activation_raises():
    x, weight, bias, state = make_inputs(1, 1, 3, 2, 4, "float32")
    with pytest.raises(InputError, match="activation"):
        causal_conv1d(x, weight, bias, activation="relu")
    with pytest.raises(InputError, match="activation"):
        causal_conv1d_step(x[:, 0], state, weight, bias, activation="gelu")
