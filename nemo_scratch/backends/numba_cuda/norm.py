"""RMSNorm and the gated group RMSNorm as one Numba-CUDA kernel family.

Reference:  nemo_scratch.ops.norm.rms_norm, nemo_scratch.ops.norm.gated_rms_norm
Test:       tests/test_backend_mamba.py::test_rms_norm_*, ::test_gated_rms_norm_*
Tolerance:  tests/tolerances.py ("kernel_rms_norm", "kernel_gated_rms_norm", float32)
Versions:
  rms_norm_v1_block_per_group
      one block per (row, group); the threads stride over the group's width, a shared-memory tree reduction
      (runtime.block_sum) gives sum(v^2), then the same threads write weight * v * rsqrt(mean + eps). Gated:
      v = y * silu(z), recomputed in the second pass instead of stored (two reads of y and z from L1/L2 beat a
      round trip through memory). Plain RMSNorm is the case n_groups = 1 without a gate.
  No v2: one pass of reads and one of writes over a row that fits in L1; warp shuffles would save a few
  syncthreads but do not exist on the simulator the tests run on.
Build:      @cuda.jit(fastmath=False); float32 compute (the binder runs float64 calls on the reference).
"""

import math

import numpy as np
from numba import cuda, float32

from ...ops.common import get_xp
from .runtime import JIT, MAX_REDUCE_THREADS, block_sum, contiguous, launch_rows, silu


@cuda.jit(device=True, **JIT)
def _normed_input(x_rows, gate_rows, r, k, gated):
    # v = x (plain RMSNorm) or g = y * silu(z) (gate first, spec 3.2)
    return x_rows[r, k] * silu(gate_rows[r, k]) if gated else x_rows[r, k]


@cuda.jit(**JIT)
def rms_norm_v1_block_per_group(x_rows, gate_rows, weight, out_rows, n_groups, eps, gated):
    # x_rows [r,i], gate_rows [r,i] (read only when gated), weight [i] -> out_rows [r,i]; one block per (r, group)
    smem = cuda.shared.array(MAX_REDUCE_THREADS, float32)
    r = cuda.blockIdx.x // n_groups
    width = x_rows.shape[1] // n_groups
    start = (cuda.blockIdx.x % n_groups) * width
    acc = float32(0.0)
    for k in range(start + cuda.threadIdx.x, start + width, cuda.blockDim.x):
        v = _normed_input(x_rows, gate_rows, r, k, gated)
        acc += v * v
    # inv_rms = 1 / sqrt(mean(v^2 over the group) + eps)
    inv_rms = float32(1.0) / math.sqrt(block_sum(acc, smem) / float32(width) + eps)
    for k in range(start + cuda.threadIdx.x, start + width, cuda.blockDim.x):
        # out = weight * (v * inv_rms)
        out_rows[r, k] = weight[k] * (_normed_input(x_rows, gate_rows, r, k, gated) * inv_rms)


def _launch(x, gate, weight, n_groups, eps):  # [..., i], [..., i]|None, [i] -> [..., i]
    """Flatten the leading axes to rows and run one block per (row, group)."""
    xp = get_xp(x, gate, weight)
    i = x.shape[-1]
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    x_rows, gate_rows, weight = contiguous(xp, x.reshape(rows, i), None if gate is None else gate.reshape(rows, i),
                                           weight)
    out = xp.empty((rows, i), dtype=np.float32)
    gated = gate_rows is not None
    launch_rows(rms_norm_v1_block_per_group, rows * n_groups, i // n_groups, x_rows, gate_rows if gated else x_rows, weight,
                out, n_groups, np.float32(eps), gated)
    return out.reshape(x.shape)


def rms_norm_numba(x, weight, eps):  # [..., d], [d] -> [..., d]
    """Same contract as nemo_scratch.ops.norm.rms_norm."""
    return _launch(x, None, weight, 1, eps)


def gated_rms_norm_numba(y, z, weight, n_groups, eps):  # [..., i], [..., i], [i] -> [..., i]
    """Same contract as nemo_scratch.ops.norm.gated_rms_norm."""
    return _launch(y, z, weight, int(n_groups), eps)
