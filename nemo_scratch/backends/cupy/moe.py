"""Launchers of kernels_cuda/moe.cu: the router and the routed experts (dispatch, grouped matmuls, combine).

Reference:  nemo_scratch.ops.moe.route, nemo_scratch.ops.moe.moe_experts
Test:       tests/test_backend_core.py::test_route_*, ::test_moe_experts_*, ::test_mlp_*
Tolerance:  tests/tolerances.py ("kernel_router", float32) (selection exact), ("kernel_moe", float32)
The kernels compute in float32 (the binder runs float64 calls on the reference; the router declines a packed
gate with Unsupported).
Expert stacks may be dense float32 [e, f, l] / [e, l, f] arrays or NVFP4Weight / FP8Weight stacks; each is
decoded inside the grouped matmul. Arguments are checked (ops/contracts.py) before cupy is imported.
"""

import numpy as np

from ...errors import ShapeError
from ...ops.formats import FP8Weight, NVFP4Weight, is_packed
from ..gpu_common import Unsupported
from .attention import shared_kernel
from .loader import cdiv, device_f32, f32, get_kernel, i32, i64, launch_1d, on_this_device

CU_FILE = "moe.cu"
KERNELS = {
    "route": "route_v2_warp_argmax",
    "count": "moe_count_v1_atomics",
    "offsets": "moe_offsets_v1_one_thread",
    "permute": "moe_scatter_v1_atomics",
    "dense": "moe_matmul_dense_v2_warp_per_column",
    "nvfp4": "moe_matmul_nvfp4_v2_warp_per_column",
    "fp8": "moe_matmul_fp8_v2_warp_per_column",
    "combine": "moe_combine_v1_thread_per_output",
}
# The constants of moe.cu that the launch depends on.
ROUTER_TOKENS = 4
ROUTER_THREADS = 512
MOE_ROWS = 16
MOE_WARPS = 8


def route_cupy(x, gate_weight, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
               routed_scaling_factor=1.0):  # [t,d], [e,d], [e]|None -> (idx [t,k] int64, w [t,k])
    """Sigmoid router with biased, group-limited top-k selection; the same contract as the reference."""
    if is_packed(gate_weight):
        raise Unsupported("a packed router gate: the reference decodes it through linear")
    (t, d), e = x.shape, gate_weight.shape[0]
    import cupy as xp

    if correction_bias is None:
        correction_bias = xp.zeros(e, dtype=np.float32)  # s + 0 == s exactly
    x, gate_weight, bias = device_f32(xp, x, gate_weight, correction_bias)
    idx = xp.empty((t, top_k), dtype=np.int64)
    w = xp.empty((t, top_k), dtype=np.float32)
    if t == 0:
        return idx, w
    # smem: sigmoid and choice scores, group scores (float32); taken and kept flags (bytes)
    smem = ROUTER_TOKENS * (4 * (2 * e + n_group) + e + n_group)
    kernel = shared_kernel(CU_FILE, KERNELS["route"], smem)
    kernel((cdiv(t, ROUTER_TOKENS),), (ROUTER_THREADS,),
           (x, gate_weight, bias, idx, w, i32(t), i32(d), i32(e), i32(top_k), i32(n_group), i32(topk_group),
            i32(bool(norm_topk_prob)), f32(routed_scaling_factor)), shared_mem=smem)
    return idx, w


def _expert_matmul(xp, w, a, a_row, gather, offsets, tile_offsets, out, relu2):
    """out[pos] = act(W[expert(pos)] a[row(pos)]) for every placed (token, slot) pair, W dense or packed."""
    e, n_out, n_in = w.shape
    n_tiles = cdiv(out.shape[0], MOE_ROWS) + e  # >= sum over experts of ceil(rows / MOE_ROWS)
    tail = (i64(n_out), i64(n_in), a, a_row, i32(gather), offsets, tile_offsets, i32(e), out, i32(relu2))
    if isinstance(w, NVFP4Weight):
        key = "nvfp4"
        head = (_device_u8(xp, w.packed), _device_u8(xp, w.block_scale), *device_f32(xp, w.global_scale))
    elif isinstance(w, FP8Weight):
        key = "fp8"
        head = (_device_u8(xp, w.data), *device_f32(xp, w.scale))
    else:
        key = "dense"
        head = tuple(device_f32(xp, w))
    get_kernel(CU_FILE, KERNELS[key])((n_tiles, cdiv(n_out, MOE_WARPS)), (MOE_WARPS * 32,), head + tail)


def _device_u8(xp, a):
    return on_this_device(xp, a, np.uint8)


def moe_experts_cupy(x, idx, weights, up, down):  # [t,l], [t,k], [t,k], [e,f,l], [e,l,f] -> [t,l]
    """out[t] = sum_j w[t,j] * down[e](relu2(up[e] x[t])), e = idx[t,j]: dispatch, two grouped matmuls, combine.

    The contract has checked that the ids are in range and distinct per token (a bad id would index out of
    the counts array).
    """
    (t, l), (e, f), k = x.shape, up.shape[:2], idx.shape[1]
    import cupy as xp

    n_pairs = t * k
    if n_pairs >= 2**31:
        raise ShapeError(f"moe_experts: t*k = {n_pairs} (token, slot) pairs; the kernels index them with int32")
    out = xp.zeros((t, l), dtype=np.float32)
    if n_pairs == 0:
        return out
    idx = xp.ascontiguousarray(xp.asarray(idx, dtype=np.int64))
    x, weights = device_f32(xp, x, weights)

    # dispatch: counts -> offsets (and the tile -> expert map) -> each pair's place in expert order
    counts = xp.zeros(e, dtype=np.int32)
    launch_1d(get_kernel(CU_FILE, KERNELS["count"]), n_pairs, (idx, counts, i64(n_pairs)))
    offsets = xp.empty(e + 1, dtype=np.int32)
    tile_offsets = xp.empty(e + 1, dtype=np.int32)
    get_kernel(CU_FILE, KERNELS["offsets"])((1,), (32,), (counts, offsets, tile_offsets, i32(e)))
    fill = xp.zeros(e, dtype=np.int32)
    src_token = xp.empty(n_pairs, dtype=np.int32)
    pair_pos = xp.empty(n_pairs, dtype=np.int32)
    launch_1d(get_kernel(CU_FILE, KERNELS["permute"]), n_pairs,
              (idx, offsets, fill, src_token, pair_pos, i64(n_pairs), i32(k)))

    # h = relu2(up[e] x[token])  [pairs, f];  y = down[e] h  [pairs, l]
    h = xp.empty((n_pairs, f), dtype=np.float32)
    _expert_matmul(xp, up, x, src_token, 1, offsets, tile_offsets, h, relu2=1)
    y = xp.empty((n_pairs, l), dtype=np.float32)
    _expert_matmul(xp, down, h, src_token, 0, offsets, tile_offsets, y, relu2=0)

    # out[t] = sum_j w[t, j] * y[pos(t, j)]
    launch_1d(get_kernel(CU_FILE, KERNELS["combine"]), t * l,
              (y, pair_pos, weights, out, i64(t), i32(k), i32(l)))
    return out
