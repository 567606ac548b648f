// kernels_cuda/ssd.cu: Mamba-2 SSD, the chunked scan for prefill and the single-token state update (decode).
//
// Reference: nemo_scratch.ops.ssd.ssd_scan_chunked (prefill), nemo_scratch.ops.ssd.ssd_step (decode)
// Test:      tests/test_backend_mamba.py::test_ssd_scan_matches_reference,
//            tests/test_backend_mamba.py::test_ssd_step_matches_reference
// Tolerance: tests/tolerances.py ("kernel_ssd", "float32"), ("kernel_ssd_step", "float32")
// Launcher:  nemo_scratch/backends/cupy/ssd.py (ssd_scan_chunked_cupy, ssd_step_cupy)
// Versions (the prefill is four kernels, one per step of the SSD block decomposition, spec section 3.1):
//   ssd_chunk_state_v2_block_per_chunk
//       step 5: the state each chunk produces from zero, one block per (head, chunk, batch), one thread per
//       (n, p) output at a time.
//   ssd_state_passing_v1_thread_per_entry
//       step 6: the inter-chunk recurrence, one thread per (b, h, n, p) walking the chunks in order; also
//       writes the final state.
//   ssd_chunk_cb_v2_block_per_chunk
//       step 4's C.B^T, once per (group, chunk, batch) and shared by the h/g heads of the group (the dot product
//       does not depend on the head).
//   ssd_chunk_scan_v2_smem_tile
//       steps 3, 4, 7, 8: y = (CB * L) Xd + exp(Acum) C.state + D x; one block per (head, chunk, batch), a
//       tile of l_tile rows of the decay-masked matrix in shared memory at a time.
//   ssd_step_v2_warp_per_row
//       decode: one warp per state row (b, h, p); lanes stride over n; the new state may overwrite the old one
//       (in place).
//   (The v1 kernels of the same steps are the numba backend's: one thread per entry or output.)
// Build:     NVRTC via cupy.RawModule, -std=c++17, no fast-math. float32 inputs, float32 state.
//
// Layouts (row-major, contiguous, float32):
//   x [b,t,h,p]  dt [b,t,h] (already discretized)  A [h] (< 0)  B, C [b,t,g,n]  D [h] or nullptr
//   initial_state [b,h,p,n] or nullptr   y [b,t,h,p]   final_state [b,h,p,n]
//   scratch: chunk_states [b,nc,h,n,p], chunk_log_decay [b,h,nc], cb [b,nc,g,chunk,chunk]
// with nc = ceil(t / chunk). The last chunk may be partial (q_len < chunk): every loop is bounded by
// q_len, which equals the reference's zero padding (padded steps have x = 0 and dt = 0).
// chunk_states keeps p fastest (the transpose of the [.., p, n] state): the chunk scan's lanes run over p,
// so its reads of the state entering a chunk are coalesced.
// Head hh reads group hh / (h / g) (repeat-interleave). Offsets are long long (products exceed 2^31).
// Blocks have a multiple of 32 threads (the cumsum uses a full warp).
#include "common.cuh"

// Inside one chunk of head hh, starting at time t0 with q_len steps (all threads of the block call this):
//   dt_s[l] = dt[b, t0+l, hh]
//   acum[l] = sum_{k <= l} dt_s[k] * A_h          (Acum of spec section 3.1 step 2)
// The prefix sum runs in warp 0, 32 steps at a time, carrying the running total between pieces.
__device__ void ssd_chunk_cumsum(const float* __restrict__ dt, float A_h, long long b, int t0, int q_len,
                                 int n_time, int n_heads, int hh, float* dt_s, float* acum) {
    for (int l = threadIdx.x; l < q_len; l += blockDim.x) {
        dt_s[l] = dt[(b * n_time + t0 + l) * n_heads + hh];
    }
    __syncthreads();
    if (threadIdx.x < WARP_SIZE) {
        const int lane = threadIdx.x;
        float carry = 0.0f;
        for (int base = 0; base < q_len; base += WARP_SIZE) {
            const int l = base + lane;
            float v = (l < q_len) ? dt_s[l] * A_h : 0.0f;
            v = warp_inclusive_scan_f32(v) + carry;
            if (l < q_len) acum[l] = v;
            carry = __shfl_sync(FULL_WARP_MASK, v, WARP_SIZE - 1);
        }
    }
    __syncthreads();
}

