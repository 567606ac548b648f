"""Causal depthwise conv1d (+ SiLU) as Numba-CUDA kernels: over a sequence, and one decode step.

Reference:  nemo_scratch.ops.conv.causal_conv1d, nemo_scratch.ops.conv.causal_conv1d_step
Test:       tests/test_backend_mamba.py::test_causal_conv1d_*, ::test_causal_conv1d_step_*
Tolerance:  tests/tolerances.py ("kernel_conv1d", float32)
Versions:
  causal_conv1d_v1_thread_per_output
      one thread per output y[b, t, c] (consecutive threads = consecutive channels, so every load of x is
      coalesced); w multiply-adds from global memory (the w-1 neighbours come from L1). The thread at t = 0
      also writes new_state[b, c]. (kernels_cuda/conv.cu's version of the same name is the same idea.)
  causal_conv1d_step_v1_thread_per_row
      one thread per (b, c): shift the w-column window, append x, convolve. The thread owns its state row, so
      new_state may be the state buffer itself.
  No v2: the conv streams x once and is memory-bound already (w <= 4 in every Nemotron config).
Build:      @cuda.jit(fastmath=False); float32 compute (the binder runs float64 calls on the reference).
"""

import numpy as np
from numba import cuda, float32

from ...ops.common import get_xp
from .runtime import JIT, contiguous, launch_1d, silu, state_buffer, zeros_if_none


@cuda.jit(**JIT)
def causal_conv1d_v1_thread_per_output(x, weight, bias, state, y, new_state, apply_silu):
    # x [b,t,c], weight [c,w], bias [c], state [b,c,w] -> y [b,t,c], new_state [b,c,w]; one thread per y[b,t,c]
    i = cuda.grid(1)
    nb, nt, nc = x.shape
    nw = weight.shape[1]
    if i >= nb * nt * nc:
        return
    c = i % nc
    t = (i // nc) % nt
    b = i // (nc * nt)
    # y[t] = act(sum_j weight[c, j] * xpad[t + j] + bias[c]),  xpad = concat(state[b, c, 1:], x[b, :, c])
    acc = float32(0.0)
    for j in range(nw):
        m = t + j  # position in xpad: its first w-1 entries are state[b, c, 1:]
        xpad_btc = state[b, c, m + 1] if m < nw - 1 else x[b, m - (nw - 1), c]
        acc += weight[c, j] * xpad_btc
    acc += bias[c]
    y[b, t, c] = silu(acc) if apply_silu else acc
    if t == 0:
        # new_state[b, c, k] = concat(state[b, c], x[b, :, c])[t + k]: the last w raw inputs, oldest first
        for k in range(nw):
            m = nt + k
            new_state[b, c, k] = state[b, c, m] if m < nw else x[b, m - nw, c]


@cuda.jit(**JIT)
def causal_conv1d_step_v1_thread_per_row(x, state, weight, bias, y, new_state, apply_silu):
    # x [b,c], state [b,c,w], weight [c,w], bias [c] -> y [b,c], new_state [b,c,w]; one thread per (b, c)
    i = cuda.grid(1)
    nb, nc = x.shape
    nw = weight.shape[1]
    if i >= nb * nc:
        return
    c = i % nc
    b = i // nc
    acc = float32(0.0)
    for j in range(nw):
        # new_state = roll(state, -1) with x as the newest column. Column j+1 is read before column j is
        # written, so new_state may alias state (an in-place update).
        window_bcj = state[b, c, j + 1] if j < nw - 1 else x[b, c]
        new_state[b, c, j] = window_bcj
        # y = sum_j weight[c, j] * new_state[b, c, j] + bias[c]
        acc += window_bcj * weight[c, j]
    acc += bias[c]
    y[b, c] = silu(acc) if apply_silu else acc


def causal_conv1d_numba(x, weight, bias, state=None, activation="silu"):  # [b,t,c], [c,w], [c]|None, [b,c,w]|None
    """Same contract as nemo_scratch.ops.conv.causal_conv1d -> (y [b,t,c], new_state [b,c,w])."""
    b, t, c = x.shape
    w = weight.shape[1]
    xp = get_xp(x, weight, bias, state)
    x, weight = contiguous(xp, x, weight)
    bias = zeros_if_none(xp, bias, (c,))
    state = zeros_if_none(xp, state, (b, c, w))
    y = xp.empty((b, t, c), dtype=np.float32)
    # t == 0: no thread writes new_state, which is then the old state unchanged
    new_state = xp.empty((b, c, w), dtype=np.float32) if t > 0 else xp.array(state, copy=True)
    launch_1d(causal_conv1d_v1_thread_per_output, b * t * c, x, weight, bias, state, y, new_state, activation == "silu")
    return y, new_state


def causal_conv1d_step_numba(x, state, weight, bias, activation="silu", out_state=None):  # [b,c], [b,c,w] ...
    """Same contract as nemo_scratch.ops.conv.causal_conv1d_step -> (y [b,c], new_state [b,c,w]);
    ``out_state=state`` updates the state in place."""
    b, c = x.shape
    w = weight.shape[1]
    xp = get_xp(x, state, weight, bias)
    x, state, weight = contiguous(xp, x, state, weight)
    bias = zeros_if_none(xp, bias, (c,))
    y = xp.empty((b, c), dtype=np.float32)
    new_state = state_buffer(xp, out_state, (b, c, w), "causal_conv1d_step")
    launch_1d(causal_conv1d_step_v1_thread_per_row, b * c, x, state, weight, bias, y, new_state, activation == "silu")
    return y, new_state

