// kernels_cuda/quant.cu: NVFP4 dequantisation and the fused W4A16 / W8A16 matmuls (spec section 9.3).
//
// Reference: nemo_scratch.ops.quant.nvfp4_dequantize, nemo_scratch.ops.quant.nvfp4_matmul,
//            nemo_scratch.ops.quant.fp8_matmul
// Test:      tests/test_backend_quant.py (test_nvfp4_dequantize_*, test_nvfp4_matmul_*, test_fp8_matmul_*,
//            test_matmul_pinned)
// Tolerance: dequantize bit-exact (np.array_equal); matmuls ("kernel_quant_matmul", "float32")
// Launcher:  nemo_scratch/backends/cupy/quant.py (nvfp4_dequantize_cupy, nvfp4_matmul_cupy, fp8_matmul_cupy)
// Versions:
//   nvfp4_dequantize_v1_thread_per_byte
//       one thread per packed byte -> two float32 weights: W[2i] = e2m1(low nibble) * e4m3(scale) * global,
//       W[2i+1] likewise (high).
//   {nvfp4,fp8}_matmul_v2_warp_per_column_m{1,4,16}
//       y[m, n] = sum_k x[m, k] W[n, k] with W decoded in registers, never in global memory: one warp per output
//       column n (a weight row), lanes over 16-wide input blocks (coalesced 8-byte NVFP4 loads), MB activation
//       rows per block so every decoded weight is used MB times (M = 1: GEMV; M <= 16: small-batch GEMM; larger
//       M loops over row chunks in the grid). The dot product is warp_rows_dot of common.cuh, shared with the
//       MoE expert matmuls. (v1, in the numba backend: shared-memory tiles.)
// Build:     NVRTC via cupy.RawModule, -std=c++17, no fast-math.

#include "common.cuh"

constexpr int MM_WARPS = 8;  // output columns per matmul block (one per warp)

// One thread per packed byte i of [..., out, in/2]: the byte's 16-element block has scale index i / 8
// (a row holds in/2 bytes, a multiple of 8), its matrix (leading index) is i / bytes_per_matrix.
// W = e2m1(code) * e4m3(block_scale) * global_scale, multiplied in that order (as the reference).
extern "C" __global__ void nvfp4_dequantize_v1_thread_per_byte(
    const unsigned char* __restrict__ packed, const unsigned char* __restrict__ block_scale,
    const float* __restrict__ global_scale, float* __restrict__ out, long long n_bytes,
    long long bytes_per_matrix) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_bytes) return;
    const float scale = e4m3_decode_f32(block_scale[i / 8]);
    const float global = global_scale[i / bytes_per_matrix];
    out[2 * i] = e2m1_decode_low(packed[i]) * scale * global;
    out[2 * i + 1] = e2m1_decode_high(packed[i]) * scale * global;
}

// grid (ceil(M / MB), ceil(n_out / MM_WARPS)), block MM_WARPS * 32.   x [M, n_in] -> y [M, n_out]
template <int MB, class Weight>
__device__ __forceinline__ void matmul_rows(const Weight& w, const float* __restrict__ x, float* __restrict__ y,
                                            long long M) {
    const long long m0 = (long long)blockIdx.x * MB;
    const long long n = (long long)blockIdx.y * MM_WARPS + threadIdx.x / WARP_SIZE;
    if (n >= w.n_out) return;  // whole warp
    const int n_rows = (int)min((long long)MB, M - m0);
    const float* x_rows[MB];
#pragma unroll
    for (int m = 0; m < MB; ++m) x_rows[m] = x + (m0 + min(m, n_rows - 1)) * w.n_in;
    float acc[MB];
    warp_rows_dot<MB>(w, 0, n, x_rows, n_rows, acc);
    if ((threadIdx.x & (WARP_SIZE - 1)) == 0) {
#pragma unroll
        for (int m = 0; m < MB; ++m) {
            if (m < n_rows) y[(m0 + m) * w.n_out + n] = acc[m];
        }
    }
}

// NVFP4: packed [n_out, n_in/2] uint8, block_scale [n_out, n_in/16] E4M3FN bits, global_scale [1].
// Three row-block sizes MB; the launcher picks the smallest that covers M (16 for M > 4, chunked).
extern "C" __global__ void nvfp4_matmul_v2_warp_per_column_m1(
    const float* __restrict__ x, const unsigned char* __restrict__ packed,
    const unsigned char* __restrict__ block_scale, const float* __restrict__ global_scale,
    float* __restrict__ y, long long M, long long n_out, long long n_in) {
    matmul_rows<1>(Nvfp4Rows{packed, block_scale, global_scale, n_out, n_in}, x, y, M);
}
extern "C" __global__ void nvfp4_matmul_v2_warp_per_column_m4(
    const float* __restrict__ x, const unsigned char* __restrict__ packed,
    const unsigned char* __restrict__ block_scale, const float* __restrict__ global_scale,
    float* __restrict__ y, long long M, long long n_out, long long n_in) {
    matmul_rows<4>(Nvfp4Rows{packed, block_scale, global_scale, n_out, n_in}, x, y, M);
}
extern "C" __global__ void nvfp4_matmul_v2_warp_per_column_m16(
    const float* __restrict__ x, const unsigned char* __restrict__ packed,
    const unsigned char* __restrict__ block_scale, const float* __restrict__ global_scale,
    float* __restrict__ y, long long M, long long n_out, long long n_in) {
    matmul_rows<16>(Nvfp4Rows{packed, block_scale, global_scale, n_out, n_in}, x, y, M);
}

// FP8: data [n_out, n_in] E4M3FN bits, scale [1]
extern "C" __global__ void fp8_matmul_v2_warp_per_column_m1(
    const float* __restrict__ x, const unsigned char* __restrict__ data, const float* __restrict__ scale,
    float* __restrict__ y, long long M, long long n_out, long long n_in) {
    matmul_rows<1>(Fp8Rows{data, scale, n_out, n_in}, x, y, M);
}
extern "C" __global__ void fp8_matmul_v2_warp_per_column_m4(
    const float* __restrict__ x, const unsigned char* __restrict__ data, const float* __restrict__ scale,
    float* __restrict__ y, long long M, long long n_out, long long n_in) {
    matmul_rows<4>(Fp8Rows{data, scale, n_out, n_in}, x, y, M);
}
extern "C" __global__ void fp8_matmul_v2_warp_per_column_m16(
    const float* __restrict__ x, const unsigned char* __restrict__ data, const float* __restrict__ scale,
    float* __restrict__ y, long long M, long long n_out, long long n_in) {
    matmul_rows<16>(Fp8Rows{data, scale, n_out, n_in}, x, y, M);
}
