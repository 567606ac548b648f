"""Named input cases of every golden op: the random inputs, and the ties and boundaries each op has.

Random normals never hit the values where kernels go wrong: two router scores are never exactly equal, the
SSD step size is never at its floor, an NVFP4 block never holds every code. Each case below starts from the
op's random inputs (golden.py's maker, same seed) and makes them adversarial:

    CASES[op][name] = (what it tests, maker(rng, dims, inputs, static) -> (inputs, static, atol_scale))

``atol_scale`` multiplies the tolerance's atol for that case: inputs scaled by 2^16 scale the output and its
rounding error by 2^16, so the absolute budget scales with them (the relative one is unchanged).
``nemo-scratch golden --case NAME`` writes a case to a file; ``nemo_scratch.oracle.check`` draws every case
of an op with Hypothesis. ``NEEDS[op][name]`` says which dims a case needs (e.g. two experts for a tie).
The router's tie cases use logits whose sigmoid every implementation computes exactly (0.5 and 1.0) and
dyadic biases, so the ties are exact in every implementation and in both dtypes.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .ops.quant import E4M3_VALUES, NVFP4_BLOCK, pack_nibbles

RANDOM = "random"
HUGE = 2.0 ** 16          # beyond float16's range (65504): inputs that overflow a half-precision intermediate
DT_FLOORS = (0.0, 1e-3)   # the dt floors in use: vLLM / NVIDIA's kernels (0), transformers' time_step_min
# E4M3 block-scale codes at every boundary: zero, smallest and largest subnormal, smallest normal, 1.0, the
# largest finite value 448, the negative twins, and the two NaN codes 0x7F / 0xFF (the decode defines them).
E4M3_BOUNDARY = np.array([0x00, 0x01, 0x07, 0x08, 0x38, 0x7E, 0x80, 0x81, 0x87, 0xFE, 0x7F, 0xFF], np.uint8)
# global scales at the boundaries: 1, zero (an all-zero tensor), float32-subnormal results (2^-120 * 2^-10),
# a large power of two that stays finite (6 * 448 * 2^100 < 3.4e38)
GLOBAL_BOUNDARY = (1.0, 0.0, 2.0 ** -120, 2.0 ** 100)


def _zeros(*names):
    def make(rng, dims, inputs, static):
        return {k: (np.zeros_like(v) if k in names else v) for k, v in inputs.items()}, static, 1.0
    return make


def _scaled(scale, atol_scale, *names):
    def make(rng, dims, inputs, static):
        return {k: (v * scale if k in names else v) for k, v in inputs.items()}, static, atol_scale
    return make


# ------------------------------------------------------------------------------------------------ SSD

def _dt_floor(rng, dims, inputs, static):
    """Three quarters of the steps at a floor (0: no update and no decay; 1e-3: transformers' floor)."""
    dt = inputs["dt"]
    floor = rng.choice(DT_FLOORS, size=dt.shape)
    return {**inputs, "dt": np.where(rng.random(dt.shape) < 0.75, floor, dt)}, static, 1.0


def _strong_decay(rng, dims, inputs, static):
    """dt in [1, 20] with A in [-16, -1]: exp(dt A) underflows to 0 inside one chunk (exp(-320) in float64)."""
    dt = inputs["dt"]
    return {**inputs, "dt": rng.uniform(1.0, 20.0, dt.shape)}, static, 1.0


# ------------------------------------------------------------------------------------------------ router

def _lit(rng, t, d, value):  # -> [t, d]: one dimension of each token at ``value``, the rest 0
    x = np.zeros((t, d))
    x[np.arange(t), rng.integers(0, d, size=t)] = value
    return x


def _ties(rng, dims, inputs, static):
    """Exact score ties. Logits are 0 or 64, so every sigmoid is exactly 0.5 or 1.0 (vectorised sigmoids can
    differ by an ulp between lanes elsewhere), plus a bias from the multiples of 1/64 in [-1/8, 1/8]: the
    biased scores are exact in any implementation. Then expert j copies the gate row and bias of an expert
    i < j, and with n_group >= 2 a later group copies group 0, so group scores tie too."""
    if dims["e"] < 2:
        raise InputError(f"--case ties: route needs e >= 2 experts for two of them to tie, got e={dims['e']}")
    t, d, e, groups = dims["t"], dims["d"], dims["e"], dims["n_group"]
    gate = rng.integers(0, 2, size=(e, d)).astype(np.float64)
    bias = rng.integers(-8, 9, size=e) / 64.0
    if groups >= 2:
        width, target = e // groups, int(rng.integers(1, groups))
        copy = slice(target * width, (target + 1) * width)
        gate[copy], bias[copy] = gate[:width], bias[:width]
    for _ in range(max(1, e // 2)):
        i, j = sorted(rng.choice(e, size=2, replace=False))
        gate[j], bias[j] = gate[i], bias[i]
    return {"x": _lit(rng, t, d, 64.0), "gate_weight": gate, "correction_bias": bias}, static, 1.0


def _router_zeros(rng, dims, inputs, static):
    """x = 0 and no bias: every score is sigmoid(0) = 0.5, so the whole selection is ties."""
    return {**inputs, "x": np.zeros_like(inputs["x"]), "correction_bias": np.zeros_like(inputs["correction_bias"])}, \
        static, 1.0


def _saturated(rng, dims, inputs, static):
    """Logits 0, 64, 128 or 192: sigmoid(64) = 1 - 1.6e-28 is exactly 1.0 in float32 and float64, so every
    saturated expert scores 1.0; biases from {0, 1/16} split them into two tied sets."""
    t, d, e = dims["t"], dims["d"], dims["e"]
    gate = rng.integers(0, 4, size=(e, d)).astype(np.float64)
    return {"x": _lit(rng, t, d, 64.0), "gate_weight": gate, "correction_bias": rng.integers(0, 2, size=e) / 16.0}, \
        static, 1.0


# ------------------------------------------------------------------------------------------------ MoE

def _skewed(rng, dims, inputs, static):
    """Every token routed to the same k experts (the others idle), and a quarter of the weights exactly 0."""
    t, e, k = dims["t"], dims["e"], dims["k"]
    chosen = rng.choice(e, size=k, replace=False)
    idx = np.stack([rng.permutation(chosen) for _ in range(t)]).astype(np.int64)
    weights = np.where(rng.random((t, k)) < 0.25, 0.0, inputs["weights"])
    return {**inputs, "idx": idx, "weights": weights}, static, 1.0


# ------------------------------------------------------------------------------------------------ NVFP4

def _every_code(rng, rows, inn):  # -> uint8 [rows, in/2]: each 16-element block holds all 16 E2M1 codes
    codes = rng.permuted(np.tile(np.arange(16, dtype=np.uint8), (rows, inn // NVFP4_BLOCK, 1)), axis=-1)
    return pack_nibbles(codes.reshape(rows, inn))


def _all_codes(rng, dims, inputs, static):
    """Every E2M1 code (0..15: +-0, the subnormal +-0.5, ..., +-6) in every 16-element block, in a random
    order; block scales from 0.5 to 32, a random global scale."""
    out, inn = dims["out"], dims["in"]
    scales = rng.integers(0x30, 0x61, size=(out, inn // NVFP4_BLOCK)).astype(np.uint8)
    g = np.asarray(rng.uniform(0.5, 2.0) / (6 * 448), dtype=np.float32)
    return {**inputs, "packed": _every_code(rng, out, inn), "block_scale": scales, "global_scale": g}, static, 1.0


def _boundary_scales(rng, dims, inputs, static):
    """Every code in every block, block scales drawn from E4M3_BOUNDARY (subnormals, 448, negative, NaN)
    and the global scale from GLOBAL_BOUNDARY (the matmul keeps it at the model's 1 / (6 * 448))."""
    out, inn = dims["out"], dims["in"]
    scales = rng.choice(E4M3_BOUNDARY, size=(out, inn // NVFP4_BLOCK))
    if "x" in inputs:
        g = 1.0 / (6 * 448)
    else:
        g = GLOBAL_BOUNDARY[int(rng.integers(len(GLOBAL_BOUNDARY)))]
    return {**inputs, "packed": _every_code(rng, out, inn), "block_scale": scales.astype(np.uint8),
            "global_scale": np.asarray(g, dtype=np.float32)}, static, 1.0


def _nvfp4_zeros(rng, dims, inputs, static):
    """All codes 0 under the random scales: every output +0."""
    return {**inputs, "packed": np.zeros_like(inputs["packed"])}, static, 1.0


# ------------------------------------------------------------------------------------------------ the table

_NORM = {
    "zeros": ("x = 0: y = 0 (eps keeps 0 / sqrt(0 + eps) finite)", _zeros("x")),
    "small": ("x * 2^-9: mean(x^2) ~ 4e-6 is below eps = 1e-5, so where eps goes matters",
              _scaled(2.0 ** -9, 1.0, "x")),
    "huge": ("x * 2^56: x^2 ~ 2^112 stays finite in float32 only if squared in float32, not float16",
             _scaled(2.0 ** 56, 1.0, "x")),
}
_GATED = {
    "zeros": ("y = 0: the gated input is 0 everywhere", _zeros("y")),
    "small": ("y * 2^-9: mean(g^2) is below eps", _scaled(2.0 ** -9, 1.0, "y")),
    "huge": ("y * 2^56", _scaled(2.0 ** 56, 1.0, "y")),
    "saturated": ("z * 64: silu saturates (z for z >> 0, -0 for z << 0: exp(-z) overflows)",
                  _scaled(64.0, 1.0, "z")),
}
_CONV = {
    "zeros": ("x = 0 and state = 0: y = silu(bias)", _zeros("x", "state")),
    "huge": ("x, state, bias * 2^16 (atol * 2^16): past float16's range", _scaled(HUGE, HUGE, "x", "state", "bias")),
}
_SSD = {
    "zeros": ("x = 0 and a zero initial state: y = 0, final state 0", _zeros("x", "initial_state")),
    "huge": ("x and the initial state * 2^16 (atol * 2^16): states past float16's range",
             _scaled(HUGE, HUGE, "x", "initial_state")),
    "dt_floor": ("3/4 of the steps at dt = 0 (no update, no decay) or dt = 1e-3 (transformers' floor)", _dt_floor),
    "strong_decay": ("dt in [1, 20]: exp(dt A) underflows to 0 within a chunk (no exp(-cumsum) ratios)",
                     _strong_decay),
}
_SSD_STEP = {
    "zeros": ("x = 0 and state = 0: y = 0, new state 0", _zeros("x", "state")),
    "huge": ("x and state * 2^16 (atol * 2^16)", _scaled(HUGE, HUGE, "x", "state")),
    "dt_floor": _SSD["dt_floor"],
    "strong_decay": _SSD["strong_decay"],
}
_NVFP4 = {
    "zeros": ("all codes 0: every weight +0", _nvfp4_zeros),
    "all_codes": ("all 16 E2M1 codes in every 16-element block", _all_codes),
    "boundary_scales": ("all codes, E4M3 block scales at every boundary (subnormal, 448, negative, NaN "
                        "0x7F / 0xFF), global scale 1, 0, 2^-120 or 2^100", _boundary_scales),
}
CASES = {
    "rms_norm": _NORM,
    "gated_rms_norm": _GATED,
    "causal_conv1d": _CONV,
    "causal_conv1d_step": _CONV,
    "ssd_scan_chunked": _SSD,
    "ssd_step": _SSD_STEP,
    "gqa_attention": {
        "zeros": ("q = 0: every score 0, so each query averages the values it sees", _zeros("q")),
        "huge": ("q, k * 8: scores reach ~ +-200, past exp's float32 range (88): softmax needs the max "
                 "subtracted (atol * 32: a score near 200 carries 32x the rounding of one near 4)",
                 _scaled(8.0, 32.0, "q", "k")),
        "huge_values": ("v * 2^16 (atol * 2^16): outputs past float16's range", _scaled(HUGE, HUGE, "v")),
    },
    "route": {
        "ties": ("exact score ties (duplicated gate rows and biases, and groups): the LOWER expert wins", _ties),
        "zeros": ("x = 0, no bias: every score 0.5, all of it ties", _router_zeros),
        "saturated": ("sigmoid saturated to exactly 1.0: the saturated experts tie", _saturated),
    },
    "moe_experts": {
        "zeros": ("x = 0: y = 0", _zeros("x")),
        "huge": ("x * 2^8: relu2 squares it, so y ~ 2^16 (atol * 2^16)", _scaled(2.0 ** 8, HUGE, "x")),
        "skewed": ("every token on the same k experts, the others idle; a quarter of the weights 0", _skewed),
    },
    "nvfp4_matmul": {
        **_NVFP4,
        "zeros": ("x = 0: y = 0", _zeros("x")),
        "huge": ("x * 2^16 (atol * 2^16)", _scaled(HUGE, HUGE, "x")),
    },
    "nvfp4_dequantize": _NVFP4,
}

# op -> case -> dims -> True when the case can be built at these dims
NEEDS = {"route": {"ties": lambda d: d["e"] >= 2}}


def case_names(op):
    """The cases of ``op``: "random" first, then its adversarial ones."""
    return (RANDOM, *CASES[op])


def make_case(op, case, rng, dims, inputs, static):
    """-> (inputs, static, atol_scale) of ``case`` built from the op's random ``inputs`` (same rng)."""
    if case not in case_names(op):
        raise InputError(f"--case {case!r}: {op} has the cases {list(case_names(op))}")
    if case == RANDOM:
        return inputs, static, 1.0
    inputs, static, atol_scale = CASES[op][case][1](rng, dims, inputs, static)
    return inputs, static, float(atol_scale)
