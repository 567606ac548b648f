"""The MoE router and the routed experts in Numba-CUDA.

Reference:  nemo_scratch.ops.moe.route, nemo_scratch.ops.moe.moe_experts (nemo_scratch.ops.moe.mlp runs the
            packed matmuls of quant.py)
Test:       tests/test_backend_core.py::test_route_*, ::test_moe_experts_*, ::test_mlp_*
Tolerance:  selection identical (same experts, same order); weights ("kernel_router", float32);
            experts ("kernel_moe", float32)
Versions:
  route_v1_rank_select
      one block per TOKENS tokens. The threads take an expert each: float32 logits over the full width d (x
      staged in shared memory D_CHUNK columns at a time, every gate element read once per block), then
      s = sigmoid, sc = s + bias, both kept in shared memory. Group-limited top-k and top-k are both a RANK:
      rank(e) = #{e' : sc[e'] > sc[e], or sc[e'] == sc[e] and e' < e}; e is picked, in slot rank(e), when
      rank(e) < k. That is exactly the reference order (descending biased score, ties to the lower index) with
      no sort and no inter-thread communication. Groups are ranked the same way on the sum of their top-2
      scores; experts of dropped groups score -inf. Weights w = s[idx], then w / (sum w + 1e-20) *
      routed_scaling_factor by one thread a token.
  moe_count_v1_atomics, moe_offsets_v1_one_thread, moe_scatter_v1_atomics
      tokens grouped by expert: count the (token, slot) pairs of each expert (integer atomics), an exclusive
      prefix sum by one thread gives each expert's offsets, a scatter writes the permutation (pair ids, expert
      by expert; the order inside an expert is free). The same ideas as kernels_cuda/moe.cu's.
  the experts: two grouped GEMMs (quant.matmul_v1_smem_tile, one group per expert, the weight format decoded
      on the fly): h = relu2(x[tok] up[e]^T) in permuted order, y[pair] = h down[e]^T back in pair order.
      Only the experts that were hit get GEMM blocks (the decode case: k of e experts).
  moe_combine_v1_thread_per_output
      out[t] = sum_j w[t,j] y[t*k+j] in float32, in slot order (deterministic: each pair owns its row of y, so
      no float atomics are needed).
Build:      @cuda.jit(fastmath=False); float32 compute (the binder runs float64 calls on the reference; the
            router declines a packed gate, and more experts than fit shared memory, with Unsupported).
"""

import math

import numpy as np
from numba import cuda, float32, int32

from ...ops.common import get_xp
from ...ops.formats import FP8Weight, NVFP4Weight, is_packed
from ..gpu_common import Unsupported
from .quant import ACT_NONE, ACT_RELU2, grouped_matmul, weight_arrays
from .runtime import JIT, SMEM_LIMIT_BYTES, cdiv, contiguous, launch_1d, simulator_enabled

SIM = simulator_enabled()
TOKENS = 2 if SIM else 4          # tokens a router block
ROUTER_THREADS = 16 if SIM else 128
D_CHUNK = 8 if SIM else 256       # columns of x staged at a time


# ---------------------------------------------------------------------------------------------------------
# Router

@cuda.jit(device=True, **JIT)
def _rank(scores, base, i, n):
    # how many of scores[base : base+n] come before entry i: larger, or equal with a lower index
    v = scores[base + i]
    rank = 0
    for j in range(n):
        u = scores[base + j]
        if u > v or (u == v and j < i):
            rank += 1
    return rank


