"""The reference op namespace: every op of the backend op set, under its backend name.

The composite ops (linear.linear, moe.mlp, moe.latent_moe) take ``ops=``, the namespace their primitives come
from; None means this module. A backend passes itself, so its kernels run underneath the same composition.
"""

from .attention import gqa_attention, gqa_decode  # noqa: F401
from .conv import causal_conv1d, causal_conv1d_step  # noqa: F401
from .linear import linear  # noqa: F401
from .moe import latent_moe, mlp, moe_experts, relu2, route  # noqa: F401
from .norm import gated_rms_norm, rms_norm  # noqa: F401
from .quant import bf16_decode, e2m1_decode, e4m3_decode, fp8_dequantize, nvfp4_dequantize  # noqa: F401
# the matmuls: quant.py's NumPy tiles, or for a few float32 rows the fused Numba CPU kernel (ops/quant_fast.py)
from .quant_fast import bf16_matmul_fast as bf16_matmul  # noqa: F401
from .quant_fast import dense_matmul_fast as dense_matmul  # noqa: F401
from .quant_fast import fp8_matmul_fast as fp8_matmul  # noqa: F401
from .quant_fast import nvfp4_matmul_fast as nvfp4_matmul  # noqa: F401
from .ssd import discretize_dt, ssd_scan_chunked, ssd_scan_sequential, ssd_step  # noqa: F401
from .ssd_fast import ssd_scan_chunked_fast as ssd_scan  # noqa: F401  (the prefill scan the model calls)
