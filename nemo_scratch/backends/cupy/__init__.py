"""The ``cupy`` backend: CUDA C kernels (kernels_cuda/*.cu) compiled by CuPy (NVRTC), the reference for the rest.

Arrays are CuPy arrays. Each op listed in ``KERNELS`` is a thin launcher in this package (``<module>.py``,
entry point ``<op>_cupy``) that computes the grid and launches the kernel; the arguments were already
checked by the op's contract (ops/contracts.py) and are float32. float64 calls (oracle mode), and every op
not listed, run the NumpyBackend's reference functions, which are written against ``xp = get_xp(x)`` and so
run on CuPy arrays too; the composite ops (linear, mlp, latent_moe) are the reference's composition over
these kernels (backends/numpy_backend.py).

Importing this package imports no cupy and touches no GPU: cupy is imported when the backend is constructed
(``get_backend("cupy")``), which raises BackendError when cupy is missing or there is no GPU. The .cu files
are compiled at their first launch (loader.py).

To add a kernel for an op: write ``kernels_cuda/<module>.cu`` and its launcher ``<module>.py`` here (with the
kernel file header of docs/oracle.md section 6 and a ``KERNELS`` table of kernel names, which
tests/test_cuda_compile.py checks against the .cu source), then add one row to ``KERNELS`` below.
"""

from ...errors import BackendError
from ..gpu_common import upload
from ..numpy_backend import NumpyBackend

# backend method -> (launcher module in this package, entry point)
KERNELS = {
    "rms_norm": ("norm", "rms_norm_cupy"),
    "gated_rms_norm": ("norm", "gated_rms_norm_cupy"),
    "causal_conv1d": ("conv", "causal_conv1d_cupy"),
    "causal_conv1d_step": ("conv", "causal_conv1d_step_cupy"),
    "ssd_scan": ("ssd", "ssd_scan_chunked_cupy"),
    "ssd_scan_chunked": ("ssd", "ssd_scan_chunked_cupy"),
    "ssd_step": ("ssd", "ssd_step_cupy"),
    "gqa_attention": ("attention", "gqa_attention_cupy"),
    "gqa_decode": ("attention", "gqa_decode_cupy"),
    "route": ("moe", "route_cupy"),
    "moe_experts": ("moe", "moe_experts_cupy"),
    "nvfp4_dequantize": ("quant", "nvfp4_dequantize_cupy"),
    "nvfp4_matmul": ("quant", "nvfp4_matmul_cupy"),
    "fp8_matmul": ("quant", "fp8_matmul_cupy"),
}


class CupyBackend(NumpyBackend):
    """NumpyBackend with the ops of ``KERNELS`` bound to CUDA C kernels."""

    name = "cupy"
    KERNELS = KERNELS
    KERNEL_PACKAGE = __name__

    def __init__(self):
        try:
            import cupy
        except ImportError:
            raise BackendError("cupy backend needs cupy (install the gpu-cuda12 or gpu-cuda13 extra: "
                               "pip install -e .[gpu-cuda12])") from None
        try:
            n_devices = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no driver, or a broken one: read it as "no GPU"
            raise BackendError(f"cupy backend: no CUDA GPU is available ({type(exc).__name__}: {exc})") from None
        if n_devices < 1:
            raise BackendError("cupy backend: no CUDA GPU is available (the driver reports 0 devices)")
        self.xp = cupy
        self.bind_kernels()

    # -- arrays
    def asarray(self, a):
        """Host array, stored weight or expert bank -> this backend's device form (gpu_common.upload)."""
        return upload(a, self._asarray, self.xp)

    def _asarray(self, a):
        return self.xp.asarray(a)

    def to_numpy(self, a):
        return self.xp.asnumpy(a)