@cuda.jit(**JIT)
def route_v1_rank_select(x, gate, bias, idx_out, w_out, tokens, d_chunk, n_group, topk_group, normalize, scaling):
    # x [t,d], gate [e,d], bias [e] (zeros when None) -> idx_out [t,k] int64, w_out [t,k]
    smem = cuda.shared.array(0, float32)
    t, d = x.shape
    e = gate.shape[0]
    k = idx_out.shape[1]
    gsize = e // n_group
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    t0 = cuda.blockIdx.x * tokens
    nt_here = min(tokens, t - t0)
    xs = smem[:tokens * d_chunk]                                               # [tokens, d_chunk]
    s = smem[tokens * d_chunk:tokens * (d_chunk + e)]                          # [tokens, e] sigmoid
    sc = smem[tokens * (d_chunk + e):tokens * (d_chunk + 2 * e)]               # [tokens, e] biased
    gs = smem[tokens * (d_chunk + 2 * e):tokens * (d_chunk + 2 * e + n_group)]  # [tokens, n_group]
    logit = cuda.local.array(16, float32)  # tokens <= 16
    for i in range(tid, tokens * e, nt):
        s[i] = float32(0.0)
    # logits[tb, ex] = x[t0+tb] . gate[ex], float32, chunk by chunk of d
    for d0 in range(0, d, d_chunk):
        cuda.syncthreads()
        for i in range(tid, tokens * d_chunk, nt):
            tb, j = i // d_chunk, d0 + i % d_chunk
            xs[i] = x[t0 + tb, j] if tb < nt_here and j < d else float32(0.0)
        cuda.syncthreads()
        for ex in range(tid, e, nt):
            for tb in range(tokens):
                logit[tb] = s[tb * e + ex]
            for j in range(min(d_chunk, d - d0)):
                g_ej = gate[ex, d0 + j]
                for tb in range(tokens):
                    logit[tb] += xs[tb * d_chunk + j] * g_ej
            for tb in range(tokens):
                s[tb * e + ex] = logit[tb]
    cuda.syncthreads()
    for i in range(tid, tokens * e, nt):
        # s = sigmoid(logit), through e^-|logit| (no overflow; ops.norm.sigmoid's 1/(1+e^-x) agrees within a
        # few ulp); sc = s + bias (selection only)
        z = s[i]
        ez = math.exp(-abs(z))
        s[i] = float32(1.0) / (float32(1.0) + ez) if z >= 0 else ez / (float32(1.0) + ez)
        sc[i] = s[i] + bias[i % e]
    cuda.syncthreads()
    if n_group > 1:
        for i in range(tid, tokens * n_group, nt):
            # group score = sum of the group's top-2 biased scores (its only score for a group of one)
            base = (i // n_group) * e + (i % n_group) * gsize
            top1 = float32(-math.inf)
            top2 = float32(-math.inf)
            for j in range(gsize):
                u = sc[base + j]
                if u > top1:
                    top2 = top1
                    top1 = u
                elif u > top2:
                    top2 = u
            gs[i] = top1 + top2 if gsize > 1 else top1
        cuda.syncthreads()
        for i in range(tid, tokens * e, nt):
            # experts of a group outside the topk_group best groups score -inf
            tb, grp = i // e, (i % e) // gsize
            if _rank(gs, tb * n_group, grp, n_group) >= topk_group:
                sc[i] = float32(-math.inf)
        cuda.syncthreads()
    for i in range(tid, nt_here * e, nt):
        # expert ex takes slot rank(ex) when that is < k; w = s[ex] (unbiased)
        tb, ex = i // e, i % e
        slot = _rank(sc, tb * e, ex, e)
        if slot < k:
            idx_out[t0 + tb, slot] = ex
            w_out[t0 + tb, slot] = s[i]
    cuda.syncthreads()
    for tb in range(tid, nt_here, nt):
        total = float32(0.0)
        for j in range(k):
            total += w_out[t0 + tb, j]
        # w = w / (sum_k w + 1e-20) (norm_topk_prob), then w * routed_scaling_factor
        for j in range(k):
            w_j = w_out[t0 + tb, j]
            if normalize:
                w_j = w_j / (total + float32(1e-20))
            w_out[t0 + tb, j] = w_j * scaling


def route_numba(x, gate_weight, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                routed_scaling_factor=1.0):  # [t,d], [e,d], [e]|None -> (idx [t,k] int64, w [t,k])
    """Same contract as nemo_scratch.ops.moe.route."""
    if is_packed(gate_weight):
        raise Unsupported("a packed router gate: the reference decodes it through linear")
    (t, d), e = x.shape, gate_weight.shape[0]
    d_chunk = min(D_CHUNK, max(1, d))
    # shared memory: x chunk + s + sc + group scores, float32, for `tokens` tokens (at most 16: the logit array)
    per_token = 4 * (d_chunk + 2 * e + n_group)
    tokens = max(1, min(TOKENS, SMEM_LIMIT_BYTES // per_token))
    if tokens * per_token > SMEM_LIMIT_BYTES:  # > ~6000 experts
        raise Unsupported(f"e={e} experts: one token's scores exceed the shared memory of a block")
    xp = get_xp(x, gate_weight, correction_bias)
    bias = xp.zeros(e, dtype=np.float32) if correction_bias is None else correction_bias
    x, gate_weight, bias = contiguous(xp, x, gate_weight, bias)
    idx = xp.empty((t, top_k), dtype=np.int64)
    w = xp.empty((t, top_k), dtype=np.float32)
    if t:
        route_v1_rank_select[cdiv(t, tokens), ROUTER_THREADS, 0, tokens * per_token](
            x, gate_weight, bias, idx, w, tokens, d_chunk, n_group, topk_group, bool(norm_topk_prob),
            np.float32(routed_scaling_factor))
    return idx, w


# ---------------------------------------------------------------------------------------------------------
# Experts: dispatch, grouped GEMMs, combine

@cuda.jit(**JIT)
def moe_count_v1_atomics(idx_flat, counts):
    # idx_flat [t*k] -> counts[e] += 1 for each pair
    pair = cuda.grid(1)
    if pair < idx_flat.shape[0]:
        cuda.atomic.add(counts, idx_flat[pair], int32(1))


@cuda.jit(**JIT)
def moe_offsets_v1_one_thread(counts, offsets):
    # exclusive prefix sum: offsets[0] = 0, offsets[ex+1] = offsets[ex] + counts[ex] (e is small: one thread)
    if cuda.grid(1) == 0:
        offsets[0] = 0
        for ex in range(counts.shape[0]):
            offsets[ex + 1] = offsets[ex] + counts[ex]


@cuda.jit(**JIT)
def moe_scatter_v1_atomics(idx_flat, k, offsets, fill, perm, tok_rows):
    # pair p = t*k + j goes to position offsets[e] + (arrival order within e); perm = pair, tok_rows = token
    pair = cuda.grid(1)
    if pair < idx_flat.shape[0]:
        ex = idx_flat[pair]
        pos = offsets[ex] + cuda.atomic.add(fill, ex, int32(1))
        perm[pos] = pair
        tok_rows[pos] = pair // k


@cuda.jit(**JIT)
def moe_combine_v1_thread_per_output(y, weights, out):
    # y [t*k, l] (pair order), weights [t,k] -> out [t,l] = sum_j weights[t,j] * y[t*k+j]; one thread an output
    i = cuda.grid(1)
    t, l = out.shape
    k = weights.shape[1]
    if i < t * l:
        tok, c = i // l, i % l
        acc = float32(0.0)
        for j in range(k):
            acc += weights[tok, j] * y[tok * k + j, c]
        out[tok, c] = acc


def _expert_weights(xp, w):
    """(format, fetch arrays) of a stacked expert weight: dense [e,o,i], NVFP4Weight or FP8Weight stacks."""
    if isinstance(w, NVFP4Weight):
        return "nvfp4", weight_arrays(xp, (w.packed, w.block_scale, w.global_scale), "nvfp4")
    if isinstance(w, FP8Weight):
        return "fp8", weight_arrays(xp, (w.data, w.scale), "fp8")
    return "dense", weight_arrays(xp, w, "dense")


def moe_experts_numba(x, idx, weights, up, down):  # [t,l], [t,k], [t,k], [e,f,l], [e,l,f] -> [t,l]
    """Same contract as nemo_scratch.ops.moe.moe_experts (ids in range and distinct: the contract checked)."""
    xp = get_xp(x, idx, weights)
    (t, l), (e, f), k = x.shape, up.shape[:2], idx.shape[1]
    pairs = t * k
    out = xp.zeros((t, l), dtype=np.float32)
    if pairs == 0 or l == 0:
        return out
    x, weights = contiguous(xp, x, weights)
    idx_flat = xp.ascontiguousarray(idx.reshape(-1), dtype=np.int64)
    # dispatch: counts -> offsets (prefix sum) -> permutation
    counts = xp.zeros(e, dtype=np.int32)
    launch_1d(moe_count_v1_atomics, pairs, idx_flat, counts)
    offsets = xp.empty(e + 1, dtype=np.int64)
    moe_offsets_v1_one_thread[1, 1](counts, offsets)
    perm = xp.empty(pairs, dtype=np.int64)
    tok_rows = xp.empty(pairs, dtype=np.int64)
    launch_1d(moe_scatter_v1_atomics, pairs, idx_flat, k, offsets, xp.zeros(e, dtype=np.int32), perm, tok_rows)
    ident = xp.arange(pairs, dtype=np.int64)
    hit = xp.nonzero(counts)[0].astype(np.int64)  # the experts with tokens: one GEMM group each
    max_rows = int(counts.max())
    # h = relu2(x[tok] up[e]^T)   [pairs, f], permuted order
    h = xp.empty((pairs, f), dtype=np.float32)
    fmt, arrays = _expert_weights(xp, up)
    grouped_matmul(fmt, x, tok_rows, offsets, hit, arrays, h, ident, ACT_RELU2, max_rows)
    # y[pair] = h down[e]^T         [pairs, l], pair order
    y = xp.empty((pairs, l), dtype=np.float32)
    fmt, arrays = _expert_weights(xp, down)
    grouped_matmul(fmt, h, ident, offsets, hit, arrays, y, perm, ACT_NONE, max_rows)
    # out[t] = sum_j w[t, j] y[t*k + j]
    launch_1d(moe_combine_v1_thread_per_output, t * l, y, weights, out)
    return out
