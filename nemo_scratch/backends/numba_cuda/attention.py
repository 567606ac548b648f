"""GQA attention (no positional encoding) in Numba-CUDA: a tiled online softmax, and split-K for decode.

Reference:  nemo_scratch.ops.attention.gqa_attention, nemo_scratch.ops.attention.gqa_decode
Test:       tests/test_backend_core.py::test_gqa_attention_*, ::test_gqa_decode_*;
            tests/test_backend_numba_only.py::test_attention_*
Tolerance:  tests/tolerances.py ("kernel_attention", float32)
Versions:
  gqa_attention_v1_thread_per_row
      flash-style, one thread per query row. A block holds ROWS rows that share one kv head (row = query * r +
      head-in-group, r = q/kv), so the K/V tiles it stages in shared memory (TILE_K keys at a time) serve every
      query head of the group; all threads read the same key at once (a broadcast, no bank conflicts). Each row
      keeps its running max m, running sum l and unnormalised output acc, and per tile: m' = max(m, max_j s_j),
      l = l e^(m-m') + sum_j e^(s_j-m'), acc = acc e^(m-m') + sum_j e^(s_j-m') v_j. Causal: query i sits at key
      position s - t + i; a block stops at its last row's position and each row masks the keys after its own.
      Prefill: one split, output acc / l.
  gqa_split_merge_v1_thread_per_output
      decode (split-K): the keys are cut into splits of SPLIT_KEYS; gqa_attention_v1_thread_per_row writes each
      split's partial (m, l, acc) and this kernel merges them, one thread per output:
      M = max m_i, o = sum_i e^(m_i-M) acc_i / sum_i e^(m_i-M) l_i.
  Not here: the v2 kernels of kernels_cuda/attention.cu (a warp per row: lanes split dh, shuffle reductions),
  which the simulator the tests run on cannot run (it has no shuffles).
Build:      @cuda.jit(fastmath=False); float32 compute and state (the binder runs float64 calls on the
            reference). The head dim sets the size of two per-thread arrays: kernels are built per power of
            two >= dh; past dh = 192 a tile holds fewer keys (48 KiB of shared memory), past 6144 the kernel
            declines (Unsupported) and the reference runs.
"""

import math
from functools import lru_cache

import numpy as np
from numba import cuda, float32

from ...ops.common import get_xp
from ..gpu_common import Unsupported
from .runtime import JIT, SMEM_LIMIT_BYTES, cdiv, contiguous, launch_1d, simulator_enabled

SIM = simulator_enabled()
# Keys a tile (staged in shared memory) and rows (threads) a block; keys a split in decode.
# Under the simulator (a Python thread per CUDA thread) all three are small; the tests cross them.
TILE_K = 4 if SIM else 32
ROWS = 8 if SIM else 64
SPLIT_KEYS = 2 * TILE_K if SIM else 256


