// tests/cuda_emu/emu.h: the CUDA C++ subset of kernels_cuda/*.cu, on the host, for tests without a GPU.
//
// This file is what kernel code sees: the CUDA qualifiers, built-in types and variables, and intrinsics
// (__syncthreads, __syncwarp, warp shuffles, atomicAdd, min/max, bit casts). The machinery behind them,
// one fiber per CUDA thread and the checked scheduler, is emu_fibers.h (its header says what is checked).
// compiler.py rewrites __shared__ declarations into emu::static_smem / emu::dynamic_smem, compiles the
// kernel source with g++ -include emu.h, and exports emu_launch plus one emu_body_<kernel> per kernel.
// Not emulated: timing, concurrency between blocks, races beyond the barriers, partial warp masks,
// cooperative groups, textures, fast-math intrinsics (README.md).
#pragma once

#include <math.h>
#include <string.h>

#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __constant__
#define __restrict__ __restrict
#define __launch_bounds__(...)
// compiler.py rewrites every __shared__ declaration it understands; any other form fails to compile here.
#define __shared__ EMU_ERROR_this___shared___declaration_form_is_not_emulated

// ---------------------------------------------------------------------------------------------------
// Built-in types, variables and intrinsics

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

inline uint3 threadIdx, blockIdx;   // set by the scheduler before it resumes a fiber
inline dim3 blockDim, gridDim;

inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }

// CUDA's min/max overloads for every pair of arithmetic types (the usual conversions, as CUDA's do).
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) {
    using T = std::common_type_t<A, B>;
    return T(b) < T(a) ? T(b) : T(a);
}
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) {
    using T = std::common_type_t<A, B>;
    return T(a) < T(b) ? T(b) : T(a);
}

// Atomics: the fibers share one host thread and never switch inside a function, so a plain update is atomic.
template <class T> inline T atomicAdd(T* p, typename std::common_type<T>::type v) {
    const T old = *p;
    *p = old + v;
    return old;
}

#include "emu_fibers.h"

// ---------------------------------------------------------------------------------------------------
// Synchronisation intrinsics (the fiber parks until the scheduler releases it)

// A macro, so the scheduler knows which __syncthreads each thread waits at.
#define __syncthreads() emu::sync_block(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op(emu::WarpOp::sync, mask, 0, 0); }
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    if (width != 32) emu::fail("__shfl_sync with width %d: only width 32 is emulated", width);
    return emu::warp_op(emu::WarpOp::shfl_idx, mask, v, src);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    if (width != 32) emu::fail("__shfl_xor_sync with width %d: only width 32 is emulated", width);
    return emu::warp_op(emu::WarpOp::shfl_xor, mask, v, lane_mask);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    if (width != 32) emu::fail("__shfl_up_sync with width %d: only width 32 is emulated", width);
    return emu::warp_op(emu::WarpOp::shfl_up, mask, v, static_cast<int>(delta));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    if (width != 32) emu::fail("__shfl_down_sync with width %d: only width 32 is emulated", width);
    return emu::warp_op(emu::WarpOp::shfl_down, mask, v, static_cast<int>(delta));
}

// Fast-math intrinsics: glibc declares some of these names (as accurate functions); refuse them all.
#define EMU_FAST_MATH EMU_ERROR_fast_math_intrinsics_are_not_emulated
#define __expf(x) EMU_FAST_MATH
#define __exp10f(x) EMU_FAST_MATH
#define __logf(x) EMU_FAST_MATH
#define __log2f(x) EMU_FAST_MATH
#define __log10f(x) EMU_FAST_MATH
#define __sinf(x) EMU_FAST_MATH
#define __cosf(x) EMU_FAST_MATH
#define __tanf(x) EMU_FAST_MATH
#define __powf(x, y) EMU_FAST_MATH
#define __fdividef(x, y) EMU_FAST_MATH

namespace emu {

// kernel(*(P0*)args[0], *(P1*)args[1], ...): CUDA's kernelParams convention.
template <class... P, size_t... I>
inline void invoke_impl(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}
template <class... P> inline void invoke(void (*kernel)(P...), void** args) {
    invoke_impl(kernel, args, std::index_sequence_for<P...>{});
}

}  // namespace emu
