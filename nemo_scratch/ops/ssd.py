"""The Mamba-2 selective state space (SSD) scan. Spec sections 3.1 and 3.3.

Three forms of one recurrence, per batch b, head h, head channel p and state channel n:

    state_t = exp(dt_t A) * state_{t-1} + dt_t * x_t B_t^T          (state [h, p, n], A < 0)
    y_t     = state_t C_t + D * x_t

- ``ssd_scan_sequential``: the recurrence itself, one token at a time (the definition);
- ``ssd_scan_chunked``: the SSD block decomposition (Dao & Gu 2024; state-spaces/mamba ``ssd_minimal.py``),
  what transformers' ``torch_forward`` and the Triton kernels compute, written as the paper's four steps
  with einsums; its fast twin ``ssd_fast.ssd_scan_chunked_fast`` (batched matmuls, what the numpy backend
  runs) is tested against it;
- ``ssd_step``: one decode token against a cached state (``selective_state_update_ref``).

B and C come in g groups; head hh reads group hh // (h // g) (repeat-interleave, pitfall 3). The state has
the dtype of the inputs: float32 (as in transformers' cache), or float64 in oracle mode. Nothing here needs
more than NumPy.
"""

import numpy as np

from .common import get_xp
from .contracts import (check_discretize_dt, check_ssd_scan_chunked, check_ssd_scan_sequential,
                        check_ssd_step)


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
    dtype, _ = check_discretize_dt(dt_raw, dt_bias, dt_min, dt_max)
    xp = get_xp(dt_raw, dt_bias)
    # dt = clip(softplus(dt_raw + dt_bias), dt_min, dt_max)
    return xp.clip(softplus(dt_raw + dt_bias), dtype.type(dt_min), dtype.type(dt_max))


def per_head(BC, h):  # [..., g, n] -> [..., h, n]
    """Give every head its group's B (or C): head hh uses group hh // (h // g) (repeat-interleave, pitfall 3)."""
    return get_xp(BC).repeat(BC, h // BC.shape[-2], axis=-2)


def skip(y, x, D):  # [..., h, p], [..., h, p], [h]|None -> [..., h, p]
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


def ssd_step(x, dt, A, B, C, D, state, out_state=None):  # [b,h,p], [b,h], [h], [b,g,n] x2, [h]|None, [b,h,p,n]
    """One decode token -> (y [b,h,p], new_state [b,h,p,n]) (spec 3.3, selective_state_update_ref).

    The new state is a new array, or is written into ``out_state`` when given (``out_state=state``: in place).
    """
    _, _, h, *_ = check_ssd_step(x, dt, A, B, C, D, state, out_state)
    y, new_state = _recurrence(x, dt, A, per_head(B, h), per_head(C, h), state)
    if out_state is not None:
        out_state[...] = new_state
        new_state = out_state
    return skip(y, x, D), new_state


def ssd_scan_sequential(x, dt, A, B, C, D=None, initial_state=None):  # x [b,t,h,p], B/C [b,t,g,n] -> [b,t,h,p]
    """The recurrence, token by token: the definition the chunked form is held to.

    -> (y [b,t,h,p], final_state [b,h,p,n]); ``initial_state`` None means zeros.
    """
    dtype, b, t, h, p, g, n = check_ssd_scan_sequential(x, dt, A, B, C, D, initial_state)
    xp = get_xp(x, dt, A, B, C, D, initial_state)
    Bh, Ch = per_head(B, h), per_head(C, h)                                                         # [b,t,h,n]
    state = xp.zeros((b, h, p, n), dtype=dtype) if initial_state is None else initial_state
    y = xp.zeros((b, t, h, p), dtype=dtype)
    for s in range(t):
        y[:, s], state = _recurrence(x[:, s], dt[:, s], A, Bh[:, s], Ch[:, s], state)
    return skip(y, x, D), state


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


def to_chunks(a, nc, q):  # [b, t, ...] -> [b, u, j, ...] with u < nc chunks of j < q steps, zero-padded
    """Right-pad the time axis with zeros to nc*q steps and cut it into nc chunks of q steps."""
    xp = get_xp(a)
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, nc * q - a.shape[1])
    return xp.pad(a, pad).reshape(a.shape[0], nc, q, *a.shape[2:])