// Step 5, per (head hh, chunk ci, batch b) = (blockIdx.x, blockIdx.y, blockIdx.z):
//   chunk_states[b,ci,hh,n,p] = sum_l B[l,n] * exp(acum[last] - acum[l]) * dt[l] * x[l,p]
//   chunk_log_decay[b,hh,ci]  = acum[last]
// Dynamic shared memory: 3 * chunk floats.
extern "C" __global__ void ssd_chunk_state_v2_block_per_chunk(
    const float* __restrict__ x, const float* __restrict__ dt, const float* __restrict__ A,
    const float* __restrict__ B, float* __restrict__ chunk_states, float* __restrict__ chunk_log_decay,
    int n_time, int n_heads, int head_dim, int n_groups, int d_state, int chunk) {
    extern __shared__ float smem[];
    float* acum = smem;                    // [chunk]
    float* dt_s = smem + chunk;            // [chunk]
    float* to_end = smem + 2 * chunk;      // [chunk]  exp(acum[last] - acum[l]) * dt[l]
    const int hh = blockIdx.x, ci = blockIdx.y;
    const long long b = blockIdx.z;
    const int n_chunks = gridDim.y;
    const int t0 = ci * chunk;
    const int q_len = min(chunk, n_time - t0);
    const int gg = hh / (n_heads / n_groups);

    ssd_chunk_cumsum(dt, A[hh], b, t0, q_len, n_time, n_heads, hh, dt_s, acum);
    const float acum_last = acum[q_len - 1];
    for (int l = threadIdx.x; l < q_len; l += blockDim.x) to_end[l] = expf(acum_last - acum[l]) * dt_s[l];
    __syncthreads();

    const float* x_bh = x + (b * n_time + t0) * n_heads * head_dim + (long long)hh * head_dim;  // x[b,t0,hh,:]
    const float* B_bg = B + (b * n_time + t0) * n_groups * d_state + (long long)gg * d_state;   // B[b,t0,gg,:]
    const long long x_step = (long long)n_heads * head_dim;   // one time step in x
    const long long B_step = (long long)n_groups * d_state;   // one time step in B
    float* states_out = chunk_states + ((b * n_chunks + ci) * n_heads + hh) * head_dim * d_state;
    for (int e = threadIdx.x; e < head_dim * d_state; e += blockDim.x) {
        const int n = e / head_dim, p = e % head_dim;
        float acc = 0.0f;
        for (int l = 0; l < q_len; ++l) acc += B_bg[l * B_step + n] * to_end[l] * x_bh[l * x_step + p];
        states_out[e] = acc;
    }
    if (threadIdx.x == 0) chunk_log_decay[(b * n_heads + hh) * n_chunks + ci] = acum_last;
}

// Step 6, one thread per (b, hh, n, p) = idx (the chunk_states order, p fastest):
//   s = initial_state[b,hh,p,n] (or 0);  for ci: chunk_states[ci] <- s (the state entering chunk ci);
//                                               s = exp(chunk_log_decay[ci]) * s + (state chunk ci produced)
//   final_state[b,hh,p,n] = s
// chunk_states is rewritten in place: each entry is read once, then overwritten by the same thread.
extern "C" __global__ void ssd_state_passing_v1_thread_per_entry(
    float* __restrict__ chunk_states, const float* __restrict__ chunk_log_decay,
    const float* __restrict__ initial_state, float* __restrict__ final_state,
    int n_batch, int n_chunks, int n_heads, int head_dim, int d_state) {
    const long long state_size = (long long)head_dim * d_state;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_batch * n_heads * state_size) return;
    const long long np_ = idx % state_size;                     // n * head_dim + p
    const int hh = (int)((idx / state_size) % n_heads);
    const long long b = idx / (state_size * n_heads);
    const int n = (int)(np_ / head_dim), p = (int)(np_ % head_dim);
    const long long state_bhpn = (b * n_heads + hh) * state_size + (long long)p * d_state + n;  // [b,hh,p,n]

    float s = initial_state ? initial_state[state_bhpn] : 0.0f;
    for (int ci = 0; ci < n_chunks; ++ci) {
        const long long off = ((b * n_chunks + ci) * n_heads + hh) * state_size + np_;
        const float produced = chunk_states[off];
        chunk_states[off] = s;
        s = expf(chunk_log_decay[(b * n_heads + hh) * n_chunks + ci]) * s + produced;
    }
    final_state[state_bhpn] = s;
}

