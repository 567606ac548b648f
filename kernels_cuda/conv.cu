// kernels_cuda/conv.cu: causal depthwise conv1d (+ SiLU) of the Mamba-2 mixer, prefill and decode step.
//
// Reference: nemo_scratch.ops.conv.causal_conv1d, nemo_scratch.ops.conv.causal_conv1d_step
// Test:      tests/test_backend_mamba.py::test_causal_conv1d_matches_reference,
//            tests/test_backend_mamba.py::test_causal_conv1d_step_matches_reference
// Tolerance: tests/tolerances.py ("kernel_conv1d", "float32")
// Launcher:  nemo_scratch/backends/cupy/conv.py (causal_conv1d_cupy, causal_conv1d_step_cupy)
// Versions:
//   causal_conv1d_v1_thread_per_output
//       one thread per output (b, t, c); c is the fastest index, so a warp reads 32 neighbouring channels of one
//       time step (coalesced); the w reads of neighbouring t hit L1/L2.
//   causal_conv1d_state_v1_thread_per_entry
//       one thread per new_state entry (b, c, k).
//   causal_conv1d_step_v1_thread_per_row
//       one thread per (b, c): roll its state row left by one, write x last (into new_state, which may be the
//       state itself), convolve.
// Build:     NVRTC via cupy.RawModule, -std=c++17, no fast-math. float32 in, float32 out.
//
// Layouts (row-major, contiguous): x [b,t,c], weight [c,w], bias [c] (or nullptr), state [b,c,w]
// (the last w raw inputs, oldest first; nullptr = zeros), y [b,t,c]. apply_silu: 1 = SiLU, 0 = identity.
#include "common.cuh"

// y[b,t,c] = act(bias[c] + sum_j weight[c,j] * xpad[b, t+j, c]),  xpad = concat(state[b,c,1:], x[b,:,c])
extern "C" __global__ void causal_conv1d_v1_thread_per_output(
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ state, float* __restrict__ y,
    int n_batch, int n_time, int n_chan, int width, int apply_silu) {
    const long long n_out = (long long)n_batch * n_time * n_chan;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_out) return;
    const int c = (int)(idx % n_chan);
    const int t = (int)((idx / n_chan) % n_time);
    const long long b = idx / ((long long)n_chan * n_time);

    const float* x_b = x + b * n_time * n_chan;                         // x[b, :, :]
    const float* weight_c = weight + (long long)c * width;              // weight[c, :]
    const float* state_bc = state ? state + (b * n_chan + c) * width : nullptr;  // state[b, c, :]

    float acc = bias ? bias[c] : 0.0f;
    for (int j = 0; j < width; ++j) {
        // xpad[t + j] is x[pos] with pos = t + j - (w - 1); before the sequence it is state[w + pos]
        const int pos = t + j - (width - 1);
        float xv;
        if (pos >= 0) {
            xv = x_b[(long long)pos * n_chan + c];
        } else {
            xv = state_bc ? state_bc[width + pos] : 0.0f;
        }
        acc += weight_c[j] * xv;
    }
    y[idx] = apply_silu ? silu_f32(acc) : acc;
}

// new_state[b,c,k] = concat(state[b,c,:] or zeros, x[b,:,c])[t + k]   (the last w of the w + t columns)
extern "C" __global__ void causal_conv1d_state_v1_thread_per_entry(
    const float* __restrict__ x, const float* __restrict__ state, float* __restrict__ new_state,
    int n_batch, int n_time, int n_chan, int width) {
    const long long n_out = (long long)n_batch * n_chan * width;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_out) return;
    const int k = (int)(idx % width);
    const int c = (int)((idx / width) % n_chan);
    const long long b = idx / ((long long)width * n_chan);

    const int col = n_time + k;  // column in concat(state, x), which has w + t columns
    float v;
    if (col < width) {
        v = state ? state[(b * n_chan + c) * width + col] : 0.0f;
    } else {
        v = x[(b * n_time + (col - width)) * n_chan + c];
    }
    new_state[idx] = v;
}

// One decode step:
//   new_state[b,c,:] = concat(state[b,c,1:], x[b,c]);  y[b,c] = act(bias[c] + sum_j weight[c,j] * new_state[b,c,j])
// new_state may be state itself (an in-place update): the thread reads column j+1 before it writes column j,
// so neither pointer is __restrict__.
extern "C" __global__ void causal_conv1d_step_v1_thread_per_row(
    const float* __restrict__ x, const float* state, const float* __restrict__ weight,
    const float* __restrict__ bias, float* new_state, float* __restrict__ y,
    int n_batch, int n_chan, int width, int apply_silu) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // = b * n_chan + c
    if (idx >= (long long)n_batch * n_chan) return;
    const int c = (int)(idx % n_chan);
    const float* state_bc = state + idx * width;                        // state[b, c, :]
    float* new_state_bc = new_state + idx * width;                      // new_state[b, c, :]
    const float* weight_c = weight + (long long)c * width;              // weight[c, :]

    float acc = bias ? bias[c] : 0.0f;
    for (int j = 0; j < width; ++j) {
        // roll left by one, the new input last
        const float window_j = (j + 1 < width) ? state_bc[j + 1] : x[idx];
        new_state_bc[j] = window_j;
        acc += weight_c[j] * window_j;
    }
    y[idx] = apply_silu ? silu_f32(acc) : acc;
}