def ssd_scan_chunked(x, dt, A, B, C, chunk, D=None, initial_state=None):  # x [b,t,h,p] ... -> [b,t,h,p]
    """The SSD block decomposition (spec 3.1 steps 1-8, numbered alike below; state-spaces/mamba
    ``ssd_minimal_discrete`` with groups and D added). -> (y [b,t,h,p], final_state [b,h,p,n]).

    Any ``chunk`` >= 1 works: t is right-padded with zeros to a multiple of it (a padded step has dt = 0: it
    adds nothing and decays nothing), and a chunk longer than the sequence is one chunk of length t.
    Letters of the chunked form (docs/glossary.md): u and z index chunks, j and m steps inside a chunk.
    The numpy backend runs the same computation as batched matmuls: ssd_fast.ssd_scan_chunked_fast.
    """
    dtype, b, t, h, p, g, n, q = check_ssd_scan_chunked(x, dt, A, B, C, chunk, D, initial_state)
    xp = get_xp(x, dt, A, B, C, D, initial_state)
    nc = -(-t // q)
    # 1. discretize: X = x dt, a = A dt; give every head its group's B and C; cut time into chunks
    X = to_chunks(x * dt[..., None], nc, q)                                                     # [b,u,j,h,p]
    a = xp.moveaxis(to_chunks(dt * A, nc, q), 3, 1)                                              # [b,h,u,j]
    Bh, Ch = to_chunks(per_head(B, h), nc, q), to_chunks(per_head(C, h), nc, q)                 # [b,u,j,h,n]
    # 2. a_cum[j] = a_0 + ... + a_j inside each chunk
    a_cum = xp.cumsum(a, axis=-1)                                                                # [b,h,u,j]
    # 3. L[j, m] = exp(a_{m+1} + ... + a_j): the decay from step m to step j of a chunk (0 for m > j)
    L = xp.exp(segsum(a))                                                                        # [b,h,u,j,m]
    # 4. diagonal blocks, inside each chunk: Y_diag[j] = sum_m (C_j . B_m) L[j, m] X_m
    Y_diag = xp.einsum("bujhn,bumhn,bhujm,bumhp->bujhp", Ch, Bh, L, X, optimize=True)
    # 5. each chunk's own end state (from a zero state): S[u] = sum_j exp(a_cum[last] - a_cum[j]) X_j B_j^T
    decay_to_end = xp.exp(a_cum[..., -1:] - a_cum)                                               # [b,h,u,j]
    states = xp.einsum("bujhn,bhuj,bujhp->buhpn", Bh, decay_to_end, X, optimize=True)           # [b,u,h,p,n]
    # 6. the state ENTERING each chunk: prepend the initial state and carry it across chunk boundaries,
    #    S_in[z] = sum_u exp(a_cum[u+1, last] + ... + a_cum[z, last]) S[u]   (transformers' corrected
    #    orientation: decay_chunk is [target z, source u])
    init = xp.zeros((b, h, p, n), dtype=dtype) if initial_state is None else initial_state
    states = xp.concatenate([init[:, None], states], axis=1)                                    # [b,u+1,h,p,n]
    chunk_a = xp.concatenate([xp.zeros((b, h, 1), dtype=dtype), a_cum[..., -1]], axis=-1)       # [b,h,u+1]
    decay_chunk = xp.exp(segsum(chunk_a))                                                        # [b,h,z,u]
    entering = xp.einsum("bhzu,buhpn->bzhpn", decay_chunk, states, optimize=True)               # [b,z,h,p,n]
    states, final_state = entering[:, :-1], entering[:, -1]
    # 7. off-diagonal blocks: the entering state decayed to step j, read out by C_j:
    #    Y_off[j] = exp(a_cum[j]) C_j . S_in[u]
    Y_off = xp.einsum("bujhn,buhpn,bhuj->bujhp", Ch, states, xp.exp(a_cum), optimize=True)
    # 8. y = Y_diag + Y_off, uncut and cropped to t, plus the skip D x on the un-discretised x
    y = (Y_diag + Y_off).reshape(b, nc * q, h, p)[:, :t]
    return skip(y, x, D), xp.ascontiguousarray(final_state)
