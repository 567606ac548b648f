// kernels_cuda/attention.cu: GQA attention without positional encoding: a tiled online softmax (prefill)
// and a split-K pass plus merge (decode).
//
// Reference: nemo_scratch.ops.attention.gqa_attention, nemo_scratch.ops.attention.gqa_decode
// Test:      tests/test_backend_core.py (test_gqa_attention_*, test_gqa_decode_*)
// Tolerance: tests/tolerances.py ("kernel_attention", "float32")
// Launcher:  nemo_scratch/backends/cupy/attention.py (gqa_attention_cupy, gqa_decode_cupy)
// Versions:
//   gqa_attention_v2_warp_per_row
//       one block = ATT_ROWS (query, head) rows of one (batch, kv head); each K/V tile of ATT_TILE keys is
//       staged in shared memory once and used by every query head of the group (the GQA saving); each warp
//       keeps a running max m, sum l and unnormalised output acc per row and rescales them tile by tile
//       (flash-attention online softmax). (v1, in the numba backend: one thread per row.)
//   gqa_decode_v2_splitk_warp_per_row
//       the same inner loop over one slice of the keys per block (split-K over the cache, so a single decode
//       token still fills the GPU); writes the partial (m, l, acc).
//   gqa_split_merge_v2_warp_per_row
//       combines the splits, one warp per output row: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// Build:     NVRTC via cupy.RawModule, -std=c++17, no fast-math (expf is the accurate one).
//
// Layout (row-major, float32, contiguous): q [b,t,nq,dh], k/v [b,s,nkv,dh], out [b,t,nq,dh].
// The t queries are the LAST t of the s keys: query i sits at key position s - t + i and (causal) sees keys
// j <= s - t + i. Query head hq uses kv head hq / (nq / nkv). Inside a block, row r of the (batch, kv head)
// pair is query i = r / group, head hq = kvh * group + r % group (group = nq / nkv): consecutive rows share
// their keys, and causal tile skipping works per block.

#include "common.cuh"

constexpr int ATT_WARPS = 8;                                // warps per block
constexpr int ATT_ROWS_PER_WARP = 4;                        // rows each warp carries through the key loop
constexpr int ATT_ROWS = ATT_WARPS * ATT_ROWS_PER_WARP;     // rows per block (32: one Ultra decode group)
constexpr int ATT_TILE = 32;                                // keys per shared-memory tile (one per lane)
constexpr int ATT_MAX_DH = 256;                             // head dim limit (registers: ATT_DPL per lane)
constexpr int ATT_DPL = ATT_MAX_DH / 32;                    // output dims per lane: d = lane + 32 * c

// Online-softmax state of one row, held by one warp: lane owns output dims d = lane + 32 * c.
struct RowState {
    float m;                 // running max of the scores seen so far (-inf before the first key)
    float l;                 // running sum of e^(score - m)
    float acc[ATT_DPL];      // running sum of e^(score - m) * v[key, d]
};

// Shared memory of one block: q rows [ATT_ROWS][dh], a K tile [ATT_TILE][dh + 1] (+1: lanes read different keys
// at the same d without bank conflicts), a V tile [ATT_TILE][dh].
__host__ __device__ constexpr long long att_smem_floats(int dh) {
    return (long long)ATT_ROWS * dh + (long long)ATT_TILE * (dh + 1) + (long long)ATT_TILE * dh;
}

// The key position of row `row` (its query) in the cache: queries are the last t of the s keys.
__device__ __forceinline__ int att_query_pos(int row, int group, int t, int s) { return s - t + row / group; }

