"""The Mamba-2 selective state space (SSD) scan. Spec sections 3.1 and 3.3.

Three forms of one recurrence, per batch b, head h, head channel p and state channel n:

    state_t = exp(dt_t A) * state_{t-1} + dt_t * x_t B_t^T          (state [h, p, n], A < 0)
    y_t     = state_t C_t + D * x_t

- ``ssd_scan_sequential``: the recurrence itself, one token at a time (the definition);
- ``ssd_scan_chunked``: the SSD block decomposition (Dao & Gu 2024; state-spaces/mamba ``ssd_minimal.py``),
  what transformers' ``torch_forward`` and the Triton kernels compute;
- ``ssd_step``: one decode token against a cached state (``selective_state_update_ref``).

B and C come in g groups; head hh reads group hh // (h // g) (repeat-interleave, pitfall 3). The state has
the dtype of the inputs: float32 (as in transformers' cache), or float64 in oracle mode. Nothing here needs
more than NumPy.
"""

import numpy as np

from ..errors import InputError, ShapeError
from .common import check_float, check_shape, get_xp


def softplus(x):  # [...] -> [...]
    """softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), the form that never overflows."""
    xp = get_xp(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def discretize_dt(dt_raw, dt_bias, dt_min=0.0, dt_max=float("inf")):  # [..., h], [h] -> [..., h]
    """The step size of each head: dt = clip(softplus(dt_raw + dt_bias), dt_min, dt_max).

    Deviation: the floor is a switch. transformers 5.x floors at ``time_step_min`` = 0.001 (its mixer sets
    ``time_step_limit = (time_step_min, inf)``); vLLM, llama.cpp and NVIDIA's CUDA path floor at 0, which is
    our default. The model passes the floor it was configured with (spec section 0).
    """
    dtype = check_float("discretize_dt", dt_raw, dt_bias)
    if dt_raw.ndim < 1:
        raise ShapeError(f"discretize_dt: dt_raw has shape {list(dt_raw.shape)}, expected [..., h]")
    check_shape("discretize_dt", "dt_bias", dt_bias, (dt_raw.shape[-1],))
    xp = get_xp(dt_raw, dt_bias)
    # dt = clip(softplus(dt_raw + dt_bias), dt_min, dt_max)
    return xp.clip(softplus(dt_raw + dt_bias), dtype.type(dt_min), dtype.type(dt_max))


def _check_ssd(name, x, dt, A, B, C, D, state, lead):
    """Check the arguments of one SSD call; ``lead`` is the leading shape of x (b,t for a scan, b for a step).

    x [*lead,h,p], dt [*lead,h], A [h], B/C [*lead,g,n], D [h]|None, state [b,h,p,n]|None; h % g == 0.
    Returns (dtype, xp, h, p, g, n).
    """
    dtype = check_float(name, x, dt, A, B, C, D, state)
    check_shape(name, "x", x, (None,) * (lead + 2))
    *lead_shape, h, p = x.shape
    lead_shape = tuple(lead_shape)
    check_shape(name, "dt", dt, (*lead_shape, h))
    check_shape(name, "A", A, (h,))
    check_shape(name, "B", B, (*lead_shape, None, None))
    g, n = B.shape[-2:]
    check_shape(name, "C", C, (*lead_shape, g, n))
    if g < 1 or h % g:
        raise ShapeError(f"{name}: B and C have g={g} groups, expected a divisor of the h={h} heads of x")
    if D is not None:
        check_shape(name, "D", D, (h,))
    if state is not None:
        check_shape(name, "initial_state" if lead == 2 else "state", state, (lead_shape[0], h, p, n))
    return dtype, get_xp(x, dt, A, B, C, D, state), h, p, g, n


def _per_head(BC, h):  # [..., g, n] -> [..., h, n]
    """Give every head its group's B (or C): head hh uses group hh // (h // g) (repeat-interleave)."""
    xp = get_xp(BC)
    return xp.repeat(BC, h // BC.shape[-2], axis=-2)


def _skip(y, x, D):  # [..., h, p], [..., h, p], [h]|None -> [..., h, p]
    """The skip connection: y + D[h] * x, on the un-discretised x (spec 3.1 step 8)."""
    return y if D is None else y + D[:, None] * x


def _recurrence(x, dt, A, Bh, Ch, state):  # [b,h,p], [b,h], [h], [b,h,n], [b,h,n], [b,h,p,n]
    """One step of the recurrence without the skip term -> (y [b,h,p], new_state [b,h,p,n])."""
    xp = get_xp(x, dt, A, Bh, Ch, state)
    # state_t = exp(dt A) * state_{t-1} + dt * x B^T
    state = (xp.exp(dt * A)[:, :, None, None] * state
             + dt[:, :, None, None] * x[:, :, :, None] * Bh[:, :, None, :])
    # y_t = state_t C_t = sum_n state[b,h,p,n] C[b,h,n]
    return xp.einsum("bhpn,bhn->bhp", state, Ch), state


def ssd_step(x, dt, A, B, C, D, state):  # [b,h,p], [b,h], [h], [b,g,n], [b,g,n], [h]|None, [b,h,p,n]
    """One decode token -> (y [b,h,p], new_state [b,h,p,n]) (spec 3.3, selective_state_update_ref)."""
    _, _, h, *_ = _check_ssd("ssd_step", x, dt, A, B, C, D, state, lead=1)
    y, state = _recurrence(x, dt, A, _per_head(B, h), _per_head(C, h), state)
    return _skip(y, x, D), state


def ssd_scan_sequential(x, dt, A, B, C, D=None, initial_state=None):  # x [b,t,h,p], B/C [b,t,g,n] -> [b,t,h,p]
    """The recurrence, token by token: the definition the chunked form is held to.

    -> (y [b,t,h,p], final_state [b,h,p,n]); ``initial_state`` None means zeros.
    """
    dtype, xp, h, p, g, n = _check_ssd("ssd_scan_sequential", x, dt, A, B, C, D, initial_state, lead=2)
    b, t = x.shape[:2]
    Bh, Ch = _per_head(B, h), _per_head(C, h)                                                       # [b,t,h,n]
    state = xp.zeros((b, h, p, n), dtype=dtype) if initial_state is None else initial_state
    y = xp.zeros((b, t, h, p), dtype=dtype)
    for s in range(t):
        y[:, s], state = _recurrence(x[:, s], dt[:, s], A, Bh[:, s], Ch[:, s], state)
    return _skip(y, x, D), state


def segsum(a):  # [..., q] -> [..., q, q]
    """Stable segment sum: out[..., i, j] = a[j+1] + ... + a[i] for i >= j (0 on the diagonal), -inf above.

    Built by masked cumulative sums rather than cumsum differences, which cancel badly in float32.
    """
    xp = get_xp(a)
    q = a.shape[-1]
    # rep[..., i, j] = a[i] for i > j, else 0;  cumsum over i gives sum_{k=j+1..i} a[k]
    rep = xp.where(xp.tril(xp.ones((q, q), dtype=bool), -1), a[..., :, None], 0)
    seg = xp.cumsum(rep, axis=-2)
    # exp(segsum) is the decay from step j to step i; i < j is not causal: -inf so that exp gives 0
    return xp.where(xp.tril(xp.ones((q, q), dtype=bool)), seg, a.dtype.type(-np.inf))


def _to_chunks(a, nc, q):  # [b, t, ...] -> [b, nc, q, ...], zero-padded on the right
    """Right-pad the time axis with zeros to nc*q steps and split it into nc chunks of q."""
    xp = get_xp(a)
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, nc * q - a.shape[1])
    return xp.pad(a, pad).reshape(a.shape[0], nc, q, *a.shape[2:])


def ssd_scan_chunked(x, dt, A, B, C, chunk, D=None, initial_state=None):  # x [b,t,h,p] ... -> [b,t,h,p]
    """The SSD block decomposition (spec 3.1 steps 1-8, numbered alike below;
    state-spaces/mamba ssd_minimal_discrete with D added separately).

    -> (y [b,t,h,p], final_state [b,h,p,n]). Any ``chunk`` >= 1 works: t is right-padded with zeros to a
    multiple of it (a padded step has dt = 0: it adds nothing and decays nothing), and a chunk longer than
    the sequence is one chunk of length t.
    """
    dtype, xp, h, p, g, n = _check_ssd("ssd_scan_chunked", x, dt, A, B, C, D, initial_state, lead=2)
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"ssd_scan_chunked: chunk={chunk!r}, expected a positive integer")
    b, t = x.shape[:2]
    q = min(int(chunk), max(t, 1))     # chunk length; nc chunks
    nc = -(-t // q)
    # 1. Xd = x * dt, Ad = A * dt;  2. cut into chunks [b, nc, q, ...], Ad as [b, h, nc, q], Acum = cumsum(Ad)
    Xd = _to_chunks(x * dt[..., None], nc, q)                                                # [b,nc,q,h,p]
    Ad = xp.moveaxis(_to_chunks(dt * A, nc, q), 3, 1)                                         # [b,h,nc,q]
    Bg, Cg = _to_chunks(B, nc, q), _to_chunks(C, nc, q)                                       # [b,nc,q,g,n]
    Acum = xp.cumsum(Ad, axis=-1)
    # B and C are per group: head hh = gg * r + i (r = h/g) uses group gg, so heads are viewed as [g, r] and
    # every contraction below is a batched matmul that broadcasts a group's B/C over its r heads.
    r = h // g
    Bt, Ct = xp.moveaxis(Bg, 3, 2)[:, :, :, None], xp.moveaxis(Cg, 3, 2)[:, :, :, None]      # [b,nc,g,1,q,n]
    # 3. L = exp(segsum(Ad)): decay from step s to step l inside a chunk
    L = xp.exp(segsum(Ad))                                                                    # [b,h,nc,q,q]
    # 4. diagonal blocks: Y_diag[l] = sum_s (C_l . B_s) L[l, s] Xd_s
    #    (einsum "bclhn,bcshn,bhcls,bcshp->bclhp"; C.B^T is computed once per group)
    CB = xp.matmul(Ct, xp.swapaxes(Bt, -1, -2))                                               # [b,nc,g,1,l,s]
    M = CB * xp.moveaxis(L, 1, 2).reshape(b, nc, g, r, q, q)                                  # [b,nc,g,r,l,s]
    Xh = xp.moveaxis(Xd, 2, 4).reshape(b, nc, g, r, p, q)                                     # [b,nc,g,r,p,s]
    Y_diag = xp.matmul(M, xp.swapaxes(Xh, -1, -2))                                            # [b,nc,g,r,l,p]
    # 5. each chunk's own end state: states = sum_l B_l exp(Acum[-1] - Acum[l]) Xd_l
    #    (einsum "bclhn,bhcl,bclhp->bchpn")
    decay_states = xp.exp(Acum[..., -1:] - Acum)                                              # [b,h,nc,q]
    Xw = Xh * xp.moveaxis(decay_states, 1, 2).reshape(b, nc, g, r, 1, q)                      # [b,nc,g,r,p,l]
    states = xp.matmul(Xw, Bt).reshape(b, nc, h, p, n)                                       # [b,nc,h,p,n]
    # 6. inter-chunk recurrence: prepend the initial state, carry it across chunk boundaries
    #    new_states[z] = sum_c exp(segsum(pad(Acum[..., -1], (1, 0))))[z, c] states[c]   (FIX 1 orientation)
    init = xp.zeros((b, h, p, n), dtype=dtype) if initial_state is None else initial_state
    states = xp.concatenate([init[:, None], states], axis=1)                                 # [b,nc+1,h,p,n]
    chunk_decay = xp.concatenate([xp.zeros((b, h, 1), dtype=dtype), Acum[..., -1]], axis=-1)  # [b,h,nc+1]
    decay_chunk = xp.exp(segsum(chunk_decay))                                                 # [b,h,nc+1,nc+1]
    new_states = xp.einsum("bhzc,bchpn->bzhpn", decay_chunk, states, optimize=True)
    states, final_state = new_states[:, :-1], new_states[:, -1]                              # state entering c
    # 7. off-diagonal blocks: Y_off[l] = C_l . states[c] exp(Acum[l])   (einsum "bclhn,bchpn,bhcl->bclhp")
    states_g = xp.swapaxes(states.reshape(b, nc, g, r, p, n), -1, -2)                        # [b,nc,g,r,n,p]
    Y_off = xp.matmul(Ct, states_g) * xp.moveaxis(xp.exp(Acum), 1, 2).reshape(b, nc, g, r, q, 1)
    # 8. y = Y_diag + Y_off, uncut and cropped to t, + D x on the un-discretised x
    y = xp.moveaxis((Y_diag + Y_off).reshape(b, nc, h, q, p), 2, 3)                          # [b,nc,q,h,p]
    y = y.reshape(b, nc * q, h, p)[:, :t]
    return _skip(y, x, D), xp.ascontiguousarray(final_state)
