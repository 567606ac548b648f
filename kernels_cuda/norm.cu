// kernels_cuda/norm.cu: RMSNorm (block pre-norm, final norm) and the gated group RMSNorm of the Mamba mixer.
//
// Reference: nemo_scratch.ops.norm.rms_norm, nemo_scratch.ops.norm.gated_rms_norm
// Test:      tests/test_backend_mamba.py::test_rms_norm_matches_reference,
//            tests/test_backend_mamba.py::test_gated_rms_norm_matches_reference
// Tolerance: tests/tolerances.py ("kernel_rms_norm", "float32"), ("kernel_gated_rms_norm", "float32")
// Launcher:  nemo_scratch/backends/cupy/norm.py (rms_norm_cupy, gated_rms_norm_cupy)
// Versions:
//   rms_norm_v1_block_per_group
//       one block per normalised group, here a whole row of width d: block reduction of x^2, then a second
//       pass that rescales (the row is re-read from L1/L2).
//   gated_rms_norm_v1_block_per_group
//       one block per (row, group) of width i/n_groups: the gate g = y * silu(z) is computed in the reduction
//       pass and recomputed in the output pass.
// Build:     NVRTC via cupy.RawModule, -std=c++17, no fast-math. float32 in, float32 out.
// Blocks have a multiple of 32 threads (block_sum_f32 needs full warps).
#include "common.cuh"

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight        x, out: [n_rows, d]
extern "C" __global__ void rms_norm_v1_block_per_group(
    const float* __restrict__ x, const float* __restrict__ weight, float* __restrict__ out,
    long long n_rows, int d, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= n_rows) return;  // uniform per block: the whole block leaves together
    const float* x_r = x + row * d;
    float* out_r = out + row * d;

    float sum_sq = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) sum_sq += x_r[j] * x_r[j];
    sum_sq = block_sum_f32(sum_sq, scratch);

    // r = 1 / sqrt(mean(x^2) + eps)
    const float r = 1.0f / sqrtf(sum_sq / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out_r[j] = x_r[j] * r * weight[j];
}

// g = y * silu(z); per group of width gs = i / n_groups: out = g * rsqrt(mean(g^2) + eps) * weight
// y, z, out: [n_rows, i] with i = n_groups * gs; weight: [i]. Block (row, group) = blockIdx.x.
extern "C" __global__ void gated_rms_norm_v1_block_per_group(
    const float* __restrict__ y, const float* __restrict__ z, const float* __restrict__ weight,
    float* __restrict__ out, long long n_rows, int n_groups, int group_size, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x / n_groups;
    const int group = (int)(blockIdx.x % n_groups);
    if (row >= n_rows) return;  // uniform per block
    const long long offset = row * n_groups * group_size + (long long)group * group_size;
    const float* y_rg = y + offset;                 // y[row, group*gs : (group+1)*gs]
    const float* z_rg = z + offset;
    const float* weight_g = weight + (long long)group * group_size;
    float* out_rg = out + offset;

    float sum_sq = 0.0f;
    for (int j = threadIdx.x; j < group_size; j += blockDim.x) {
        const float g = y_rg[j] * silu_f32(z_rg[j]);
        sum_sq += g * g;
    }
    sum_sq = block_sum_f32(sum_sq, scratch);

    // r = 1 / sqrt(mean(g^2) + eps) over the group
    const float r = 1.0f / sqrtf(sum_sq / (float)group_size + eps);
    for (int j = threadIdx.x; j < group_size; j += blockDim.x) {
        const float g = y_rg[j] * silu_f32(z_rg[j]);
        out_rg[j] = g * r * weight_g[j];
    }
}