// Run the rows [row0, row0 + ATT_ROWS) of (batch bb, kv head kvh) over keys [key_begin, key_end).
// On return st[rr] holds the state of row row0 + warp * ATT_ROWS_PER_WARP + rr (unnormalised).
__device__ void att_attend_keys(const float* __restrict__ q, const float* __restrict__ k,
                                const float* __restrict__ v, int bb, int kvh, int t, int s, int nq, int nkv,
                                int dh, int causal, int row0, int key_begin, int key_end, float scale,
                                float* smem, RowState (&st)[ATT_ROWS_PER_WARP]) {
    const int group = nq / nkv;
    const int n_rows = t * group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* q_s = smem;                                  // [ATT_ROWS][dh]
    float* k_s = q_s + ATT_ROWS * dh;                   // [ATT_TILE][dh + 1]
    float* v_s = k_s + ATT_TILE * (dh + 1);             // [ATT_TILE][dh]

    // Stage this block's query rows (zeros past the last row).
    for (int x = threadIdx.x; x < ATT_ROWS * dh; x += blockDim.x) {
        const int r = x / dh, d = x % dh, row = row0 + r;
        float val = 0.f;
        if (row < n_rows) {
            const int hq = kvh * group + row % group;
            val = q[(((long long)bb * t + row / group) * nq + hq) * dh + d];
        }
        q_s[x] = val;
    }
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; ++rr) {
        st[rr].m = -INFINITY;
        st[rr].l = 0.f;
#pragma unroll
        for (int c = 0; c < ATT_DPL; ++c) st[rr].acc[c] = 0.f;
    }
    // Causal: no row of this block sees past the query position of its last row.
    const int last_row = min(row0 + ATT_ROWS, n_rows) - 1;
    const int key_stop = causal ? min(key_end, att_query_pos(last_row, group, t, s) + 1) : key_end;

    for (int tile0 = key_begin; tile0 < key_stop; tile0 += ATT_TILE) {
        __syncthreads();  // the previous tile (and the q rows) are no longer being written
        for (int x = threadIdx.x; x < ATT_TILE * dh; x += blockDim.x) {
            const int jj = x / dh, d = x % dh, j = tile0 + jj;
            float kv_k = 0.f, kv_v = 0.f;
            if (j < key_stop) {
                const long long kv_bsd = (((long long)bb * s + j) * nkv + kvh) * dh + d;
                kv_k = k[kv_bsd];
                kv_v = v[kv_bsd];
            }
            k_s[jj * (dh + 1) + d] = kv_k;
            v_s[jj * dh + d] = kv_v;
        }
        __syncthreads();

#pragma unroll
        for (int rr = 0; rr < ATT_ROWS_PER_WARP; ++rr) {
            const int r = warp * ATT_ROWS_PER_WARP + rr, row = row0 + r;
            if (row >= n_rows) continue;  // warp-uniform
            // score_j = (q . k_j) * dh^-0.5 for this lane's key j; masked keys score -inf.
            const int j = tile0 + lane;
            const bool valid = j < key_stop && (!causal || j <= att_query_pos(row, group, t, s));
            float dot = 0.f;
            for (int d = 0; d < dh; ++d) dot = fmaf(q_s[r * dh + d], k_s[lane * (dh + 1) + d], dot);
            const float score = valid ? dot * scale : -INFINITY;
            // m_new = max(m, max_j score_j); alpha = e^(m - m_new) rescales what was accumulated so far.
            const float m_new = fmaxf(st[rr].m, warp_max_f32(score));
            if (m_new == -INFINITY) continue;  // no visible key yet (warp-uniform)
            const float alpha = expf(st[rr].m - m_new);
            // p_j = e^(score_j - m_new);  l = alpha * l + sum_j p_j
            const float p = valid ? expf(score - m_new) : 0.f;
            st[rr].l = st[rr].l * alpha + warp_sum_f32(p);
            // acc[d] = alpha * acc[d] + sum_j p_j * v[j, d]
#pragma unroll
            for (int c = 0; c < ATT_DPL; ++c) st[rr].acc[c] *= alpha;
            for (int jj = 0; jj < ATT_TILE; ++jj) {
                const float p_j = __shfl_sync(FULL_WARP_MASK, p, jj);
#pragma unroll
                for (int c = 0; c < ATT_DPL; ++c) {
                    const int d = lane + 32 * c;
                    if (d < dh) st[rr].acc[c] = fmaf(p_j, v_s[jj * dh + d], st[rr].acc[c]);
                }
            }
            st[rr].m = m_new;
        }
    }
}