// Step 4's contraction over n, per (group gg, chunk ci, batch b) = (blockIdx.x, blockIdx.y, blockIdx.z):
//   cb[b,ci,gg,l,s] = sum_n C[b,t0+l,gg,n] * B[b,t0+s,gg,n]   for s <= l < q_len, else 0
extern "C" __global__ void ssd_chunk_cb_v2_block_per_chunk(
    const float* __restrict__ B, const float* __restrict__ C, float* __restrict__ cb,
    int n_time, int n_groups, int d_state, int chunk) {
    const int gg = blockIdx.x, ci = blockIdx.y;
    const long long b = blockIdx.z;
    const int n_chunks = gridDim.y;
    const int t0 = ci * chunk;
    const int q_len = min(chunk, n_time - t0);
    const long long t_step = (long long)n_groups * d_state;  // one time step in B and C
    const float* B_bg = B + (b * n_time + t0) * t_step + (long long)gg * d_state;   // B[b,t0,gg,:]
    const float* C_bg = C + (b * n_time + t0) * t_step + (long long)gg * d_state;   // C[b,t0,gg,:]
    float* cb_out = cb + ((b * n_chunks + ci) * n_groups + gg) * (long long)chunk * chunk;
    for (int e = threadIdx.x; e < chunk * chunk; e += blockDim.x) {
        const int l = e / chunk, s = e % chunk;
        float acc = 0.0f;
        if (l < q_len && s <= l) {
            for (int n = 0; n < d_state; ++n) acc += C_bg[l * t_step + n] * B_bg[s * t_step + n];
        }
        cb_out[e] = acc;
    }
}

// Steps 3, 4, 7, 8 per (head hh, chunk ci, batch b) = (blockIdx.x, blockIdx.y, blockIdx.z), prev = the
// state entering the chunk (chunk_states after ssd_state_passing):
//   M[l,s]  = cb[l,s] * exp(segsum[l,s]) * dt[s]                            (s <= l; L = exp(segsum))
//   segsum[l,s] = sum_{k=s+1..l} dt[k] A, summed directly like nemo_scratch.ops.ssd.segsum (a difference
//   of cumulative sums acum[l] - acum[s] would cancel in float32 when both are large)
//   y[l,p]  = sum_{s<=l} M[l,s] x[s,p]  +  exp(acum[l]) * sum_n C[l,n] prev[n,p]  +  D[hh] x[l,p]
// Dynamic shared memory: (2 + l_tile) * chunk floats; rows l0 .. l0+l_tile-1 of M at a time.
extern "C" __global__ void ssd_chunk_scan_v2_smem_tile(
    const float* __restrict__ x, const float* __restrict__ dt, const float* __restrict__ A,
    const float* __restrict__ C, const float* __restrict__ D, const float* __restrict__ chunk_states,
    const float* __restrict__ cb, float* __restrict__ y,
    int n_time, int n_heads, int head_dim, int n_groups, int d_state, int chunk, int l_tile) {
    extern __shared__ float smem[];
    float* acum = smem;                    // [chunk]
    float* dt_s = smem + chunk;            // [chunk]
    float* m_tile = smem + 2 * chunk;      // [l_tile, chunk]
    const int hh = blockIdx.x, ci = blockIdx.y;
    const long long b = blockIdx.z;
    const int n_chunks = gridDim.y;
    const int t0 = ci * chunk;
    const int q_len = min(chunk, n_time - t0);
    const int gg = hh / (n_heads / n_groups);
    const float A_h = A[hh];
    const float D_h = D ? D[hh] : 0.0f;

    ssd_chunk_cumsum(dt, A_h, b, t0, q_len, n_time, n_heads, hh, dt_s, acum);

    const long long x_step = (long long)n_heads * head_dim;   // one time step in x and y
    const long long C_step = (long long)n_groups * d_state;   // one time step in C
    const float* x_bh = x + (b * n_time + t0) * x_step + (long long)hh * head_dim;    // x[b,t0,hh,:]
    float* y_bh = y + (b * n_time + t0) * x_step + (long long)hh * head_dim;          // y[b,t0,hh,:]
    const float* C_bg = C + (b * n_time + t0) * C_step + (long long)gg * d_state;     // C[b,t0,gg,:]
    const float* prev = chunk_states + ((b * n_chunks + ci) * n_heads + hh) * (long long)head_dim * d_state;
    const float* cb_bg = cb + ((b * n_chunks + ci) * n_groups + gg) * (long long)chunk * chunk;

    for (int l0 = 0; l0 < q_len; l0 += l_tile) {
        // M[l, s] for the rows l0 <= l < l0 + l_tile (0 above the diagonal and past the chunk)
        for (int e = threadIdx.x; e < l_tile * chunk; e += blockDim.x) {
            const int l = l0 + e / chunk, s = e % chunk;
            float m = 0.0f;
            if (l < q_len && s <= l) {
                float segsum = 0.0f;
                for (int k = s + 1; k <= l; ++k) segsum += dt_s[k] * A_h;
                m = cb_bg[l * chunk + s] * expf(segsum) * dt_s[s];
            }
            m_tile[e] = m;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < l_tile * head_dim; e += blockDim.x) {
            const int li = e / head_dim, p = e % head_dim;
            const int l = l0 + li;
            if (l >= q_len) continue;
            // intra-chunk (diagonal block): sum over s <= l
            float diag = 0.0f;
            for (int s = 0; s <= l; ++s) diag += m_tile[li * chunk + s] * x_bh[s * x_step + p];
            // inter-chunk (off-diagonal): C[l] . prev[:, p]
            float off = 0.0f;
            for (int n = 0; n < d_state; ++n) off += C_bg[l * C_step + n] * prev[(long long)n * head_dim + p];
            y_bh[l * x_step + p] = diag + expf(acum[l]) * off + D_h * x_bh[l * x_step + p];
        }
        __syncthreads();
    }
}

