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

// silu(x) = x * sigmoid(x), with sigmoid through e = exp(-|x|) <= 1 so nothing overflows:
// sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0. nemo_scratch.ops.norm.sigmoid computes
// 1 / (1 + exp(-x)) and lets exp overflow to inf; the two reach the same limits and agree within a few ulp.
// (expf, not __expf: no fast-math anywhere.)
__device__ __forceinline__ float silu_f32(float x) {
    const float e = expf(-fabsf(x));
    const float sig = (x >= 0.0f) ? 1.0f / (1.0f + e) : e / (1.0f + e);
    return x * sig;
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

// ---------------------------------------------------------------------------------------------------
// For attention.cu, moe.cu and quant.cu: max reduction, packed-weight rows, the warp row dot product.

// NVRTC has no <math.h>: define INFINITY from its bit pattern there (nvcc builds take math.h's).
#ifndef INFINITY
#define INFINITY __uint_as_float(0x7f800000u)
#endif

// Max of v over the 32 lanes of a warp; every lane gets it.
__device__ __forceinline__ float warp_max_f32(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_WARP_MASK, v, offset));
    }
    return v;
}

// A weight stack W[e, n_out, n_in] read 16 inputs at a time (one NVFP4 block). Each format's load16 fills
// vals[i] = code value of W[e, n, k0 + i] (0 past n_in) and returns the factor that turns them into weights:
//   dense   W = vals * 1
//   NVFP4   W = e2m1(code) * (e4m3(block_scale) * global_scale[e])     (spec 9.3; n_in % 16 == 0)
//   FP8     W = e4m3(code) * scale[e]
// Deviation: the matmuls apply the factor once per 16-wide dot product, so each product is rounded in a
// different place than x @ dequantize(W).T; the difference is within ("kernel_quant_matmul", float32).
struct DenseRows {
    const float* w;            // [e, n_out, n_in] float32
    long long n_out, n_in;
    __device__ __forceinline__ float load16(long long e, long long n, long long k0, float (&vals)[16]) const {
        const float* w_en = w + (e * n_out + n) * n_in;
#pragma unroll
        for (int i = 0; i < 16; ++i) vals[i] = (k0 + i < n_in) ? w_en[k0 + i] : 0.0f;
        return 1.0f;
    }
};

struct Nvfp4Rows {
    const unsigned char* packed;        // [e, n_out, n_in/2]  two E2M1 codes per byte, low nibble first
    const unsigned char* block_scale;   // [e, n_out, n_in/16] E4M3FN bit patterns
    const float* global_scale;          // [e]
    long long n_out, n_in;
    __device__ __forceinline__ float load16(long long e, long long n, long long k0, float (&vals)[16]) const {
        const long long row = e * n_out + n;
        // 8 bytes = 16 codes; the row starts at a multiple of 8 bytes because n_in % 16 == 0
        const uint2 bytes = *reinterpret_cast<const uint2*>(packed + row * (n_in / 2) + k0 / 2);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // byte i holds codes 2i (low nibble) and 2i+1 (high); byte 4+i holds codes 8+2i and 8+2i+1
            const unsigned char byte_a = (bytes.x >> (8 * i)) & 0xFFu, byte_b = (bytes.y >> (8 * i)) & 0xFFu;
            vals[2 * i] = e2m1_decode_low(byte_a);
            vals[2 * i + 1] = e2m1_decode_high(byte_a);
            vals[8 + 2 * i] = e2m1_decode_low(byte_b);
            vals[8 + 2 * i + 1] = e2m1_decode_high(byte_b);
        }
        return e4m3_decode_f32(block_scale[row * (n_in / 16) + k0 / 16]) * global_scale[e];
    }
};

struct Fp8Rows {
    const unsigned char* data;   // [e, n_out, n_in] E4M3FN bit patterns
    const float* scale;          // [e]
    long long n_out, n_in;
    __device__ __forceinline__ float load16(long long e, long long n, long long k0, float (&vals)[16]) const {
        const unsigned char* w_en = data + (e * n_out + n) * n_in;
#pragma unroll
        for (int i = 0; i < 16; ++i) vals[i] = (k0 + i < n_in) ? e4m3_decode_f32(w_en[k0 + i]) : 0.0f;
        return scale[e];
    }
};

// vals[i] = row[k0 + i] (0 past n): four float4 loads where aligned, else element by element.
__device__ __forceinline__ void load16_f32(const float* row, long long k0, long long n, float (&vals)[16]) {
    const float* p = row + k0;
    if (k0 + 16 <= n && (reinterpret_cast<unsigned long long>(p) & 15ull) == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float4 f = reinterpret_cast<const float4*>(p)[i];
            vals[4 * i] = f.x; vals[4 * i + 1] = f.y; vals[4 * i + 2] = f.z; vals[4 * i + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) vals[i] = (k0 + i < n) ? p[i] : 0.0f;
    }
}

// One warp: acc[m] = sum_k x_rows[m][k] * W[e, n, k] for the first n_rows of MB activation rows (W4A16 /
// W8A16: the weight is decoded in registers and never written out). Lanes stride over 16-wide input blocks,
// so a warp reads 32 consecutive blocks of the weight row per step; every lane ends with the full sums.
template <int MB, class Weight>
__device__ __forceinline__ void warp_rows_dot(const Weight& w, long long e, long long n,
                                              const float* const (&x_rows)[MB], int n_rows, float (&acc)[MB]) {
    const int lane = threadIdx.x & (WARP_SIZE - 1);
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[m] = 0.0f;
    for (long long k0 = 16LL * lane; k0 < w.n_in; k0 += 16LL * WARP_SIZE) {
        float wv[16];
        const float factor = w.load16(e, n, k0, wv);
#pragma unroll
        for (int m = 0; m < MB; ++m) {
            if (m < n_rows) {
                float xv[16];
                load16_f32(x_rows[m], k0, w.n_in, xv);
                float part = 0.0f;
#pragma unroll
                for (int i = 0; i < 16; ++i) part = fmaf(wv[i], xv[i], part);
                acc[m] = fmaf(factor, part, acc[m]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[m] = warp_sum_f32(acc[m]);
}
