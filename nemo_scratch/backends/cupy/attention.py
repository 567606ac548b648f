"""Launchers of kernels_cuda/attention.cu: GQA attention, tiled online softmax (prefill) and split-K (decode).

Reference:  nemo_scratch.ops.attention.gqa_attention, nemo_scratch.ops.attention.gqa_decode
Test:       tests/test_backend_core.py::test_gqa_attention_*, ::test_gqa_decode_*;
            tests/test_backend_cupy_only.py::test_decode_splits_cover_the_keys_in_whole_tiles
Tolerance:  tests/tolerances.py ("kernel_attention", float32)
The kernels compute in float32 (the binder runs float64 calls on the reference). Arguments are checked by
ops/contracts.py before the launch, so a wrong call fails the same way with or without a GPU.
"""

import numpy as np

from ...errors import ShapeError
from .loader import SMEM_LIMIT_BYTES, cdiv, device_f32, f32, get_kernel, i32, i64

CU_FILE = "attention.cu"
KERNELS = {
    "prefill": "gqa_attention_v2_warp_per_row",
    "decode_split": "gqa_decode_v2_splitk_warp_per_row",
    "decode_merge": "gqa_split_merge_v2_warp_per_row",
}
# The constants of attention.cu that the launch depends on.
ATT_WARPS = 8
ATT_ROWS = 32          # (query, head) rows a block: ATT_WARPS * ATT_ROWS_PER_WARP
ATT_TILE = 32          # keys a shared-memory tile
ATT_MAX_DH = 256       # head dims a lane holds in registers: 8 per lane
MERGE_ROWS = 4         # output rows a merge block (one warp each)


def _sizes(name, q, k):
    """(b, t, s, nq, nkv, dh); a head dim past the kernels' register budget is a ShapeError."""
    (b, t, nq, dh), (s, nkv) = q.shape, k.shape[1:3]
    if dh > ATT_MAX_DH:
        raise ShapeError(f"{name}: head dim dh={dh}; the cupy attention kernels hold at most {ATT_MAX_DH} "
                         "dims a row in registers")
    return b, t, s, nq, nkv, dh


def _smem_bytes(dh):
    """att_smem_floats(dh) of attention.cu: q rows, a K tile (padded by one column), a V tile."""
    return 4 * (ATT_ROWS * dh + ATT_TILE * (dh + 1) + ATT_TILE * dh)


def shared_kernel(filename, name, smem):
    """get_kernel, allowed more than the default 48 KiB of dynamic shared memory when ``smem`` needs it."""
    kernel = get_kernel(filename, name)
    if smem > SMEM_LIMIT_BYTES:
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


def decode_splits(s, blocks_per_split, n_sm):  # -> (n_split, keys_per_split)
    """Cut s keys into splits of whole tiles so that about two blocks run per SM (at least one tile each).

    blocks_per_split: the blocks one split already launches (batch x kv heads x row tiles).
    """
    want = max(1, min(cdiv(s, ATT_TILE), cdiv(2 * n_sm, blocks_per_split)))
    keys_per_split = cdiv(cdiv(s, want), ATT_TILE) * ATT_TILE
    return cdiv(s, keys_per_split), keys_per_split


def gqa_attention_cupy(q, k, v, causal=True):  # [b,t,q,dh], [b,s,kv,dh], [b,s,kv,dh] -> [b,t,q,dh]
    """softmax(q k^T * dh**-0.5 + causal mask) v; the t queries are the last t of the s keys."""
    b, t, s, nq, nkv, dh = _sizes("gqa_attention", q, k)
    import cupy as xp

    q, k, v = device_f32(xp, q, k, v)
    out = xp.empty((b, t, nq, dh), dtype=np.float32)
    if out.size == 0:
        return out
    smem = _smem_bytes(dh)
    kernel = shared_kernel(CU_FILE, KERNELS["prefill"], smem)
    grid = (cdiv(t * (nq // nkv), ATT_ROWS), nkv, b)
    kernel(grid, (ATT_WARPS * 32,), (q, k, v, out, i32(t), i32(s), i32(nq), i32(nkv), i32(dh),
                                     i32(bool(causal)), f32(dh ** -0.5)), shared_mem=smem)
    return out


def gqa_decode_cupy(q, k, v):  # [b,t,q,dh], [b,s,kv,dh], [b,s,kv,dh] -> [b,t,q,dh]
    """Causal attention of t new tokens against a cache that holds them: split-K over the s keys + merge."""
    b, t, s, nq, nkv, dh = _sizes("gqa_decode", q, k)
    import cupy as xp

    q, k, v = device_f32(xp, q, k, v)
    out = xp.empty((b, t, nq, dh), dtype=np.float32)
    if out.size == 0:
        return out
    row_tiles = cdiv(t * (nq // nkv), ATT_ROWS)
    n_sm = xp.cuda.Device().attributes["MultiProcessorCount"]
    n_split, keys_per_split = decode_splits(s, b * nkv * row_tiles, n_sm)
    n_rows = b * t * nq
    m_part = xp.empty((n_rows, n_split), dtype=np.float32)
    l_part = xp.empty((n_rows, n_split), dtype=np.float32)
    acc_part = xp.empty((n_rows, n_split, dh), dtype=np.float32)
    smem = _smem_bytes(dh)
    split = shared_kernel(CU_FILE, KERNELS["decode_split"], smem)
    split((n_split, row_tiles, b * nkv), (ATT_WARPS * 32,),
          (q, k, v, m_part, l_part, acc_part, i32(t), i32(s), i32(nq), i32(nkv), i32(dh), i32(1),
           f32(dh ** -0.5), i32(keys_per_split)), shared_mem=smem)
    merge = get_kernel(CU_FILE, KERNELS["decode_merge"])
    merge((cdiv(n_rows, MERGE_ROWS),), (MERGE_ROWS * 32,),
          (m_part, l_part, acc_part, out, i64(n_rows), i32(n_split), i32(dh)))
    return out
