"""The ``numba`` backend: Numba-CUDA (@cuda.jit) kernels for the GPU-critical ops, the reference for the rest.

Arrays are CuPy arrays on a GPU (numba reads them through the CUDA array interface) and NumPy arrays under
the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported). Ops without a kernel are the
NumpyBackend's reference functions, which are written against ``xp = get_xp(x)`` and so run on either.

Importing this package imports neither numba nor cupy and touches no GPU: ``runtime`` and the kernel
modules are imported when the backend is constructed (``get_backend("numba")``), which raises BackendError
when there is no GPU and no simulator, or no cupy on a GPU.

To add kernels for an op: write ``<op>_numba`` in ``<module>.py`` of this folder (with the kernel file
header of shared/CONVENTIONS.md) and add one row to ``KERNELS``.
"""

import importlib

import numpy as np

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
    # issue 8: attention, MoE, NVFP4/FP8 (linear and mlp route packed weights to the fused matmuls)
    "gqa_attention": ("attention", "gqa_attention_numba"),
    "gqa_decode": ("attention", "gqa_decode_numba"),
    "route": ("moe", "route_numba"),
    "moe_experts": ("moe", "moe_experts_numba"),
    "mlp": ("moe", "mlp_numba"),
    "linear": ("quant", "linear_numba"),
    "nvfp4_dequantize": ("quant", "nvfp4_dequantize_numba"),
    "nvfp4_matmul": ("quant", "nvfp4_matmul_numba"),
    "fp8_matmul": ("quant", "fp8_matmul_numba"),
}


class NumbaBackend(NumpyBackend):
    """NumpyBackend with the ops of ``KERNELS`` bound to Numba-CUDA kernels."""

    name = "numba"

    def __init__(self):
        from . import runtime  # imports numba: only now, never at package import

        self.simulator = runtime.simulator_enabled()
        self.xp = runtime.choose_xp()  # numpy (simulator) or cupy (GPU); BackendError if neither can run
        for op, (module, entry) in KERNELS.items():
            kernels = importlib.import_module(f"{__name__}.{module}")
            setattr(self, op, getattr(kernels, entry))

    # -- arrays
    def _asarray(self, a):
        # Loading onto the "device": a copy, like a host-to-device upload. Under the simulator this also
        # makes read-only (memory-mapped) checkpoint weights writable, which the simulator's copy-back needs.
        return np.array(a) if self.xp is np else self.xp.asarray(a)

    def to_numpy(self, a):
        if self.xp is not np and isinstance(a, self.xp.ndarray):
            return self.xp.asnumpy(a)
        return np.asarray(a)