// Prefill: grid (ceil(t * group / ATT_ROWS), nkv, b), block ATT_WARPS * 32, smem att_smem_floats(dh) floats.
// out = softmax(q k^T * dh^-0.5 + causal mask) v, i.e. acc / l once every key has been seen.
extern "C" __global__ void gqa_attention_v2_warp_per_row(const float* __restrict__ q, const float* __restrict__ k,
                                                         const float* __restrict__ v, float* __restrict__ out,
                                                         int t, int s, int nq, int nkv, int dh, int causal,
                                                         float scale) {
    extern __shared__ float smem[];
    const int row0 = blockIdx.x * ATT_ROWS, kvh = blockIdx.y, bb = blockIdx.z;
    RowState st[ATT_ROWS_PER_WARP];
    att_attend_keys(q, k, v, bb, kvh, t, s, nq, nkv, dh, causal, row0, 0, s, scale, smem, st);

    const int group = nq / nkv, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; ++rr) {
        const int row = row0 + warp * ATT_ROWS_PER_WARP + rr;
        if (row >= t * group) continue;
        const int hq = kvh * group + row % group;
        float* out_btq = out + (((long long)bb * t + row / group) * nq + hq) * dh;
#pragma unroll
        for (int c = 0; c < ATT_DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < dh) out_btq[d] = st[rr].acc[c] / st[rr].l;
        }
    }
}

// Decode, pass 1: grid (n_split, ceil(t * group / ATT_ROWS), b * nkv); split sp covers keys
// [sp * keys_per_split, min(s, (sp + 1) * keys_per_split)). Partials, indexed by the output row
// row_btq = (bb * t + i) * nq + hq:  m_part/l_part [b*t*nq, n_split], acc_part [b*t*nq, n_split, dh].
// A split that sees no key of a row (causal) leaves m = -inf, l = 0, acc = 0: it weighs nothing in the merge.
extern "C" __global__ void gqa_decode_v2_splitk_warp_per_row(const float* __restrict__ q, const float* __restrict__ k,
                                                             const float* __restrict__ v, float* __restrict__ m_part,
                                                             float* __restrict__ l_part, float* __restrict__ acc_part,
                                                             int t, int s, int nq, int nkv, int dh, int causal, float scale,
                                                             int keys_per_split) {
    extern __shared__ float smem[];
    const int sp = blockIdx.x, n_split = gridDim.x, row0 = blockIdx.y * ATT_ROWS;
    const int bb = blockIdx.z / nkv, kvh = blockIdx.z % nkv;
    const int key_begin = sp * keys_per_split, key_end = min(s, key_begin + keys_per_split);
    RowState st[ATT_ROWS_PER_WARP];
    att_attend_keys(q, k, v, bb, kvh, t, s, nq, nkv, dh, causal, row0, key_begin, key_end, scale, smem, st);

    const int group = nq / nkv, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; ++rr) {
        const int row = row0 + warp * ATT_ROWS_PER_WARP + rr;
        if (row >= t * group) continue;
        const int hq = kvh * group + row % group;
        const long long part_btq = (((long long)bb * t + row / group) * nq + hq) * n_split + sp;
        if (lane == 0) {
            m_part[part_btq] = st[rr].m;
            l_part[part_btq] = st[rr].l;
        }
#pragma unroll
        for (int c = 0; c < ATT_DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < dh) acc_part[part_btq * dh + d] = st[rr].acc[c];
        }
    }
}

// Decode, pass 2: one warp per output row (grid ceil(n_out_rows / 4), block 128).
// M = max_s m_s;  out[d] = sum_s e^(m_s - M) acc_s[d] / sum_s e^(m_s - M) l_s.
extern "C" __global__ void gqa_split_merge_v2_warp_per_row(const float* __restrict__ m_part, const float* __restrict__ l_part,
                                                           const float* __restrict__ acc_part, float* __restrict__ out,
                                                           long long n_out_rows, int n_split, int dh) {
    const int lane = threadIdx.x & 31;
    const long long row_btq = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row_btq >= n_out_rows) return;
    const float* m_s = m_part + row_btq * n_split;
    const float* l_s = l_part + row_btq * n_split;
    float m_max = -INFINITY;
    for (int sp = 0; sp < n_split; ++sp) m_max = fmaxf(m_max, m_s[sp]);
    float l_sum = 0.f;
    for (int sp = 0; sp < n_split; ++sp) l_sum += (l_s[sp] > 0.f) ? expf(m_s[sp] - m_max) * l_s[sp] : 0.f;
    for (int d = lane; d < dh; d += 32) {
        float o = 0.f;
        for (int sp = 0; sp < n_split; ++sp) {
            if (l_s[sp] > 0.f) o = fmaf(expf(m_s[sp] - m_max), acc_part[(row_btq * n_split + sp) * dh + d], o);
        }
        out[row_btq * dh + d] = o / l_sum;
    }
}
