"""Checkers for the notebooks' exercises: each ``check_*`` runs the student's answer against the reference.

Every checker returns a ``CheckResult``: truthy when the answer is right, and a message that says what was
compared and, when it is wrong, where it first went wrong (shape, dtype, or the first bad value). In a
notebook the result prints itself::

    from nemo_scratch.exercises import check_sequential_scan
    check_sequential_scan(my_scan)        # correct: ... / not yet: ...

The references are the package's own functions (ops/, model/mtp_cost.py, params), never a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checkpoint.schema import expected_tensors
from .config import preset
from .model.generate import token_probs
from .model.mtp_cost import expected_tokens_per_round, modelled_speedup
from .ops.attention import gqa_attention
from .ops.moe import route
from .ops.quant import e2m1_decode, nvfp4_dequantize, nvfp4_quantize
from .ops.ssd import discretize_dt, ssd_scan_sequential


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    message: str

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return ("correct: " if self.ok else "not yet: ") + self.message


def _call(fn, *args):
    """fn(*args), or the exception it raised as a CheckResult."""
    try:
        return fn(*args), None
    except Exception as exc:  # the student's code may fail in any way: report it, do not crash the checker
        return None, CheckResult(False, f"your function raised {type(exc).__name__}: {exc}")


def _compare(got, ref, what, rtol=1e-9, atol=1e-12, exact=False):
    """None when ``got`` matches ``ref`` (shape first, then values); else a failing CheckResult."""
    if got is None:
        return CheckResult(False, f"{what}: your function returned None")
    got, ref = np.asarray(got), np.array(ref, order="C")
    if got.shape != ref.shape:
        return CheckResult(False, f"{what}: shape {list(got.shape)}, expected {list(ref.shape)}")
    if not np.issubdtype(got.dtype, np.number):
        return CheckResult(False, f"{what}: dtype {got.dtype}, expected a numeric array")
    if exact:
        bad = got.astype(ref.dtype).view(np.uint8).reshape(*ref.shape, -1) != ref.view(np.uint8).reshape(
            *ref.shape, -1)
        bad = bad.any(axis=-1) if ref.ndim else bad.any()
    else:
        with np.errstate(invalid="ignore"):
            bad = ~(np.abs(got - ref) <= atol + rtol * np.abs(ref))
    if np.any(bad):
        first = tuple(int(i) for i in np.argwhere(np.atleast_1d(bad))[0]) if ref.ndim else ()
        n_bad = int(np.sum(bad))
        g, r = (got[first], ref[first]) if ref.ndim else (got, ref)
        how = "bit for bit" if exact else f"within rtol={rtol:g}, atol={atol:g}"
        return CheckResult(False, f"{what}: {n_bad} of {ref.size} values differ {how}; first at index "
                                  f"{list(first)}: yours {float(g):.6g}, expected {float(r):.6g}")
    return None


# ------------------------------------------------------------------------------------------ 01 selective scan

def _ssd_case(rng, b, t, h, p, g, n):
    x = rng.normal(size=(b, t, h, p))
    dt = discretize_dt(rng.normal(size=(b, t, h)), rng.normal(size=h) - 1.0)
    A = -np.exp(rng.normal(size=h))
    return x, dt, A, rng.normal(size=(b, t, g, n)), rng.normal(size=(b, t, g, n)), rng.normal(size=h)


def check_sequential_scan(fn):
    """fn(x [b,t,h,p], dt [b,t,h], A [h], B [b,t,g,n], C [b,t,g,n], D [h]) -> (y [b,t,h,p], state [b,h,p,n]).

    The Mamba-2 recurrence S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t, head hh using
    group hh // (h/g); compared in float64 with ``ssd_scan_sequential`` on shapes with g = 1, g < h, g = h.
    """
    rng = np.random.default_rng(1)
    shapes = [(1, 1, 2, 3, 1, 4), (2, 9, 4, 3, 2, 5), (1, 17, 6, 2, 6, 3), (1, 12, 8, 4, 2, 8)]
    for dims in shapes:
        case = _ssd_case(rng, *dims)
        out, err = _call(fn, *case)
        if err is not None:
            return err
        if not (isinstance(out, tuple) and len(out) == 2):
            return CheckResult(False, "return a pair (y, final_state)")
        y_ref, s_ref = ssd_scan_sequential(*case[:5], D=case[5])
        for got, ref, name in ((out[0], y_ref, "y"), (out[1], s_ref, "final_state")):
            if (bad := _compare(got, ref, f"{name} for (b,t,h,p,g,n)={dims}")) is not None:
                return bad
    return CheckResult(True, f"y and the final state equal ssd_scan_sequential on {len(shapes)} shapes")


def check_half_lives(half_lives, model):
    """half_lives: {mamba layer index: [h] tokens}: ln 2 / (softplus(dt_bias) |A|), the half-life at rest."""
    if not isinstance(half_lives, dict):
        return CheckResult(False, f"expected a dict {{layer index: array of h half-lives}}, got "
                                  f"{type(half_lives).__name__}")
    want = [i for i, p in enumerate(model.params["layers"]) if p["type"] == "mamba"]
    if sorted(half_lives) != want:
        return CheckResult(False, f"layers {sorted(half_lives)}, expected the Mamba layers {want}")
    for i in want:
        p = model.params["layers"][i]
        dt0 = discretize_dt(np.zeros_like(p["dt_bias"]), p["dt_bias"], *model.dt_limit)
        ref = (np.log(2) / (dt0 * -p["A"])).astype(np.float64)
        if (bad := _compare(half_lives[i], ref, f"layer {i}", rtol=1e-4, atol=1e-6)) is not None:
            return bad
    return CheckResult(True, f"half-lives of {sum(len(half_lives[i]) for i in want)} heads in {len(want)} layers")


# ------------------------------------------------------------------------------------------ 02 attention

def check_uniform_baseline(fn):
    """fn(t) -> {"entropy": [t], "self": [t], "distance": [t]} of uniform causal attention: query l spreads
    its weight evenly over keys 0..l (entropy in nats, weight on itself, mean distance l - s looked back)."""
    for t in (1, 5, 40):
        out, err = _call(fn, t)
        if err is not None:
            return err
        if not isinstance(out, dict) or set(out) != {"entropy", "self", "distance"}:
            return CheckResult(False, 'return a dict with the keys "entropy", "self" and "distance"')
        l = np.arange(t, dtype=np.float64)
        refs = {"entropy": np.log(l + 1), "self": 1 / (l + 1), "distance": l / 2}
        for key, ref in refs.items():
            if (bad := _compare(out[key], ref, f"{key} for t={t}", rtol=1e-9, atol=1e-12)) is not None:
                return bad
    return CheckResult(True, "entropy, self-weight and mean distance of uniform causal attention for t = 1, 5, 40")


def check_causal_attention(fn):
    """fn(q [t,dh], k [t,dh], v [t,dh]) -> o [t,dh]: one causal softmax-attention head, scaled by dh**-0.5."""
    rng = np.random.default_rng(2)
    for t, dh in ((1, 4), (7, 8), (20, 16)):
        q, k, v = (rng.normal(size=(t, dh)) for _ in range(3))
        out, err = _call(fn, q, k, v)
        if err is not None:
            return err
        ref = gqa_attention(q[None, :, None], k[None, :, None], v[None, :, None])[0, :, 0]
        if (bad := _compare(out, ref, f"o for t={t}, dh={dh}", rtol=1e-9, atol=1e-12)) is not None:
            return bad
    return CheckResult(True, "equals gqa_attention on one head for t = 1, 7, 20")


# ------------------------------------------------------------------------------------------ 03 router

def check_route(fn):
    """fn(x [t,d], gate [e,d], bias [e], k, scale) -> (idx [t,k], w [t,k]): sigmoid scores, top-k of
    (scores + bias), weights = the unbiased scores of the picked experts normalised to sum to ``scale``.
    Compared per token as {expert: weight}, so any order of the k picks is accepted."""
    rng = np.random.default_rng(3)
    for t, d, e, k in ((1, 4, 4, 1), (9, 8, 16, 4), (30, 12, 32, 6)):
        x, gate, bias = rng.normal(size=(t, d)), rng.normal(size=(e, d)), 0.3 * rng.normal(size=e)
        out, err = _call(fn, x, gate, bias, k, 2.5)
        if err is not None:
            return err
        if not (isinstance(out, tuple) and len(out) == 2):
            return CheckResult(False, "return a pair (idx, w)")
        idx_ref, w_ref = route(x, gate, bias, k, routed_scaling_factor=2.5)
        idx, w = np.asarray(out[0]), np.asarray(out[1], dtype=np.float64)
        if idx.shape != idx_ref.shape or w.shape != w_ref.shape:
            return CheckResult(False, f"shapes {list(idx.shape)}, {list(w.shape)}; expected [t, k] = "
                                      f"{list(idx_ref.shape)} for both")
        for row in range(t):
            if set(idx[row].tolist()) != set(idx_ref[row].tolist()):
                return CheckResult(False, f"t={t}, e={e}, k={k}: token {row} picks experts "
                                          f"{sorted(idx[row].tolist())}, expected {sorted(idx_ref[row].tolist())}"
                                          f" (is the bias added for selection?)")
        order, order_ref = np.argsort(idx, axis=1), np.argsort(idx_ref, axis=1)
        got_w = np.take_along_axis(w, order, 1)
        if (bad := _compare(got_w, np.take_along_axis(w_ref, order_ref, 1), f"weights for t={t}, k={k} (in "
                           f"expert order; unbiased scores?)", rtol=1e-9, atol=1e-12)) is not None:
            return bad
    return CheckResult(True, "the same experts and weights as ops/moe.py::route on three shapes")


def check_load_cv(fn):
    """fn(idx [t,k], n_experts) -> the coefficient of variation (std / mean) of tokens per expert."""
    rng = np.random.default_rng(4)
    # the last case leaves the upper half of the experts unpicked (dead experts are part of the load too)
    for t, k, e, used in ((10, 2, 4, 4), (50, 4, 32, 32), (12, 2, 16, 8)):
        idx = np.stack([rng.choice(used, k, replace=False) for _ in range(t)])
        out, err = _call(fn, idx, e)
        if err is not None:
            return err
        load = np.bincount(idx.ravel(), minlength=e)
        if (bad := _compare(np.float64(out), np.float64(load.std() / load.mean()),
                           f"CV for t={t}, k={k}, e={e} (count experts no token picked too)", rtol=1e-9)) is not None:
            return bad
    return CheckResult(True, "load CV of three routings, experts with no tokens included")


# ------------------------------------------------------------------------------------------ 04 MTP

ACCEPTANCE_CASES = ([0.0], [1.0], [0.7], [1.0, 1.0, 1.0], [0.8, 0.5, 0.2], [0.9, 0.0])


def check_expected_tokens(fn):
    """fn(acceptance_per_depth) -> expected tokens per speculative round (acceptance_per_depth[j-1] = share of
    rounds whose drafts 1..j were all accepted)."""
    for a in ACCEPTANCE_CASES:
        out, err = _call(fn, list(a))
        if err is not None:
            return err
        ref = np.float64(expected_tokens_per_round(a))
        if (bad := _compare(np.float64(out), ref, f"acceptance {a}")) is not None:
            return bad
    return CheckResult(True, f"tokens per round for {len(ACCEPTANCE_CASES)} acceptance profiles")


def check_speedup(fn):
    """fn(acceptance_per_depth, draft_ratio, verify_cost) -> modelled speedup over plain decoding."""
    cases = [(a, r, v) for a in ACCEPTANCE_CASES for r, v in ((0.0, 1.0), (0.25, 1.0), (0.1, 1.4))]
    for a, r, v in cases:
        out, err = _call(fn, list(a), r, v)
        if err is not None:
            return err
        if (bad := _compare(np.float64(out), np.float64(modelled_speedup(a, r, v)),
                           f"acceptance {a}, draft_ratio {r}, verify_cost {v}")) is not None:
            return bad
    return CheckResult(True, f"speedup for {len(cases)} cases")


# ------------------------------------------------------------------------------------------ 05 NVFP4

def check_e2m1_decode(fn):
    """fn(codes uint8 [16] in 0..15) -> float32 [16]: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0."""
    codes = np.arange(16, dtype=np.uint8)
    out, err = _call(fn, codes.copy())
    if err is not None:
        return err
    if np.asarray(out).dtype != np.float32:
        return CheckResult(False, f"dtype {np.asarray(out).dtype}, expected float32")
    what = "E2M1 values of codes 0..15 (code 8 is -0.0)"
    if (bad := _compare(out, e2m1_decode(codes), what, exact=True)) is not None:
        return bad
    return CheckResult(True, "all 16 E2M1 codes decode bit for bit, -0.0 included")


def check_nvfp4_dequantize(fn):
    """fn(packed [r, c/2] uint8, block_scale [r, c/16] uint8 E4M3, global_scale float32) -> W [r, c] float32.
    Low nibble = even column; W = e2m1(code) * e4m3(block scale) * global scale."""
    rng = np.random.default_rng(5)
    for r, c in ((1, 16), (3, 32), (8, 64)):
        q = nvfp4_quantize((rng.normal(size=(r, c)) * rng.lognormal(size=(r, 1))).astype(np.float32))
        out, err = _call(fn, q.packed, q.block_scale, np.float32(q.global_scale))
        if err is not None:
            return err
        ref = nvfp4_dequantize(q.packed, q.block_scale, q.global_scale)
        if (bad := _compare(out, ref, f"W for a [{r}, {c}] weight", exact=True)) is not None:
            return bad
    return CheckResult(True, "three packed weights decode bit for bit")


# ------------------------------------------------------------------------------------------ 06 full model

def check_bits_per_byte(fn, model):
    """fn(model, text) -> mean next-byte loss in bits over positions 1..t-1 (byte-level tokenizer)."""
    for text in ("Return the value.", "If the file is closed, raise ValueError.\n"):
        out, err = _call(fn, model, text)
        if err is not None:
            return err
        ids = np.array([model.tokenizer.encode(text)])
        probs = token_probs(model.forward(ids)[0, :-1])
        ref = -np.log2(probs[np.arange(ids.shape[1] - 1), ids[0, 1:]]).mean()
        what = f"bits per byte of {text!r}"
        if (bad := _compare(np.float64(out), np.float64(ref), what, rtol=1e-4, atol=1e-6)) is not None:
            return bad
    return CheckResult(True, "bits per byte on two texts")


def check_mamba_layer_params(fn):
    """fn(cfg) -> parameters of one Mamba mixer (in_proj, conv1d weight + bias, A_log, D, dt_bias, gated norm,
    out_proj; not the block's own pre-norm), for the tiny, Nano, Super and Ultra configs."""
    for name in ("tiny", "nano", "super", "ultra"):
        cfg = preset(name)
        layer = cfg.layers_block_type.index("mamba")
        ref = sum(s.numel for s in expected_tensors(cfg, include_mtp=False)
                  if s.layer == layer and s.block == "mamba" and s.role != "norm")
        out, err = _call(fn, cfg)
        if err is not None:
            return err
        if out != ref:
            return CheckResult(False, f"{name}: {out!r} parameters, expected {ref:,} (in_proj has i + conv_dim + h "
                                      f"rows: z | xBC | dt)")
    return CheckResult(True, "one Mamba mixer of tiny, Nano, Super and Ultra")
