"""Grouped-query attention (GQA) without positional encoding. Spec section 4 and pitfall 6.

The t queries are the LAST t positions of the s keys (t <= s): a prefill has t == s, a decode step t == 1
against a cache that already holds the new token's key and value. Query head j reads kv head j // (q // kv)
(transformers' ``repeat_kv``). Scores are scaled by dh**-0.5 and the softmax, with the row maximum
subtracted, runs in the compute dtype (float32, or float64 in oracle mode).
"""

import numpy as np

from .common import get_xp
from .contracts import check_gqa_attention, check_gqa_decode


# Bytes of the score block of one query tile: the queries are taken a tile at a time, so no tensor is
# larger than [b, q, tile, s] (the exact softmax of each query row needs all its s keys, not its neighbours).
SCORE_TILE_BYTES = 64 * 2**20


def query_tile(b, nq, s, itemsize):
    """Queries a tile: as many as keep the [b, q, tile, s] score block within SCORE_TILE_BYTES (at least one)."""
    return max(1, SCORE_TILE_BYTES // max(1, b * nq * s * itemsize))


def gqa_attention(q, k, v, causal=True):  # [b,t,q,dh], [b,s,kv,dh], [b,s,kv,dh] -> [b,t,q,dh]
    """softmax(q k^T * dh**-0.5 + causal mask) v, with the query heads grouped over the kv heads.

    The queries run one tile at a time (query_tile), each with its exact softmax over all the keys it sees,
    so the memory the scores take is bounded by the tile, not by the prompt.
    """
    dtype, b, t, s, nq, nkv, dh = check_gqa_attention(q, k, v, causal)
    xp = get_xp(q, k, v)
    r = nq // nkv
    kt = xp.moveaxis(k, 1, 2)[:, :, None]                                   # [b,kv,1,s,dh]
    vt = xp.moveaxis(v, 1, 2)[:, :, None]                                   # [b,kv,1,s,dh]
    out = xp.empty((b, t, nq, dh), dtype=dtype)
    tile = query_tile(b, nq, s, dtype.itemsize)
    for i0 in range(0, t, tile):
        i1 = min(t, i0 + tile)
        # [b, kv, r, tile, dh]: query head j = gg * r + i (r = q/kv) lands at [gg, i] and reads kv head gg
        qg = xp.moveaxis(q[:, i0:i1].reshape(b, i1 - i0, nkv, r, dh), 1, 3)
        # S = q k^T * dh**-0.5     (einsum "bgrtd,bgsd->bgrts", as a batched matmul so BLAS does the work)
        scores = xp.matmul(qg, xp.swapaxes(kt, -1, -2)) * dtype.type(dh ** -0.5)             # [b,kv,r,tile,s]
        if causal:
            # query i sits at key position s - t + i and sees keys j <= s - t + i
            visible = xp.arange(s)[None, :] <= xp.arange(i0, i1)[:, None] + (s - t)             # [tile,s]
            scores = xp.where(visible, scores, dtype.type(-np.inf))
        # P = softmax(S) = exp(S - max S) / sum exp(S - max S)
        probs = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
        probs /= xp.sum(probs, axis=-1, keepdims=True)
        # o = P v                  (einsum "bgrts,bgsd->bgrtd"), back to [b, tile, q, dh]
        out[:, i0:i1] = xp.moveaxis(xp.matmul(probs, vt), 3, 1).reshape(b, i1 - i0, nq, dh)
    return out


def gqa_decode(q, k, v):  # [b,t,q,dh], [b,s,kv,dh], [b,s,kv,dh] -> [b,t,q,dh]
    """Attention of t new tokens (small t) against a KV cache that already contains them.

    The math is causal gqa_attention exactly (the new tokens are the last t of the s cached positions).
    GPU backends give this op its own split-K kernel (the s keys cut into blocks whose partial softmaxes
    are merged); the reference is the one-shot form.
    """
    check_gqa_decode(q, k, v)
    return gqa_attention(q, k, v, causal=True)