// Decode step, one warp per state row (b, hh, p) = row:
//   new_state[b,hh,p,n] = exp(dt[b,hh] * A[hh]) * state[b,hh,p,n] + dt[b,hh] * B[b,gg,n] * x[b,hh,p]
//   y[b,hh,p]           = sum_n C[b,gg,n] * new_state[b,hh,p,n] + D[hh] * x[b,hh,p]
// x, y: [b,h,p] (flat index = row); dt: [b,h]; B, C: [b,g,n]; state, new_state: [b,h,p,n]. new_state may be
// state itself (an in-place update): each lane reads an element before it writes it, so neither pointer is
// __restrict__.
extern "C" __global__ void ssd_step_v2_warp_per_row(
    const float* __restrict__ x, const float* __restrict__ dt, const float* __restrict__ A,
    const float* __restrict__ B, const float* __restrict__ C, const float* __restrict__ D,
    const float* state, float* new_state, float* __restrict__ y,
    int n_batch, int n_heads, int head_dim, int n_groups, int d_state) {
    const int lane = threadIdx.x & (WARP_SIZE - 1);
    const long long row = (long long)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= (long long)n_batch * n_heads * head_dim) return;  // uniform per warp
    const int hh = (int)((row / head_dim) % n_heads);
    const long long b = row / ((long long)head_dim * n_heads);
    const int gg = hh / (n_heads / n_groups);

    const float dt_bh = dt[b * n_heads + hh];
    const float x_bhp = x[row];
    const float dA = expf(dt_bh * A[hh]);
    const float* B_bg = B + (b * n_groups + gg) * d_state;
    const float* C_bg = C + (b * n_groups + gg) * d_state;
    const float* state_bhp = state + row * d_state;
    float* new_state_bhp = new_state + row * d_state;

    float acc = 0.0f;
    for (int n = lane; n < d_state; n += WARP_SIZE) {
        const float s = dA * state_bhp[n] + dt_bh * B_bg[n] * x_bhp;
        new_state_bhp[n] = s;
        acc += C_bg[n] * s;
    }
    acc = warp_sum_f32(acc);
    if (lane == 0) y[row] = acc + (D ? D[hh] * x_bhp : 0.0f);
}
