"""Launchers of kernels_cuda/conv.cu: the causal depthwise conv1d (+ SiLU), prefill and decode step.

Reference:  nemo_scratch.ops.conv.causal_conv1d, nemo_scratch.ops.conv.causal_conv1d_step
Test:       tests/test_backend_mamba.py::test_causal_conv1d_*
Tolerance:  tests/tolerances.py ("kernel_conv1d", float32)
Same contract as the reference (checked by ops/contracts.py before the launch; float32 only). The step's
``out_state`` receives the new state: None allocates it (the input state is left untouched, as in the
reference); ``out_state=state`` is the in-place update of a decode loop.
"""

from .loader import device_f32, get_kernel, i32, launch_1d, state_buffer

CU_FILE = "conv.cu"
KERNELS = {
    "prefill": "causal_conv1d_v1_thread_per_output",
    "prefill_state": "causal_conv1d_state_v1_thread_per_entry",
    "step": "causal_conv1d_step_v1_thread_per_row",
}


def causal_conv1d_cupy(x, weight, bias, state=None, activation="silu"):  # [b,t,c], [c,w], [c]|None, [b,c,w]|None
    """-> (y [b,t,c], new_state [b,c,w])."""
    (b, t, c), w = x.shape, weight.shape[1]
    import cupy as xp

    x, weight, bias, state = device_f32(xp, x, weight, bias, state)
    y = xp.empty((b, t, c), dtype=xp.float32)
    new_state = xp.empty((b, c, w), dtype=xp.float32)
    launch_1d(get_kernel(CU_FILE, KERNELS["prefill"]), b * t * c,
              (x, weight, bias, state, y, i32(b), i32(t), i32(c), i32(w), i32(activation == "silu")))
    launch_1d(get_kernel(CU_FILE, KERNELS["prefill_state"]), b * c * w,
              (x, state, new_state, i32(b), i32(t), i32(c), i32(w)))
    return y, new_state


def causal_conv1d_step_cupy(x, state, weight, bias, activation="silu", out_state=None):  # [b,c], [b,c,w], ...
    """-> (y [b,c], new_state [b,c,w]); new_state is ``out_state`` when given."""
    (b, c), w = x.shape, weight.shape[1]
    import cupy as xp

    new_state = state_buffer(xp, out_state, (b, c, w), "causal_conv1d_step")
    x, state, weight, bias = device_f32(xp, x, state, weight, bias)
    y = xp.empty((b, c), dtype=xp.float32)
    launch_1d(get_kernel(CU_FILE, KERNELS["step"]), b * c,
              (x, state, weight, bias, new_state, y, i32(b), i32(c), i32(w), i32(activation == "silu")))
    return y, new_state
