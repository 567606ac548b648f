// kernels_cuda/moe.cu: the MoE router and the routed experts (dispatch, grouped expert matmuls, combine).
//
// Reference: nemo_scratch.ops.moe.route, nemo_scratch.ops.moe.moe_experts
// Test:      tests/test_backend_core.py (test_route_*, test_moe_experts_*)
// Tolerance: ("kernel_router", "float32") (selection compared exactly, near-ties within float32 rounding
//            excepted), ("kernel_moe", "float32")
// Launcher:  nemo_scratch/backends/cupy/moe.py (route_cupy, moe_experts_cupy)
// Versions:
//   route_v2_warp_argmax
//       one block per ROUTER_TOKENS tokens: the float32 logits (one warp per expert, every gate row read once
//       for all the block's tokens), sigmoid, the biased group-limited top-k by repeated warp argmax (ties ->
//       lower index), normalisation and scaling. For a single decode token the gate matrix is read by one
//       block; a v3 would split the logits over blocks. (v1, in the numba backend: a rank per expert.)
//   moe_count_v1_atomics, moe_offsets_v1_one_thread, moe_scatter_v1_atomics
//       dispatch: tokens per expert (atomics), exclusive prefix sums (one thread: e is at most a few hundred),
//       and the (token, slot) pairs placed expert by expert.
//   moe_matmul_{dense,nvfp4,fp8}_v2_warp_per_column
//       grouped expert matmul: one block = MOE_ROWS rows of ONE expert x MOE_WARPS output columns (one warp per
//       column, warp_rows_dot of common.cuh decodes the packed weight in registers); used for up (rows gathered
//       from x, squared ReLU) and down (rows of h). (v1, in the numba backend: shared-memory tiles.)
//   moe_combine_v1_thread_per_output
//       out[t] = sum_j w[t, j] * y[pos(t, j)] in float32, in slot order: deterministic (no float atomics),
//       whatever order the pairs were placed in.
// Build:     NVRTC via cupy.RawModule, -std=c++17, no fast-math. float32 in, float32 out.

#include "common.cuh"

constexpr int ROUTER_TOKENS = 4;       // tokens per router block (they share every gate row read)
constexpr int MOE_ROWS = 16;           // (token, slot) rows per expert tile: one weight read serves them all
constexpr int MOE_WARPS = 8;           // output columns per matmul block (one per warp)
constexpr int NO_INDEX = 0x7fffffff;   // "no candidate" in an argmax: loses to every real index

// ---------------------------------------------------------------------------------------------------
// Router

// (va, ia) ranks before (vb, ib): the larger score, ties -> the lower index (the reference's stable sort).
__device__ __forceinline__ bool ranks_before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// Warp argmax: every lane brings its best (v, i); every lane leaves with the warp's best.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        const float v_other = __shfl_xor_sync(FULL_WARP_MASK, v, offset);
        const int i_other = __shfl_xor_sync(FULL_WARP_MASK, i, offset);
        if (ranks_before(v_other, i_other, v, i)) { v = v_other; i = i_other; }
    }
}

// The best of scores[first + j], j < count, skipping index `skip` and flagged entries (flags may be null).
__device__ __forceinline__ void warp_best(const float* scores, const unsigned char* flags, int first, int count,
                                          int skip, float& v, int& i) {
    v = -INFINITY;
    i = NO_INDEX;
    for (int j = threadIdx.x & (WARP_SIZE - 1); j < count; j += WARP_SIZE) {
        const int ix = first + j;
        if (ix == skip || (flags != nullptr && flags[ix])) continue;
        if (ranks_before(scores[ix], ix, v, i)) { v = scores[ix]; i = ix; }
    }
    warp_argmax(v, i);
}

