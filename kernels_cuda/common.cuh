// kernels_cuda/common.cuh: device helpers shared by every kernels_cuda/*.cu file.
//
// Contents: SiLU; warp and block sum reductions; a warp inclusive scan; the E2M1 (NVFP4 nibble) and
// E4M3FN (FP8 scale) decoders of spec section 9.3.
// References: nemo_scratch.ops.conv (silu), nemo_scratch.ops.quant.e2m1_decode / e4m3_decode.
// Test:       tests/test_cuda_compile.py (compiles every file that includes this one);
//             the decoders are checked bit-exactly by the NVFP4 kernel tests that use them.
// Build:      NVRTC through cupy.RawModule (or nvcc -arch=sm_90), -std=c++17, no fast-math.
//
// This header is compiled by NVRTC, which has no C/C++ standard headers: it includes none and uses
// only builtin types and CUDA intrinsics. Every block using the reductions has a multiple of 32 threads
// (full warps), because the shuffles name the full warp mask.
#pragma once

#define FULL_WARP_MASK 0xffffffffu
#define WARP_SIZE 32

// ---------------------------------------------------------------------------------------------------
// Activations

// silu(x) = x * sigmoid(x) = x / (1 + exp(-x))   (expf, not __expf: no fast-math anywhere)
__device__ __forceinline__ float silu_f32(float x) {
    return x / (1.0f + expf(-x));
}

// ---------------------------------------------------------------------------------------------------
// Reductions and scans

// Sum of v over the 32 lanes of a warp; every lane gets the total (butterfly reduction).
__device__ __forceinline__ float warp_sum_f32(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_WARP_MASK, v, offset);
    }
    return v;
}

// Inclusive prefix sum over the 32 lanes: lane j gets v_0 + ... + v_j (Hillis-Steele).
__device__ __forceinline__ float warp_inclusive_scan_f32(float v) {
    const int lane = threadIdx.x & (WARP_SIZE - 1);
    for (int offset = 1; offset < WARP_SIZE; offset <<= 1) {
        const float up = __shfl_up_sync(FULL_WARP_MASK, v, offset);
        if (lane >= offset) v += up;
    }
    return v;
}

// Sum of v over the whole (1-D) block; every thread gets the total.
// scratch: __shared__ float[32]. blockDim.x must be a multiple of 32. Ends with a barrier, so the same
// scratch may be reused by the next call.
__device__ __forceinline__ float block_sum_f32(float v, float* scratch) {
    const int lane = threadIdx.x & (WARP_SIZE - 1);
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    v = warp_sum_f32(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < n_warps) ? scratch[lane] : 0.0f;
        v = warp_sum_f32(v);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

// ---------------------------------------------------------------------------------------------------
// NVFP4 / FP8 decoding (spec section 9.3); bit-exact against nemo_scratch.ops.quant.

// E2M1 value of a 4-bit code sign<<3 | magnitude:
// [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6]
__device__ __constant__ float kE2M1Values[16] = {
    0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
    -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f,
};

__device__ __forceinline__ float e2m1_decode_f32(unsigned int code) {
    return kE2M1Values[code & 0xFu];
}

// The two codes of one packed byte: the low nibble is the even (first) element, the high nibble the odd.
__device__ __forceinline__ float e2m1_decode_low(unsigned char packed) {
    return e2m1_decode_f32(packed & 0xFu);
}
__device__ __forceinline__ float e2m1_decode_high(unsigned char packed) {
    return e2m1_decode_f32(packed >> 4);
}

// E4M3FN value of an 8-bit pattern: s = b>>7, e = (b>>3)&0xF, m = b&7
//   e == 15 and m == 7:  NaN (E4M3FN has no infinities)
//   e == 0 (subnormal):  (-1)^s * 2^-6 * m/8      = (-1)^s * m * 2^-9
//   otherwise (normal):  (-1)^s * 2^(e-7) * (1 + m/8) = (-1)^s * (8 + m) * 2^(e-10)
// Both products are exact in float32 (ldexpf scales by a power of two). 0x80 decodes to -0.0.
__device__ __forceinline__ float e4m3_decode_f32(unsigned int bits) {
    const unsigned int s = (bits >> 7) & 1u;
    const unsigned int e = (bits >> 3) & 0xFu;
    const unsigned int m = bits & 7u;
    if (e == 15u && m == 7u) {
        return __uint_as_float(0x7fc00000u | (s << 31));  // quiet NaN carrying the sign bit
    }
    const float magnitude = (e == 0u) ? ldexpf((float)m, -9) : ldexpf((float)(8u + m), (int)e - 10);
    return s ? -magnitude : magnitude;
}
