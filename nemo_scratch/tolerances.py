"""The one tolerance table: (op, dtype) -> (rtol, atol, reason). Tests import it as tests/tolerances.py.

The check is ``|got - ref| <= atol + rtol * |ref|`` elementwise. On failure ``assert_close`` prints the max
absolute and relative error and the share of the budget used (llm.c's "% of maximum error"), so a reviewer
sees how near the edge a passing case sits. Decodes of 4- and 8-bit codes are bit-exact and never use this.
"""

import numpy as np

F32, F64 = "float32", "float64"

TOLERANCES = {
    # ---- reference ops against their own definitions (same math, different summation order)
    ("rms_norm", F32): (1e-6, 1e-6, "one reduction of width d in float32; differs only in summation order"),
    ("rms_norm", F64): (1e-12, 1e-12, "float64 oracle mode"),
    ("gated_rms_norm", F32): (1e-5, 1e-6, "silu + one group reduction in float32"),
    ("gated_rms_norm", F64): (1e-12, 1e-12, "float64 oracle mode"),
    ("conv1d", F32): (1e-5, 1e-6, "w-term dot products; step vs sequence sum in a different order"),
    ("conv1d", F64): (1e-12, 1e-12, "float64 oracle mode"),
    ("activation", F32): (1e-6, 1e-7, "softplus in its overflow-free exp(-|x|) form, sigmoid/silu as "
                                      "1/(1+exp(-x)) with exp overflowing to inf, vs float64: a few ulp"),
    ("activation", F64): (1e-13, 1e-15, "float64 oracle mode: the two forms agree to rounding"),
    ("ssd", F32): (1e-4, 1e-5, "chunked SSD reorders a length-t recurrence into exp(segsum) blocks and "
                               "chunk-state passing; float32 exp/cumsum differences grow with t"),
    ("ssd", F64): (1e-10, 1e-12, "float64: the chunked form equals the recurrence to rounding"),
    ("ssd_step", F32): (1e-5, 1e-6, "one recurrence step; only the state-C contraction order differs"),
    ("ssd_step", F64): (1e-12, 1e-12, "float64 oracle mode"),
    ("attention", F32): (1e-5, 1e-6, "softmax over s keys in float32; decode vs prefill differ in order"),
    ("attention", F64): (1e-12, 1e-12, "float64 oracle mode"),
    ("router", F32): (1e-6, 1e-7, "sigmoid of a d-wide dot product, normalised over k; weights only "
                                  "(selection is compared exactly)"),
    ("router", F64): (1e-12, 1e-12, "float64 oracle mode"),
    ("moe", F32): (1e-5, 1e-6, "sum over k experts of relu2 GEMV chains; expert order differs"),
    ("moe", F64): (1e-12, 1e-12, "float64 oracle mode"),
    ("quant_matmul", F32): (1e-5, 1e-5, "fused decode-in-tiles matmul vs dequantize-then-matmul: same "
                                        "products, tile-wise summation order"),
    ("quant_matmul", F64): (1e-12, 1e-12, "float64 oracle mode"),
    # ---- the model
    ("model_step_vs_forward", F32): (1e-4, 1e-4, "cached decode vs one forward over the whole sequence: "
                                                 "chunked vs stepwise SSD and attention over a growing cache"),
    ("model_step_vs_forward", F64): (1e-9, 1e-9, "float64 oracle mode"),
    ("model_vs_transformers", F32): (2e-3, 2e-3, "float32 torch vs float32 NumPy through every block: BLAS "
                                                 "summation orders and torch's chunked SSD; logits ~O(1)"),
    ("sharded_layer", F64): (1e-12, 1e-12, "one block cut over R ranks: the all-reduce adds R partial outputs, "
                                            "a float64 sum in another order"),
    ("sharded_model", F64): (1e-10, 1e-10, "a whole model cut over R ranks vs one device: every block's partial "
                                            "sums reordered, through every layer"),
    ("model_quantized_vs_dequantized", F32): (1e-4, 1e-4, "packed NVFP4/FP8 decode inside the matmul vs "
                                                          "the same weights dequantized up front"),
    # ---- GPU kernels (Numba on the simulator or a GPU, CuPy on a GPU) against the NumPy reference
    ("kernel_conv1d", F32): (1e-5, 1e-5, "same w-term sums, fused with SiLU; float32 expf"),
    ("kernel_ssd", F32): (5e-4, 5e-5, "chunked scan in float32 with a different chunk decomposition and "
                                      "reduction order; upstream mamba_ssm uses 6e-4 / 2e-3 for fp32"),
    ("kernel_ssd_step", F32): (1e-5, 1e-5, "state update in float32; upstream selective_state_update uses "
                                           "3e-4 / 1e-3"),
    ("kernel_gated_rms_norm", F32): (1e-5, 1e-5, "block reduction order differs from np.mean"),
    ("kernel_rms_norm", F32): (1e-5, 1e-5, "block reduction order differs from np.mean"),
    ("kernel_attention", F32): (1e-4, 1e-5, "online (tiled) softmax with rescaling and split-K merges vs "
                                            "one-shot softmax"),
    ("kernel_router", F32): (1e-5, 1e-6, "router logits summed in a different order; selection exact"),
    ("kernel_moe", F32): (1e-4, 1e-5, "grouped expert matmuls with float32 atomics/scatter order"),
    ("kernel_quant_matmul", F32): (1e-4, 1e-5, "decode in registers, dot products in a different order"),
    ("kernel_model", F32): (1e-3, 1e-3, "a whole tiny model through GPU kernels vs NumPy"),
}


def tolerance(op, dtype):
    key = (op, np.dtype(dtype).name)
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance for {key}; add it to tests/tolerances.py with a reason")
    return TOLERANCES[key]


def assert_close(got, ref, op, dtype=None, what=""):
    """Shape and dtype first, then |got - ref| <= atol + rtol*|ref|, with a readable report."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what or op}: shape {got.shape} != reference {ref.shape}"
    dtype = np.dtype(dtype or ref.dtype)
    assert got.dtype == ref.dtype, f"{what or op}: dtype {got.dtype} != reference {ref.dtype}"
    rtol, atol, _ = tolerance(op, dtype)
    g, r = got.astype(np.float64), ref.astype(np.float64)
    assert np.all(np.isfinite(g) == np.isfinite(r)), f"{what or op}: non-finite values differ from the reference"
    fin = np.isfinite(r)
    err = np.abs(g - r)[fin]
    budget = atol + rtol * np.abs(r)[fin]
    if err.size == 0:
        return 0.0
    used = float(np.max(err / budget))
    if used > 1.0:
        rel = err / np.maximum(np.abs(r[fin]), 1e-30)
        raise AssertionError(
            f"{what or op} ({dtype.name}): max abs err {err.max():.3e}, max rel err {rel.max():.3e}, "
            f"{used * 100:.1f}% of the tolerance budget (rtol={rtol}, atol={atol}); "
            f"{int(np.sum(err > budget))} of {err.size} elements out of bounds")
    return used
