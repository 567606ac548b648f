"""The chunked SSD scan as batched matmuls: the fast twin of ``ssd.ssd_scan_chunked``, what the numpy backend runs.

Same contract, same eight steps (spec 3.1), same numbers within the "ssd" tolerance (tests/test_ops_ssd.py
holds the two to each other). Two changes make it several times faster in NumPy:

- every contraction is a batched ``matmul`` (BLAS), not a many-operand einsum;
- B and C stay per GROUP: heads are viewed as [g, r] (r = h/g heads per group, head hh = gg * r + i), so
  C_j . B_m is computed once per group and broadcast over its r heads instead of once per head;
- the segment sums accumulate one row of the [q, q] matrix at a time (``segsum_by_rows``): the very
  additions of ``ssd.segsum``'s cumsum, in its order, but NumPy's cumsum over the second-last axis walks
  the memory with a stride of q: the whole segsum was 5x slower (0.13 s of a 512-token Nano-width prefill).

The price is the axis bookkeeping (moveaxis/reshape) that the readable form does not need: read
``ssd.ssd_scan_chunked`` first. Letters as there: u chunks, j and m steps inside a chunk, r heads a group.
"""

import numpy as np

from .common import get_xp
from .contracts import check_ssd_scan_chunked
from .ssd import skip, to_chunks


def segsum_by_rows(a):  # [..., q] -> [..., q, q]
    """ssd.segsum, bit for bit: out[..., i, j] = a[j+1] + ... + a[i] (i >= j), -inf above the diagonal."""
    xp = get_xp(a)
    q = a.shape[-1]
    below = xp.tril(xp.ones((q, q), dtype=bool), -1)
    seg = xp.where(below, a[..., :, None], a.dtype.type(0))         # rep[..., i, j] = a[i] for i > j
    for i in range(1, q):
        # seg[i] = seg[i-1] + rep[i]: cumsum's own recurrence, one row (all j at once) per step
        seg[..., i, :] += seg[..., i - 1, :]
    return xp.where(xp.tril(xp.ones((q, q), dtype=bool)), seg, a.dtype.type(-np.inf))


def ssd_scan_chunked_fast(x, dt, A, B, C, chunk, D=None, initial_state=None):  # x [b,t,h,p] ... -> [b,t,h,p]
    """-> (y [b,t,h,p], final_state [b,h,p,n]); the contract and the steps of ssd.ssd_scan_chunked."""
    dtype, b, t, h, p, g, n, q = check_ssd_scan_chunked(x, dt, A, B, C, chunk, D, initial_state)
    xp = get_xp(x, dt, A, B, C, D, initial_state)
    nc = -(-t // q)
    r = h // g
    # 1. X = x dt, a = A dt, cut into chunks; 2. a_cum = cumsum(a) inside each chunk
    X = to_chunks(x * dt[..., None], nc, q)                                                     # [b,u,j,h,p]
    a = xp.moveaxis(to_chunks(dt * A, nc, q), 3, 1)                                              # [b,h,u,j]
    a_cum = xp.cumsum(a, axis=-1)
    # B and C per group, time last but one: [b,u,g,1,j,n] (the 1 broadcasts over a group's r heads)
    B_grp = xp.moveaxis(to_chunks(B, nc, q), 3, 2)[:, :, :, None]
    C_grp = xp.moveaxis(to_chunks(C, nc, q), 3, 2)[:, :, :, None]
    # 3. L = exp(segsum(a))                                                                  [b,h,u,j,m]
    L = xp.exp(segsum_by_rows(a))
    # 4. Y_diag[j] = sum_m (C_j . B_m) L[j, m] X_m   (einsum "bujhn,bumhn,bhujm,bumhp->bujhp")
    CB = xp.matmul(C_grp, xp.swapaxes(B_grp, -1, -2))                                            # [b,u,g,1,j,m]
    M = CB * xp.moveaxis(L, 1, 2).reshape(b, nc, g, r, q, q)                                     # [b,u,g,r,j,m]
    X_grp = xp.moveaxis(X, 2, 4).reshape(b, nc, g, r, p, q)                                      # [b,u,g,r,p,m]
    Y_diag = xp.matmul(M, xp.swapaxes(X_grp, -1, -2))                                            # [b,u,g,r,j,p]
    # 5. S[u] = sum_j exp(a_cum[last] - a_cum[j]) X_j B_j^T   (einsum "bujhn,bhuj,bujhp->buhpn")
    decay_to_end = xp.exp(a_cum[..., -1:] - a_cum)                                               # [b,h,u,j]
    X_w = X_grp * xp.moveaxis(decay_to_end, 1, 2).reshape(b, nc, g, r, 1, q)                     # [b,u,g,r,p,j]
    states = xp.matmul(X_w, B_grp).reshape(b, nc, h, p, n)                                      # [b,u,h,p,n]
    # 6. the state entering each chunk   (einsum "bhzu,buhpn->bzhpn")
    init = xp.zeros((b, h, p, n), dtype=dtype) if initial_state is None else initial_state
    states = xp.concatenate([init[:, None], states], axis=1)                                    # [b,u+1,h,p,n]
    chunk_a = xp.concatenate([xp.zeros((b, h, 1), dtype=dtype), a_cum[..., -1]], axis=-1)       # [b,h,u+1]
    decay_chunk = xp.exp(segsum_by_rows(chunk_a))                                                # [b,h,z,u]
    entering = xp.einsum("bhzu,buhpn->bzhpn", decay_chunk, states, optimize=True)
    states, final_state = entering[:, :-1], entering[:, -1]
    # 7. Y_off[j] = exp(a_cum[j]) C_j . S_in[u]   (einsum "bujhn,buhpn,bhuj->bujhp")
    states_grp = xp.swapaxes(states.reshape(b, nc, g, r, p, n), -1, -2)                          # [b,u,g,r,n,p]
    Y_off = xp.matmul(C_grp, states_grp) * xp.moveaxis(xp.exp(a_cum), 1, 2).reshape(b, nc, g, r, q, 1)
    # 8. y = Y_diag + Y_off, back to [b, t, h, p], + D x
    y = xp.moveaxis((Y_diag + Y_off).reshape(b, nc, h, q, p), 2, 3)                             # [b,u,j,h,p]
    y = y.reshape(b, nc * q, h, p)[:, :t]
    return skip(y, x, D), xp.ascontiguousarray(final_state)
