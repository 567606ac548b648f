"""The NumPy backend: the reference ops themselves, bound as methods."""

import numpy as np

from ..ops import attention, conv, linear, moe, norm, quant, ssd


class NumpyBackend:
    """Binds the reference functions of nemo_scratch.ops. GPU backends subclass this and override ops."""

    name = "numpy"
    xp = np

    # -- arrays
    def asarray(self, a):
        """Host array (or packed weight) -> this backend's array type."""
        return quant.map_arrays(a, self._asarray)

    def _asarray(self, a):
        return np.asarray(a)

    def to_numpy(self, a):
        return np.asarray(a)

    # -- ops (docs/ops-api.md)
    rms_norm = staticmethod(norm.rms_norm)
    gated_rms_norm = staticmethod(norm.gated_rms_norm)
    causal_conv1d = staticmethod(conv.causal_conv1d)
    causal_conv1d_step = staticmethod(conv.causal_conv1d_step)
    discretize_dt = staticmethod(ssd.discretize_dt)
    ssd_scan_sequential = staticmethod(ssd.ssd_scan_sequential)
    ssd_scan_chunked = staticmethod(ssd.ssd_scan_chunked)
    ssd_scan = ssd_scan_chunked          # what the model calls for prefill
    ssd_step = staticmethod(ssd.ssd_step)
    gqa_attention = staticmethod(attention.gqa_attention)
    gqa_decode = staticmethod(attention.gqa_decode)
    route = staticmethod(moe.route)
    relu2 = staticmethod(moe.relu2)
    mlp = staticmethod(moe.mlp)
    latent_moe = staticmethod(moe.latent_moe)
    moe_experts = staticmethod(moe.moe_experts)
    linear = staticmethod(linear.linear)
    nvfp4_dequantize = staticmethod(quant.nvfp4_dequantize)
    nvfp4_matmul = staticmethod(quant.nvfp4_matmul)
    fp8_dequantize = staticmethod(quant.fp8_dequantize)
    fp8_matmul = staticmethod(quant.fp8_matmul)