// sigma(x) = 1/(1+e^-x) for x >= 0, e^x/(1+e^x) for x < 0, both with e = e^-|x| (no overflow; within a few
// ulp of ops.norm.sigmoid, which lets exp(-x) overflow to inf for the same limits)
__device__ __forceinline__ float sigmoid_f32(float x) {
    const float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// grid ceil(t / ROUTER_TOKENS), any multiple of 32 threads >= 32 * ROUTER_TOKENS (the launcher uses 512),
// dynamic smem ROUTER_TOKENS * (4 * (2 * e + n_group) + e + n_group) bytes.
// x [t, d], gate [e, d], bias [e] (zeros when the model has none) -> idx [t, k] int64, w [t, k].
extern "C" __global__ void route_v2_warp_argmax(
    const float* __restrict__ x, const float* __restrict__ gate, const float* __restrict__ bias,
    long long* __restrict__ idx, float* __restrict__ w, int t, int d, int e, int top_k, int n_group,
    int topk_group, int norm_topk_prob, float routed_scaling_factor) {
    extern __shared__ float smem[];
    float* s_sm = smem;                                    // [ROUTER_TOKENS, e] sigmoid scores
    float* choice_sm = s_sm + ROUTER_TOKENS * e;           // [ROUTER_TOKENS, e] biased, -inf outside kept groups
    float* group_sm = choice_sm + ROUTER_TOKENS * e;       // [ROUTER_TOKENS, n_group] group scores
    unsigned char* taken_sm = reinterpret_cast<unsigned char*>(group_sm + ROUTER_TOKENS * n_group);  // [.., e]
    unsigned char* kept_sm = taken_sm + ROUTER_TOKENS * e;                                          // [.., n_group]
    const int lane = threadIdx.x & (WARP_SIZE - 1), warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    const long long tok0 = (long long)blockIdx.x * ROUTER_TOKENS;
    const int n_tok = (int)min((long long)ROUTER_TOKENS, t - tok0);

    // 1. logits = x gate^T (float32, full width d); s = sigmoid(logits); choice = s + bias
    for (int ex = warp; ex < e; ex += n_warps) {
        float acc[ROUTER_TOKENS];
#pragma unroll
        for (int tt = 0; tt < ROUTER_TOKENS; ++tt) acc[tt] = 0.0f;
        for (int dd = lane; dd < d; dd += WARP_SIZE) {
            const float g = gate[(long long)ex * d + dd];
#pragma unroll
            for (int tt = 0; tt < ROUTER_TOKENS; ++tt) {
                if (tt < n_tok) acc[tt] = fmaf(x[(tok0 + tt) * d + dd], g, acc[tt]);
            }
        }
#pragma unroll
        for (int tt = 0; tt < ROUTER_TOKENS; ++tt) {
            const float logit = warp_sum_f32(acc[tt]);
            if (lane == 0 && tt < n_tok) {
                const float s = sigmoid_f32(logit);
                s_sm[tt * e + ex] = s;
                choice_sm[tt * e + ex] = s + bias[ex];
                taken_sm[tt * e + ex] = 0;
            }
        }
    }
    __syncthreads();

    // 2. selection, one warp per token
    if (warp >= n_tok) return;
    const int tt = warp;
    const float* s_t = s_sm + tt * e;
    float* choice_t = choice_sm + tt * e;
    unsigned char* taken_t = taken_sm + tt * e;
    if (n_group > 1) {  // one group keeps every expert: nothing to mask
        float* group_t = group_sm + tt * n_group;
        unsigned char* kept_t = kept_sm + tt * n_group;
        const int group_size = e / n_group;
        // group score = sum of the top-2 biased scores of the group (a group of one: its only score)
        for (int g = 0; g < n_group; ++g) {
            float v1, v2;
            int i1, i2;
            warp_best(choice_t, nullptr, g * group_size, group_size, -1, v1, i1);
            warp_best(choice_t, nullptr, g * group_size, group_size, i1, v2, i2);
            if (lane == 0) {
                group_t[g] = (group_size == 1) ? v1 : v1 + v2;
                kept_t[g] = 0;
            }
        }
        __syncwarp();
        // keep the topk_group best groups (ties -> lower group index)
        for (int r = 0; r < topk_group; ++r) {
            float v;
            int g;
            warp_best(group_t, kept_t, 0, n_group, -1, v, g);
            if (lane == 0) kept_t[g] = 1;
            __syncwarp();
        }
        // experts of the other groups score -inf
        for (int ex = lane; ex < e; ex += WARP_SIZE) {
            if (!kept_t[ex / group_size]) choice_t[ex] = -INFINITY;
        }
        __syncwarp();
    }
    // idx = top_k of choice, by descending score, ties -> lower index; w = s[idx] (unbiased)
    long long* idx_t = idx + (tok0 + tt) * top_k;
    float* w_t = w + (tok0 + tt) * top_k;
    for (int slot = 0; slot < top_k; ++slot) {
        float v;
        int ex;
        warp_best(choice_t, taken_t, 0, e, -1, v, ex);
        if (lane == 0) {
            taken_t[ex] = 1;
            idx_t[slot] = ex;
            w_t[slot] = s_t[ex];
        }
        __syncwarp();
    }
    if (lane == 0) {
        // w = w / (sum_k w + 1e-20) if norm_topk_prob;  w = w * routed_scaling_factor
        float sum = 0.0f;
        for (int slot = 0; slot < top_k; ++slot) sum += w_t[slot];
        for (int slot = 0; slot < top_k; ++slot) {
            const float wj = norm_topk_prob ? w_t[slot] / (sum + 1e-20f) : w_t[slot];
            w_t[slot] = wj * routed_scaling_factor;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Dispatch: pair p = t * k + j (token t, slot j) goes to expert idx[p]; experts' pairs are contiguous.

// counts[ex] = #{p : idx[p] == ex}       (counts zeroed by the launcher)
extern "C" __global__ void moe_count_v1_atomics(const long long* __restrict__ idx, int* __restrict__ counts,
                                                long long n_pairs) {
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p < n_pairs) atomicAdd(&counts[idx[p]], 1);
}

// One thread. offsets[ex] = sum_{ex' < ex} counts[ex'] (e + 1 entries; offsets[e] = n_pairs);
// tile_offsets likewise over ceil(counts / MOE_ROWS): the grouped matmul's tile -> expert map.
extern "C" __global__ void moe_offsets_v1_one_thread(const int* __restrict__ counts, int* __restrict__ offsets,
                                                     int* __restrict__ tile_offsets, int e) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    offsets[0] = 0;
    tile_offsets[0] = 0;
    for (int ex = 0; ex < e; ++ex) {
        offsets[ex + 1] = offsets[ex] + counts[ex];
        tile_offsets[ex + 1] = tile_offsets[ex] + (counts[ex] + MOE_ROWS - 1) / MOE_ROWS;
    }
}

// pos = offsets[ex] + (arrival order within ex); src_token[pos] = t; pair_pos[p] = pos. (fill zeroed)
extern "C" __global__ void moe_scatter_v1_atomics(const long long* __restrict__ idx, const int* __restrict__ offsets,
                                                  int* __restrict__ fill, int* __restrict__ src_token,
                                                  int* __restrict__ pair_pos, long long n_pairs, int k) {
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n_pairs) return;
    const long long ex = idx[p];
    const int pos = offsets[ex] + atomicAdd(&fill[ex], 1);
    src_token[pos] = (int)(p / k);
    pair_pos[p] = pos;
}

// Grouped matmul, grid (tile bound, ceil(n_out / MOE_WARPS)), block MOE_WARPS * 32.
// out[pos, n] = act(sum_c a[row(pos), c] * W[ex(pos), n, c]), row(pos) = gather ? a_row[pos] : pos;
// act = relu2 (relu(x)^2, the experts' activation) or identity. Tiles past tile_offsets[e] exit at once.
template <class Weight>
__device__ __forceinline__ void moe_matmul_tile(const Weight& w, const float* __restrict__ a,
                                                const int* __restrict__ a_row, int gather,
                                                const int* __restrict__ offsets,
                                                const int* __restrict__ tile_offsets, int e,
                                                float* __restrict__ out, int relu2) {
    const int tile = blockIdx.x;
    if (tile >= tile_offsets[e]) return;
    // ex = the last expert whose first tile is <= tile (experts without rows share its offset)
    int lo = 0, hi = e - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tile_offsets[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    const int ex = lo;
    const int row0 = offsets[ex] + (tile - tile_offsets[ex]) * MOE_ROWS;
    const int n_rows = min(MOE_ROWS, offsets[ex + 1] - row0);
    const long long n = (long long)blockIdx.y * MOE_WARPS + threadIdx.x / WARP_SIZE;
    if (n >= w.n_out) return;  // whole warp

    const float* x_rows[MOE_ROWS];
#pragma unroll
    for (int m = 0; m < MOE_ROWS; ++m) {
        const int pos = row0 + min(m, n_rows - 1);
        x_rows[m] = a + (long long)(gather ? a_row[pos] : pos) * w.n_in;
    }
    float acc[MOE_ROWS];
    warp_rows_dot<MOE_ROWS>(w, ex, n, x_rows, n_rows, acc);
    if ((threadIdx.x & (WARP_SIZE - 1)) == 0) {
#pragma unroll
        for (int m = 0; m < MOE_ROWS; ++m) {
            if (m < n_rows) {
                const float r = fmaxf(acc[m], 0.0f);  // relu2(y) = relu(y)^2
                out[(long long)(row0 + m) * w.n_out + n] = relu2 ? r * r : acc[m];
            }
        }
    }
}

// W dense float32 [e, n_out, n_in]
extern "C" __global__ void moe_matmul_dense_v2_warp_per_column(
    const float* __restrict__ weight, long long n_out, long long n_in, const float* __restrict__ a,
    const int* __restrict__ a_row, int gather, const int* __restrict__ offsets,
    const int* __restrict__ tile_offsets, int e, float* __restrict__ out, int relu2) {
    moe_matmul_tile(DenseRows{weight, n_out, n_in}, a, a_row, gather, offsets, tile_offsets, e, out, relu2);
}

// W NVFP4: packed [e, n_out, n_in/2], block_scale [e, n_out, n_in/16], global_scale [e]
extern "C" __global__ void moe_matmul_nvfp4_v2_warp_per_column(
    const unsigned char* __restrict__ packed, const unsigned char* __restrict__ block_scale,
    const float* __restrict__ global_scale, long long n_out, long long n_in, const float* __restrict__ a,
    const int* __restrict__ a_row, int gather, const int* __restrict__ offsets,
    const int* __restrict__ tile_offsets, int e, float* __restrict__ out, int relu2) {
    moe_matmul_tile(Nvfp4Rows{packed, block_scale, global_scale, n_out, n_in}, a, a_row, gather, offsets, tile_offsets,
                    e, out, relu2);
}

// W FP8: data [e, n_out, n_in] E4M3FN, scale [e]
extern "C" __global__ void moe_matmul_fp8_v2_warp_per_column(
    const unsigned char* __restrict__ data, const float* __restrict__ scale, long long n_out, long long n_in,
    const float* __restrict__ a, const int* __restrict__ a_row, int gather,
    const int* __restrict__ offsets, const int* __restrict__ tile_offsets, int e, float* __restrict__ out,
    int relu2) {
    moe_matmul_tile(Fp8Rows{data, scale, n_out, n_in}, a, a_row, gather, offsets, tile_offsets, e, out, relu2);
}

// out[t, c] = sum_j weights[t, j] * y[pair_pos[t * k + j], c]     (thread per (t, c))
extern "C" __global__ void moe_combine_v1_thread_per_output(const float* __restrict__ y, const int* __restrict__ pair_pos,
                                                            const float* __restrict__ weights, float* __restrict__ out,
                                                            long long t, int k, int l) {
    const long long x_tc = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (x_tc >= t * l) return;
    const long long tok = x_tc / l;
    const int c = (int)(x_tc % l);
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
        const long long p = tok * k + j;
        acc = fmaf(weights[p], y[(long long)pair_pos[p] * l + c], acc);
    }
    out[x_tc] = acc;
}
