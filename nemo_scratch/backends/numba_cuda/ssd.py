"""The Mamba-2 SSD scan (prefill, chunked) and the single-token state update (decode) as Numba-CUDA kernels.

Reference:  nemo_scratch.ops.ssd.ssd_scan_chunked, nemo_scratch.ops.ssd.ssd_step
Test:       tests/test_backend_mamba.py::test_ssd_scan_*, ::test_ssd_step_*
Tolerance:  tests/tolerances.py ("kernel_ssd", "kernel_ssd_step", float32)
Versions (the prefill is four kernels, the four steps of the SSD block decomposition, spec 3.1):
  ssd_chunk_cb_v1_thread_per_entry
      cb[b,c,g,l,s] = C_l . B_s inside each chunk (s <= l), one thread per entry; shared by the h/g heads of a
      group, so the n-long dot products run once.
  ssd_chunk_state_v1_thread_per_entry
      each chunk's own end state, one thread per (b,c,h,p,n), n fastest:
      states[c] = sum_s exp(sum_{k>s} dt_k A) dt_s x_s B_s; also the chunk's total log-decay sum_s dt_s A.
  ssd_state_passing_v1_thread_per_entry
      one thread per (b,h,p,n) walks the chunks in order: the state entering chunk c (overwrites states[c])
      and the final state. Initial state = the cache. (The same idea as kernels_cuda/ssd.cu's.)
  ssd_chunk_scan_v1_thread_per_output
      one thread per y[b,t,h,p], p fastest: the diagonal block (intra-chunk) plus the decayed entering state
      (inter-chunk) plus D x.
  ssd_step_v1_block_per_row
      decode: one block per (b,h,p) row, threads over n, shared-memory reduction for y = sum_n state C;
      new_state may be the state buffer itself (in place).
  Decays are exp of segment sums accumulated from the later end (sum_{k=s+1..l} dt_k A), never differences of
  cumulative sums, which cancel in float32 (the reference's segsum makes the same choice).
  Not here: the v2 kernels of kernels_cuda/ssd.cu (a block per chunk; the chunk scan's decay-masked C.B^T
  tile staged in shared memory, ssd_chunk_scan_v2_smem_tile; a warp per state row in the step).
Build:      @cuda.jit(fastmath=False). float32 compute and float32 state; every index is int64 (numba's intp),
            so b*t*h*p products past 2^31 are safe (the binder runs float64 calls on the reference).
"""

import math

import numpy as np
from numba import cuda, float32

from ...ops.common import get_xp
from .runtime import (JIT, MAX_REDUCE_THREADS, block_sum, contiguous, launch_1d, launch_rows, state_buffer,
                      zeros_if_none)


