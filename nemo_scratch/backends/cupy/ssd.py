"""Launchers of kernels_cuda/ssd.cu: the SSD chunked scan (prefill) and the single-token state update (decode).

Reference:  nemo_scratch.ops.ssd.ssd_scan_chunked, nemo_scratch.ops.ssd.ssd_step
Test:       tests/test_backend_mamba.py::test_ssd_scan_*, ::test_ssd_step_*;
            tests/test_backend_cupy_only.py::test_kernel_limits_raise_package_errors_before_any_device_work
Tolerance:  tests/tolerances.py ("kernel_ssd", "kernel_ssd_step", float32)
The prefill runs the four kernels of the SSD block decomposition in order (spec 3.1): chunk states,
state passing, C.B^T per group, chunk scan. Scratch: chunk_states [b,nc,h,n,p] (p fastest, see ssd.cu),
chunk_log_decay [b,h,nc], cb [b,nc,g,q,q]. Same contract as the reference (checked by ops/contracts.py before
the launch; float32 only); a chunk too long for shared memory is an InputError. The step's ``out_state``
receives the new state: None allocates it (the input state is left untouched, as in the reference);
``out_state=state`` is the in-place update of a decode loop.
"""

from ...errors import InputError, ShapeError
from .loader import SMEM_LIMIT_BYTES, THREADS, cdiv, device_f32, get_kernel, i32, launch_1d, state_buffer

CU_FILE = "ssd.cu"
KERNELS = {
    "chunk_state": "ssd_chunk_state_v2_block_per_chunk",
    "state_passing": "ssd_state_passing_v1_thread_per_entry",
    "chunk_cb": "ssd_chunk_cb_v2_block_per_chunk",
    "chunk_scan": "ssd_chunk_scan_v2_smem_tile",
    "step": "ssd_step_v2_warp_per_row",
}
MAX_GRID_YZ = 65535   # CUDA's limit on gridDim.y and gridDim.z (chunks, batch)
MAX_L_TILE = 32       # rows of the decay-masked C.B^T matrix a chunk-scan block holds in shared memory
FLOAT_BYTES = 4


def _scan_launch_sizes(name, b, q, nc):
    """(l_tile, shared bytes of chunk_state, shared bytes of chunk_scan) for chunk length q; checks limits."""
    if nc > MAX_GRID_YZ or b > MAX_GRID_YZ:
        raise ShapeError(f"{name}: {nc} chunks and batch {b}: the cupy kernels take at most {MAX_GRID_YZ} "
                         "of each (a larger chunk makes fewer chunks)")
    budget = SMEM_LIMIT_BYTES // FLOAT_BYTES            # floats of dynamic shared memory a block may use
    if 3 * q > budget:
        raise InputError(f"{name}: chunk={q} is too long for the cupy kernels' shared memory: at most "
                         f"{budget // 3} (real models use 128)")
    l_tile = min(MAX_L_TILE, q, budget // q - 2)        # (2 + l_tile) * q floats must fit
    return l_tile, 3 * q * FLOAT_BYTES, (2 + l_tile) * q * FLOAT_BYTES


def ssd_scan_chunked_cupy(x, dt, A, B, C, chunk, D=None, initial_state=None):  # x [b,t,h,p] ... -> [b,t,h,p]
    """-> (y [b,t,h,p], final_state [b,h,p,n]); the same contract as ssd_scan_chunked."""
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    q = min(int(chunk), max(t, 1))   # a chunk longer than the sequence is one chunk of length t
    nc = cdiv(t, q)
    l_tile, state_smem, scan_smem = _scan_launch_sizes("ssd_scan_chunked", b, q, nc)
    import cupy as xp

    y = xp.empty((b, t, h, p), dtype=xp.float32)
    final_state = xp.empty((b, h, p, n), dtype=xp.float32)
    if t == 0 or b * h == 0:          # nothing to scan (a grid needs at least one block a dimension)
        final_state[...] = 0.0 if initial_state is None else xp.asarray(initial_state)
        return y, final_state
    x, dt, A, B, C, D, initial_state = device_f32(xp, x, dt, A, B, C, D, initial_state)
    chunk_states = xp.empty((b, nc, h, n, p), dtype=xp.float32)
    chunk_log_decay = xp.empty((b, h, nc), dtype=xp.float32)
    cb = xp.empty((b, nc, g, q, q), dtype=xp.float32)

    # step 5: the state each chunk produces from a zero state, and its total log-decay
    get_kernel(CU_FILE, KERNELS["chunk_state"])(
        (h, nc, b), (THREADS,), (x, dt, A, B, chunk_states, chunk_log_decay,
                                 i32(t), i32(h), i32(p), i32(g), i32(n), i32(q)), shared_mem=state_smem)
    # step 6: chunk_states[c] <- the state entering chunk c; final_state after the last chunk
    launch_1d(get_kernel(CU_FILE, KERNELS["state_passing"]), b * h * p * n,
              (chunk_states, chunk_log_decay, initial_state, final_state, i32(b), i32(nc), i32(h), i32(p), i32(n)))
    # step 4's C.B^T, once per group
    get_kernel(CU_FILE, KERNELS["chunk_cb"])((g, nc, b), (THREADS,), (B, C, cb, i32(t), i32(g), i32(n), i32(q)))
    # steps 3, 4, 7, 8: y = diagonal block + decayed entering state + D x
    get_kernel(CU_FILE, KERNELS["chunk_scan"])(
        (h, nc, b), (THREADS,), (x, dt, A, C, D, chunk_states, cb, y,
                                 i32(t), i32(h), i32(p), i32(g), i32(n), i32(q), i32(l_tile)),
        shared_mem=scan_smem)
    return y, final_state


def ssd_step_cupy(x, dt, A, B, C, D, state, out_state=None):  # [b,h,p], [b,h], [h], [b,g,n] x2, [h]|None, [b,h,p,n]
    """-> (y [b,h,p], new_state [b,h,p,n]); new_state is ``out_state`` when given."""
    b, h, p = x.shape
    g, n = B.shape[-2:]
    import cupy as xp

    new_state = state_buffer(xp, out_state, (b, h, p, n), "ssd_step")
    x, dt, A, B, C, D, state = device_f32(xp, x, dt, A, B, C, D, state)
    y = xp.empty((b, h, p), dtype=xp.float32)
    rows = b * h * p                       # one warp per state row (b, h, p)
    warps = THREADS // 32
    if rows > 0:
        get_kernel(CU_FILE, KERNELS["step"])(
            (cdiv(rows, warps),), (THREADS,),
            (x, dt, A, B, C, D, state, new_state, y, i32(b), i32(h), i32(p), i32(g), i32(n)))
    return y, new_state