@lru_cache(maxsize=None)
def gqa_attention_v1_thread_per_row(dh_cap):
    """The tiled online-softmax kernel for head dims <= dh_cap; see the header."""

    @cuda.jit(**JIT)
    def kernel(q, k, v, m_part, l_part, acc_part, split_keys, tile_k, causal, normalize, scale):
        # q [b,t,q,dh], k/v [b,s,kv,dh] -> m_part/l_part [b,t,q,n_split], acc_part [b,t,q,n_split,dh]
        kv_tiles = cuda.shared.array(0, float32)  # dynamic: K tile [tile_k, dh] then V tile [tile_k, dh]
        q_row = cuda.local.array(dh_cap, float32)
        acc = cuda.local.array(dh_cap, float32)
        scores = cuda.local.array(TILE_K, float32)
        t, nq, dh = q.shape[1], q.shape[2], q.shape[3]
        s, nkv = k.shape[1], k.shape[2]
        r = nq // nkv
        split = cuda.blockIdx.x
        bb, kvh = cuda.blockIdx.z // nkv, cuda.blockIdx.z % nkv
        row0 = cuda.blockIdx.y * cuda.blockDim.x
        row = row0 + cuda.threadIdx.x
        active = row < t * r
        i_q = row // r
        head = kvh * r + row % r
        # the keys of this split; causal: none after the block's last query (at key position s - t + i)
        key_lo = split * split_keys
        key_hi = min(s, key_lo + split_keys)
        if causal:
            last_q = min(t * r, row0 + cuda.blockDim.x) - 1
            key_hi = min(key_hi, s - t + last_q // r + 1)
        row_hi = key_hi
        if active:
            if causal:
                row_hi = min(key_hi, s - t + i_q + 1)
            for d in range(dh):
                q_row[d] = q[bb, i_q, head, d]
                acc[d] = float32(0.0)
        m = float32(-math.inf)
        l_sum = float32(0.0)
        k_tile = kv_tiles[:tile_k * dh]
        v_tile = kv_tiles[tile_k * dh:2 * tile_k * dh]
        for j0 in range(key_lo, key_hi, tile_k):
            # stage keys j0 .. j0+tile_k-1 of kv head kvh (all threads help, active or not)
            for e in range(cuda.threadIdx.x, tile_k * dh, cuda.blockDim.x):
                j = j0 + e // dh
                k_tile[e] = k[bb, j, kvh, e % dh] if j < key_hi else float32(0.0)
                v_tile[e] = v[bb, j, kvh, e % dh] if j < key_hi else float32(0.0)
            cuda.syncthreads()
            n_keys = min(tile_k, row_hi - j0)
            if active and n_keys > 0:
                # s_j = (q . k_j) * dh**-0.5
                m_new = m
                for jj in range(n_keys):
                    dot = float32(0.0)
                    for d in range(dh):
                        dot += q_row[d] * k_tile[jj * dh + d]
                    scores[jj] = dot * scale
                    m_new = max(m_new, scores[jj])
                # rescale what the earlier tiles summed: alpha = e^(m - m')
                alpha = math.exp(m - m_new)
                l_sum *= alpha
                for d in range(dh):
                    acc[d] *= alpha
                for jj in range(n_keys):
                    # p_j = e^(s_j - m');  l += p_j;  acc += p_j v_j
                    p_j = math.exp(scores[jj] - m_new)
                    l_sum += p_j
                    for d in range(dh):
                        acc[d] += p_j * v_tile[jj * dh + d]
                m = m_new
            cuda.syncthreads()
        if active:
            m_part[bb, i_q, head, split] = m
            l_part[bb, i_q, head, split] = l_sum
            inv = float32(1.0) / l_sum if normalize else float32(1.0)
            for d in range(dh):
                acc_part[bb, i_q, head, split, d] = acc[d] * inv

    return kernel


@cuda.jit(**JIT)
def gqa_split_merge_v1_thread_per_output(m_part, l_part, acc_part, out):
    # [b,t,q,n_split] x2, [b,t,q,n_split,dh] -> out [b,t,q,dh]; one thread per output element
    i = cuda.grid(1)
    b, t, nq, n_split, dh = acc_part.shape
    if i < b * t * nq * dh:
        d = i % dh
        bb, i_q, head = i // (t * nq * dh), (i // (nq * dh)) % t, (i // dh) % nq
        m_max = float32(-math.inf)
        for split in range(n_split):
            m_max = max(m_max, m_part[bb, i_q, head, split])
        # o = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i  (an empty split has m_i = -inf: weight 0)
        num = float32(0.0)
        den = float32(0.0)
        for split in range(n_split):
            w = math.exp(m_part[bb, i_q, head, split] - m_max)
            num += w * acc_part[bb, i_q, head, split, d]
            den += w * l_part[bb, i_q, head, split]
        out[bb, i_q, head, d] = num / den


def _tile_keys(dh):
    """Keys a tile: TILE_K, fewer when K and V tiles of TILE_K keys would pass 48 KiB of shared memory."""
    return max(1, min(TILE_K, SMEM_LIMIT_BYTES // (2 * 4 * dh)))


def _block_rows(rows):
    """Threads a block: ROWS, or fewer for a small problem (a whole number of warps on a GPU)."""
    if SIM:
        return max(1, min(ROWS, rows))
    return min(ROWS, 32 * cdiv(max(rows, 1), 32))


def _attention(q, k, v, causal, split_keys):  # [b,t,q,dh], [b,s,kv,dh] x2 -> [b,t,q,dh]
    """Run gqa_attention_v1_thread_per_row over key splits of ``split_keys``; merge them when there is more than one."""
    xp = get_xp(q, k, v)
    q, k, v = contiguous(xp, q, k, v)
    b, t, nq, dh = q.shape
    s, nkv = k.shape[1], k.shape[2]
    n_split = cdiv(s, split_keys)
    if b * t * nq * dh == 0:
        return xp.zeros((b, t, nq, dh), dtype=np.float32)
    if 2 * 4 * dh > SMEM_LIMIT_BYTES:  # dh > 6144: not even one key's K and V rows fit shared memory
        raise Unsupported(f"head dim dh={dh}: one key's K and V rows exceed the shared memory of a block")
    m_part = xp.empty((b, t, nq, n_split), dtype=np.float32)
    l_part = xp.empty((b, t, nq, n_split), dtype=np.float32)
    acc_part = xp.empty((b, t, nq, n_split, dh), dtype=np.float32)
    rows = t * (nq // nkv)
    threads = _block_rows(rows)
    dh_cap = 1 << (dh - 1).bit_length()
    tile_k = _tile_keys(dh)
    grid = (n_split, cdiv(rows, threads), b * nkv)
    gqa_attention_v1_thread_per_row(dh_cap)[grid, threads, 0, 2 * tile_k * dh * 4](
        q, k, v, m_part, l_part, acc_part, split_keys, tile_k, bool(causal), n_split == 1, np.float32(dh ** -0.5))
    if n_split == 1:
        return acc_part.reshape(b, t, nq, dh)
    out = xp.empty((b, t, nq, dh), dtype=np.float32)
    launch_1d(gqa_split_merge_v1_thread_per_output, out.size, m_part, l_part, acc_part, out)
    return out


def gqa_attention_numba(q, k, v, causal=True):  # [b,t,q,dh], [b,s,kv,dh], [b,s,kv,dh] -> [b,t,q,dh]
    """Same contract as nemo_scratch.ops.attention.gqa_attention: one pass of tiles over all s keys."""
    return _attention(q, k, v, causal, max(1, int(k.shape[1])))


def gqa_decode_numba(q, k, v):  # [b,t,q,dh], [b,s,kv,dh], [b,s,kv,dh] -> [b,t,q,dh]
    """Same contract as nemo_scratch.ops.attention.gqa_decode: split-K over the cache, then a merge."""
    return _attention(q, k, v, True, SPLIT_KEYS)
