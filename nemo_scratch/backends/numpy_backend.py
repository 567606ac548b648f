"""The NumPy backend, and the base every backend shares: primitive ops, composite ops, and the kernel binder.

A backend object carries the op set of docs/oracle.md section 1 as methods:

- **primitive ops** (norms, conv, scans, attention, router, experts, codecs, packed matmuls) are here the
  reference functions of nemo_scratch.ops;
- **composite ops** (``linear``, ``mlp``, ``latent_moe``) are the reference's own composition, run with
  THIS backend as their ``ops=`` namespace: a GPU backend's kernels run underneath the very function the
  reference defines, so a composite is written once;
- a GPU backend subclasses this one and only lists its kernels in ``KERNELS`` (op -> (module, entry point)).
  ``bind_kernels`` wraps each: check the arguments (ops/contracts.py::CHECKS, the reference's own rules,
  before any GPU work) -> float32 (or codes) ? the kernel : the reference (float64 oracle mode). A kernel
  may decline an input it cannot run with ``raise Unsupported(reason)`` before it launches anything; the
  reference then runs instead.
"""

import functools
import importlib

import numpy as np

from ..ops import attention, conv, moe, norm, quant, quant_fast, ssd, ssd_fast
from ..ops.contracts import CHECKS
from ..ops.formats import map_arrays
from ..ops.linear import linear as linear_op
from .gpu_common import Unsupported



class NumpyBackend:
    """The reference ops as methods; GPU backends subclass this and list their kernels in ``KERNELS``."""

    name = "numpy"
    xp = np
    KERNELS = {}          # op -> (module inside KERNEL_PACKAGE, entry point)
    KERNEL_PACKAGE = None

    # -- arrays
    def asarray(self, a):
        """Host array (or packed weight) -> this backend's array type."""
        return map_arrays(a, self._asarray)

    def _asarray(self, a):
        return np.asarray(a)

    def to_numpy(self, a):
        return np.asarray(a)

    # -- primitive ops: the reference functions (docs/oracle.md section 1)
    rms_norm = staticmethod(norm.rms_norm)
    gated_rms_norm = staticmethod(norm.gated_rms_norm)
    causal_conv1d = staticmethod(conv.causal_conv1d)
    causal_conv1d_step = staticmethod(conv.causal_conv1d_step)
    discretize_dt = staticmethod(ssd.discretize_dt)
    ssd_scan_sequential = staticmethod(ssd.ssd_scan_sequential)
    ssd_scan_chunked = staticmethod(ssd.ssd_scan_chunked)
    ssd_scan = staticmethod(ssd_fast.ssd_scan_chunked_fast)   # what the model calls for prefill
    ssd_step = staticmethod(ssd.ssd_step)
    gqa_attention = staticmethod(attention.gqa_attention)
    gqa_decode = staticmethod(attention.gqa_decode)
    route = staticmethod(moe.route)
    relu2 = staticmethod(moe.relu2)
    moe_experts = staticmethod(moe.moe_experts)
    bf16_decode = staticmethod(quant.bf16_decode)
    bf16_matmul = staticmethod(quant_fast.bf16_matmul_fast)     # few rows: the Numba CPU kernel, if numba imports
    dense_matmul = staticmethod(quant_fast.dense_matmul_fast)
    e2m1_decode = staticmethod(quant.e2m1_decode)
    e4m3_decode = staticmethod(quant.e4m3_decode)
    nvfp4_dequantize = staticmethod(quant.nvfp4_dequantize)
    nvfp4_matmul = staticmethod(quant_fast.nvfp4_matmul_fast)
    fp8_dequantize = staticmethod(quant.fp8_dequantize)
    fp8_matmul = staticmethod(quant_fast.fp8_matmul_fast)

    # -- composite ops: the reference's composition over this backend's primitives
    def linear(self, x, w):  # [..., in], [out, in] | NVFP4Weight | FP8Weight -> [..., out]
        return linear_op(x, w, ops=self)

    def mlp(self, x, up, down):  # [..., d], [f,d], [d,f] -> [..., d]
        return moe.mlp(x, up, down, ops=self)

    def latent_moe(self, x, idx, weights, up, down, fc1=None, fc2=None):  # [t,d] ... -> [t,d]
        return moe.latent_moe(x, idx, weights, up, down, fc1, fc2, ops=self)

    # -- kernels
    def bind_kernels(self):
        """Bind every KERNELS row as ``check -> float32 (or codes) ? kernel : reference``."""
        for op, (module, entry) in self.KERNELS.items():
            kernel = getattr(importlib.import_module(f"{self.KERNEL_PACKAGE}.{module}"), entry)
            setattr(self, op, guarded(op, kernel, reference=getattr(self, op)))


def guarded(op, kernel, reference):
    """The backend method of one kernel row: the op's contract first, then the kernel or the reference."""
    check = CHECKS[op]

    def run(*args, **kwargs):
        dtype = check(*args, **kwargs)[0]
        # kernels take float32, and codes (dtype None: the codec ops, uint8 in, float32 out). Not ``in (...)``:
        # np.dtype == None is True for float64, since np.dtype(None) is float64.
        if dtype is None or dtype == np.float32:
            try:
                return kernel(*args, **kwargs)
            except Unsupported:
                pass
        return reference(*args, **kwargs)

    functools.update_wrapper(run, kernel)   # run.__wrapped__ is the kernel (inspect.unwrap finds it)
    return run
