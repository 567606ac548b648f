"""The ``numba`` backend: Numba-CUDA (@cuda.jit) kernels for the GPU-critical ops, the reference for the rest.

Arrays are CuPy arrays on a GPU (numba reads them through the CUDA array interface) and NumPy arrays under
the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported). Every op not in ``KERNELS``,
and every float64 call (oracle mode), is the NumpyBackend's reference, written against ``xp = get_xp(x)``
and so run on either; the composite ops (linear, mlp, latent_moe) are the reference's composition over
these kernels (backends/numpy_backend.py).

Importing this package imports neither numba nor cupy and touches no GPU: ``runtime`` and the kernel
modules are imported when the backend is constructed (``get_backend("numba")``), which raises BackendError
when there is no GPU and no simulator, or no cupy on a GPU.

To add a kernel for an op: write ``<op>_numba`` in ``<module>.py`` of this folder (with the kernel file
header of docs/oracle.md section 6: Reference, Test, Tolerance, Versions, Build) and add one row to
``KERNELS``. The entry point takes the op's arguments, already checked by ops/contracts.py, in float32.
"""

import numpy as np

from ..gpu_common import upload
from ..numpy_backend import NumpyBackend

# backend method -> (kernel module in this package, entry point). Every other op is the reference.
KERNELS = {
    "rms_norm": ("norm", "rms_norm_numba"),
    "gated_rms_norm": ("norm", "gated_rms_norm_numba"),
    "causal_conv1d": ("conv", "causal_conv1d_numba"),
    "causal_conv1d_step": ("conv", "causal_conv1d_step_numba"),
    "ssd_scan": ("ssd", "ssd_scan_chunked_numba"),
    "ssd_scan_chunked": ("ssd", "ssd_scan_chunked_numba"),
    "ssd_step": ("ssd", "ssd_step_numba"),
    "gqa_attention": ("attention", "gqa_attention_numba"),
    "gqa_decode": ("attention", "gqa_decode_numba"),
    "route": ("moe", "route_numba"),
    "moe_experts": ("moe", "moe_experts_numba"),
    "e2m1_decode": ("quant", "e2m1_decode_numba"),
    "e4m3_decode": ("quant", "e4m3_decode_numba"),
    "nvfp4_dequantize": ("quant", "nvfp4_dequantize_numba"),
    "nvfp4_matmul": ("quant", "nvfp4_matmul_numba"),
    "fp8_matmul": ("quant", "fp8_matmul_numba"),
}


class NumbaBackend(NumpyBackend):
    """NumpyBackend with the ops of ``KERNELS`` bound to Numba-CUDA kernels."""

    name = "numba"
    KERNELS = KERNELS
    KERNEL_PACKAGE = __name__

    def __init__(self):
        from . import runtime  # imports numba: only now, never at package import

        self.simulator = runtime.simulator_enabled()
        self.xp = runtime.choose_xp()  # numpy (simulator) or cupy (GPU); BackendError if neither can run
        self.bind_kernels()

    # -- arrays
    def asarray(self, a):
        """Host array, stored weight or expert bank -> this backend's device form (gpu_common.upload)."""
        return upload(a, self._asarray, self.xp)

    def _asarray(self, a):
        # Loading onto the "device": a copy, like a host-to-device upload. Under the simulator this also
        # makes read-only (memory-mapped) checkpoint weights writable, which the simulator's copy-back needs.
        return np.array(a) if self.xp is np else self.xp.asarray(a)

    def to_numpy(self, a):
        if self.xp is not np and isinstance(a, self.xp.ndarray):
            return self.xp.asnumpy(a)
        return np.asarray(a)