@cuda.jit(**JIT)
def ssd_chunk_cb_v1_thread_per_entry(B, C, chunk, cb):
    # B, C [b,t,g,n] -> cb [b,nc,g,q,q]: cb[b,c,g,l,s] = sum_n C[b,c*q+l,g,n] B[b,c*q+s,g,n] for s <= l
    i = cuda.grid(1)
    nb, nt, ng, nn = B.shape
    nchunks = cb.shape[1]
    if i >= nb * nchunks * ng * chunk * chunk:
        return
    s = i % chunk
    l = (i // chunk) % chunk
    g = (i // (chunk * chunk)) % ng
    c = (i // (chunk * chunk * ng)) % nchunks
    b = i // (chunk * chunk * ng * nchunks)
    t_l, t_s = c * chunk + l, c * chunk + s
    if s > l or t_l >= nt:
        return  # not causal, or past the end of the last chunk: never read
    acc = float32(0.0)
    for n in range(nn):
        acc += C[b, t_l, g, n] * B[b, t_s, g, n]
    cb[b, c, g, l, s] = acc


@cuda.jit(**JIT)
def ssd_chunk_state_v1_thread_per_entry(x, dt, A, B, chunk, states, chunk_decay):
    # x [b,t,h,p], dt [b,t,h], A [h], B [b,t,g,n] -> states [b,nc,h,p,n], chunk_decay [b,nc,h]
    i = cuda.grid(1)
    nb, nt, nh, np_ = x.shape
    ng, nn = B.shape[2], B.shape[3]
    nchunks = states.shape[1]
    if i >= nb * nchunks * nh * np_ * nn:
        return
    n = i % nn
    p = (i // nn) % np_
    h = (i // (nn * np_)) % nh
    c = (i // (nn * np_ * nh)) % nchunks
    b = i // (nn * np_ * nh * nchunks)
    g = h // (nh // ng)  # head h reads group h // (h/g)
    t0, t1 = c * chunk, min(c * chunk + chunk, nt)
    # states[c] = sum_s exp(seg_s) (dt_s x_s) B_s,  seg_s = sum_{k=s+1..t1-1} dt_k A  (decay to the chunk end)
    seg = float32(0.0)
    acc = float32(0.0)
    for s in range(t1 - 1, t0 - 1, -1):
        dt_bsh = dt[b, s, h]
        acc += math.exp(seg) * (x[b, s, h, p] * dt_bsh) * B[b, s, g, n]
        seg += dt_bsh * A[h]
    states[b, c, h, p, n] = acc
    if p == 0 and n == 0:
        # the chunk's total log-decay sum_{s in chunk} dt_s A, for the state passing
        chunk_decay[b, c, h] = seg


@cuda.jit(**JIT)
def ssd_state_passing_v1_thread_per_entry(states, chunk_decay, initial_state, final_state):
    # states [b,nc,h,p,n] (each chunk's own end state -> the state ENTERING each chunk, in place),
    # chunk_decay [b,nc,h], initial_state [b,h,p,n] -> final_state [b,h,p,n]; one thread per (b,h,p,n)
    i = cuda.grid(1)
    nb, nchunks, nh, np_, nn = states.shape
    if i >= nb * nh * np_ * nn:
        return
    n = i % nn
    p = (i // nn) % np_
    h = (i // (nn * np_)) % nh
    b = i // (nn * np_ * nh)
    state_bhpn = initial_state[b, h, p, n]
    for c in range(nchunks):
        own = states[b, c, h, p, n]
        states[b, c, h, p, n] = state_bhpn
        # S_{c+1} = exp(sum_{s in chunk c} dt_s A) S_c + states[c]
        state_bhpn = math.exp(chunk_decay[b, c, h]) * state_bhpn + own
    final_state[b, h, p, n] = state_bhpn


@cuda.jit(**JIT)
def ssd_chunk_scan_v1_thread_per_output(x, dt, A, C, D, cb, states, chunk, y):
    # x [b,t,h,p], dt [b,t,h], A [h], C [b,t,g,n], D [h], cb [b,nc,g,q,q], states [b,nc,h,p,n] -> y [b,t,h,p]
    i = cuda.grid(1)
    nb, nt, nh, np_ = x.shape
    ng, nn = C.shape[2], C.shape[3]
    if i >= nb * nt * nh * np_:
        return
    p = i % np_
    h = (i // np_) % nh
    t = (i // (np_ * nh)) % nt
    b = i // (np_ * nh * nt)
    g = h // (nh // ng)
    c = t // chunk
    t0 = c * chunk
    # Y_diag[t] = sum_{s=t0..t} cb[t, s] exp(seg_s) (dt_s x_s),  seg_s = sum_{k=s+1..t} dt_k A
    seg = float32(0.0)
    y_diag = float32(0.0)
    for s in range(t, t0 - 1, -1):
        dt_bsh = dt[b, s, h]
        y_diag += cb[b, c, g, t - t0, s - t0] * math.exp(seg) * (x[b, s, h, p] * dt_bsh)
        seg += dt_bsh * A[h]
    # Y_off[t] = exp(sum_{s=t0..t} dt_s A) * sum_n C_t[n] states[c][p, n]   (seg now spans t0..t)
    y_off = float32(0.0)
    for n in range(nn):
        y_off += C[b, t, g, n] * states[b, c, h, p, n]
    # y = Y_diag + Y_off + D x
    y[b, t, h, p] = (y_diag + math.exp(seg) * y_off) + D[h] * x[b, t, h, p]


@cuda.jit(**JIT)
def ssd_step_v1_block_per_row(x, dt, A, B, C, D, state, new_state, y):
    # x [b,h,p], dt [b,h], A [h], B/C [b,g,n], D [h], state [b,h,p,n] -> new_state [b,h,p,n], y [b,h,p]
    # one block per (b,h,p) row; threads stride over n. new_state may alias state: each element is read
    # and written by the same thread.
    smem = cuda.shared.array(MAX_REDUCE_THREADS, float32)
    nb, nh, np_ = x.shape
    ng, nn = B.shape[1], B.shape[2]
    row = cuda.blockIdx.x
    p = row % np_
    h = (row // np_) % nh
    b = row // (np_ * nh)
    g = h // (nh // ng)
    x_bhp = x[b, h, p]
    dt_bh = dt[b, h]
    decay = math.exp(dt_bh * A[h])
    acc = float32(0.0)
    for n in range(cuda.threadIdx.x, nn, cuda.blockDim.x):
        # state_t = exp(dt A) state_{t-1} + (dt x) B
        s = decay * state[b, h, p, n] + (dt_bh * x_bhp) * B[b, g, n]
        new_state[b, h, p, n] = s
        acc += s * C[b, g, n]
    # y = sum_n state_t[n] C[n] + D x
    total = block_sum(acc, smem)
    if cuda.threadIdx.x == 0:
        y[b, h, p] = total + D[h] * x_bhp


def ssd_scan_chunked_numba(x, dt, A, B, C, chunk, D=None, initial_state=None):  # x [b,t,h,p] ... -> [b,t,h,p]
    """Same contract as nemo_scratch.ops.ssd.ssd_scan_chunked -> (y [b,t,h,p], final_state [b,h,p,n])."""
    xp = get_xp(x, dt, A, B, C, D, initial_state)
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    q = min(int(chunk), max(t, 1))  # a chunk longer than the sequence is one chunk of length t
    nc = -(-t // q)
    x, dt, A, B, C = contiguous(xp, x, dt, A, B, C)
    D = zeros_if_none(xp, D, (h,))
    initial_state = zeros_if_none(xp, initial_state, (b, h, p, n))
    cb = xp.empty((b, nc, g, q, q), dtype=np.float32)  # entries past the causal triangle are never read
    states = xp.empty((b, nc, h, p, n), dtype=np.float32)
    chunk_decay = xp.empty((b, nc, h), dtype=np.float32)
    final_state = xp.empty((b, h, p, n), dtype=np.float32)
    y = xp.empty((b, t, h, p), dtype=np.float32)
    launch_1d(ssd_chunk_cb_v1_thread_per_entry, b * nc * g * q * q, B, C, q, cb)
    launch_1d(ssd_chunk_state_v1_thread_per_entry, b * nc * h * p * n, x, dt, A, B, q, states, chunk_decay)
    launch_1d(ssd_state_passing_v1_thread_per_entry, b * h * p * n, states, chunk_decay, initial_state, final_state)
    launch_1d(ssd_chunk_scan_v1_thread_per_output, b * t * h * p, x, dt, A, C, D, cb, states, q, y)
    return y, final_state


def ssd_step_numba(x, dt, A, B, C, D, state, out_state=None):  # [b,h,p], [b,h], [h], [b,g,n] x2, [h]|None, [b,h,p,n]
    """Same contract as nemo_scratch.ops.ssd.ssd_step -> (y [b,h,p], new_state [b,h,p,n]);
    ``out_state=state`` updates the state in place."""
    xp = get_xp(x, dt, A, B, C, D, state)
    b, h, p = x.shape
    n = B.shape[-1]
    x, dt, A, B, C, state = contiguous(xp, x, dt, A, B, C, state)
    D = zeros_if_none(xp, D, (h,))
    new_state = state_buffer(xp, out_state, (b, h, p, n), "ssd_step")
    y = xp.empty((b, h, p), dtype=np.float32)
    launch_rows(ssd_step_v1_block_per_row, b * h * p, n, x, dt, A, B, C, D, state, new_state, y)
    return y, new_state
