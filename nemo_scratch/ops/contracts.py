"""The argument rules of every op, in one place: ``check_<op>`` takes the op's own arguments.

The reference (ops/*.py) and every GPU launcher call the same check, so a wrong call fails with the same
``nemo_scratch.errors`` exception and message on every backend, before any GPU work. The backends' binder
(backends/numpy_backend.py::bind_kernels) calls ``CHECKS[op]`` to choose between a kernel and the
reference.

Every check returns a tuple whose FIRST entry is the compute dtype (np.float32 or np.float64; None for the
codec ops, whose inputs are uint8 codes and whose output is always float32), followed by the sizes the op
needs, in the order its docstring lists. Dimension letters: docs/glossary.md.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DtypeError, InputError, ShapeError
from .common import check_float, check_shape, get_xp
from .formats import BF16Weight, ExpertBank, FP8Weight, NVFP4Weight, is_packed

ACTIVATIONS = ("silu", None)
NVFP4_BLOCK = 16    # elements per E4M3 block scale (spec 9.3)


def dense(*weights):
    """The weights that are plain float arrays (packed ones are decoded inside ``linear``; None is absent)."""
    return [w for w in weights if w is not None and not is_packed(w)]


def last_dim(op, arg, x):
    """The width of the last axis of ``x`` (which must have one)."""
    if x.ndim < 1:
        raise ShapeError(f"{op}: {arg} has shape {list(x.shape)}, expected at least one axis [..., width]")
    return x.shape[-1]


# ------------------------------------------------------------------------------------------------ norms

def check_rms_norm(x, weight, eps, *, op="rms_norm"):  # -> (dtype, d)
    dtype = check_float(op, x, weight)
    d = last_dim(op, "x", x)
    check_shape(op, "weight", weight, (d,))
    return dtype, d


def check_gated_rms_norm(y, z, weight, n_groups, eps, *, op="gated_rms_norm"):  # -> (dtype, i)
    dtype = check_float(op, y, z, weight)
    i = last_dim(op, "y", y)
    check_shape(op, "z", z, tuple(y.shape))
    check_shape(op, "weight", weight, (i,))
    if not isinstance(n_groups, (int, np.integer)) or n_groups < 1 or i % n_groups:
        raise ShapeError(f"{op}: n_groups={n_groups!r} must be a positive integer that divides the width "
                         f"i={i} of y")
    return dtype, i


# ------------------------------------------------------------------------------------------------ conv

def check_activation(activation, *, op):
    if activation not in ACTIVATIONS:
        raise InputError(f"{op}: activation={activation!r}, expected one of {ACTIVATIONS}")


def check_conv_weights(weight, bias, c, *, op):  # -> w
    """weight [c, w] with w >= 1, bias [c] or None."""
    check_shape(op, "weight", weight, (c, None))
    if weight.shape[1] < 1:
        raise ShapeError(f"{op}: weight has shape {list(weight.shape)}, expected [c, w] with w >= 1")
    if bias is not None:
        check_shape(op, "bias", bias, (c,))
    return weight.shape[1]


def check_out_state(out_state, shape, dtype, *, op):
    """``out_state`` (the buffer a decode step writes its new state into) is None or [shape] of ``dtype``."""
    if out_state is None:
        return
    check_shape(op, "out_state", out_state, shape)
    if np.dtype(out_state.dtype) != dtype:
        raise DtypeError(f"{op}: out_state has dtype {out_state.dtype}, expected {dtype} (the state buffer)")
    if not out_state.flags.c_contiguous:
        raise ShapeError(f"{op}: out_state must be a C-contiguous array (the new state is written into it)")


def check_causal_conv1d(x, weight, bias, state=None, activation="silu", *, op="causal_conv1d"):
    # -> (dtype, b, t, c, w)
    check_activation(activation, op=op)
    dtype = check_float(op, x, weight, bias, state)
    check_shape(op, "x", x, (None, None, None))
    b, t, c = x.shape
    w = check_conv_weights(weight, bias, c, op=op)
    if state is not None:
        check_shape(op, "state", state, (b, c, w))
    return dtype, b, t, c, w


def check_causal_conv1d_step(x, state, weight, bias, activation="silu", out_state=None, *,
                             op="causal_conv1d_step"):  # -> (dtype, b, c, w)
    check_activation(activation, op=op)
    dtype = check_float(op, x, state, weight, bias)
    check_shape(op, "x", x, (None, None))
    b, c = x.shape
    w = check_conv_weights(weight, bias, c, op=op)
    check_shape(op, "state", state, (b, c, w))
    check_out_state(out_state, (b, c, w), dtype, op=op)
    return dtype, b, c, w


# ------------------------------------------------------------------------------------------------ SSD

def check_discretize_dt(dt_raw, dt_bias, dt_min=0.0, dt_max=math.inf, *, op="discretize_dt"):  # -> (dtype, h)
    dtype = check_float(op, dt_raw, dt_bias)
    if dt_raw.ndim < 1:
        raise ShapeError(f"{op}: dt_raw has shape {list(dt_raw.shape)}, expected [..., h]")
    check_shape(op, "dt_bias", dt_bias, (dt_raw.shape[-1],))
    return dtype, dt_raw.shape[-1]


def _check_ssd(op, x, dt, A, B, C, D, state, lead, state_name):
    """x [*lead,h,p], dt [*lead,h], A [h], B/C [*lead,g,n], D [h]|None, state [b,h,p,n]|None; h % g == 0."""
    dtype = check_float(op, x, dt, A, B, C, D, state)
    check_shape(op, "x", x, (None,) * (lead + 2))
    *lead_shape, h, p = x.shape
    lead_shape = tuple(lead_shape)
    check_shape(op, "dt", dt, (*lead_shape, h))
    check_shape(op, "A", A, (h,))
    check_shape(op, "B", B, (*lead_shape, None, None))
    g, n = B.shape[-2:]
    check_shape(op, "C", C, (*lead_shape, g, n))
    if g < 1 or h % g:
        raise ShapeError(f"{op}: B and C have g={g} groups, expected a divisor of the h={h} heads of x")
    if D is not None:
        check_shape(op, "D", D, (h,))
    if state is not None:
        check_shape(op, state_name, state, (lead_shape[0], h, p, n))
    return dtype, h, p, g, n


def check_ssd_scan_sequential(x, dt, A, B, C, D=None, initial_state=None, *, op="ssd_scan_sequential"):
    # -> (dtype, b, t, h, p, g, n)
    dtype, h, p, g, n = _check_ssd(op, x, dt, A, B, C, D, initial_state, 2, "initial_state")
    return (dtype, *x.shape[:2], h, p, g, n)


def check_ssd_scan_chunked(x, dt, A, B, C, chunk, D=None, initial_state=None, *, op="ssd_scan_chunked"):
    # -> (dtype, b, t, h, p, g, n, q): q = the chunk length actually used (<= t)
    dtype, b, t, h, p, g, n = check_ssd_scan_sequential(x, dt, A, B, C, D, initial_state, op=op)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"{op}: chunk={chunk!r}, expected a positive integer")
    # a chunk longer than the sequence is one chunk of length t
    return dtype, b, t, h, p, g, n, min(int(chunk), max(t, 1))


def check_ssd_step(x, dt, A, B, C, D, state, out_state=None, *, op="ssd_step"):  # -> (dtype, b, h, p, g, n)
    if state is None:
        raise InputError(f"{op}: state is None, expected the cached SSM state [b,h,p,n]")
    dtype, h, p, g, n = _check_ssd(op, x, dt, A, B, C, D, state, 1, "state")
    check_out_state(out_state, (x.shape[0], h, p, n), dtype, op=op)
    return dtype, x.shape[0], h, p, g, n


# ------------------------------------------------------------------------------------------------ attention

def check_gqa_attention(q, k, v, causal=True, *, op="gqa_attention"):  # -> (dtype, b, t, s, nq, nkv, dh)
    """The t queries are the LAST t of the s key positions: 1 <= s, t <= s; kv heads divide q heads."""
    dtype = check_float(op, q, k, v)
    check_shape(op, "q", q, (None, None, None, None))
    b, t, nq, dh = q.shape
    check_shape(op, "k", k, (b, None, None, dh))
    s, nkv = k.shape[1:3]
    check_shape(op, "v", v, (b, s, nkv, dh))
    if s < 1 or t > s:
        raise ShapeError(f"{op}: q has t={t} positions but k has only s={s}; the queries are the last t "
                         f"of the s key positions, so 1 <= s and t <= s")
    if nkv < 1 or nq % nkv:
        raise ShapeError(f"{op}: q has {nq} heads, k has {nkv}; expected the kv heads to divide the q heads")
    return dtype, b, t, s, nq, nkv, dh


def check_gqa_decode(q, k, v, *, op="gqa_decode"):  # -> (dtype, b, t, s, nq, nkv, dh)
    return check_gqa_attention(q, k, v, op=op)


# ------------------------------------------------------------------------------------------------ MoE

def check_route(x, gate_weight, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                routed_scaling_factor=1.0, *, op="route"):  # -> (dtype, t, d, e)
    dtype = check_float(op, x, *dense(gate_weight), correction_bias)
    check_shape(op, "x", x, (None, None))
    t, d = x.shape
    check_shape(op, "gate_weight", gate_weight, (None, d))
    e = gate_weight.shape[0]
    if correction_bias is not None:
        check_shape(op, "correction_bias", correction_bias, (e,))
    if not 1 <= n_group <= e or e % n_group:
        raise InputError(f"{op}: n_group={n_group} must divide the e={e} experts")
    if not 1 <= topk_group <= n_group:
        raise InputError(f"{op}: topk_group={topk_group}, expected 1 <= topk_group <= n_group={n_group}")
    if not 1 <= top_k <= topk_group * (e // n_group):
        raise InputError(f"{op}: top_k={top_k}, expected 1 <= top_k <= {topk_group * (e // n_group)} (the "
                         f"experts in the topk_group={topk_group} kept groups of {e // n_group})")
    return dtype, t, d, e


def check_relu2(x, *, op="relu2"):  # -> (dtype,)
    return (check_float(op, x),)


def check_mlp(x, up, down, *, op="mlp"):  # -> (dtype, d, f)
    dtype = check_float(op, x, *dense(up, down))
    d = last_dim(op, "x", x)
    check_shape(op, "up", up, (None, d))
    check_shape(op, "down", down, (d, up.shape[0]))
    _check_packed(op, up=up, down=down)
    return dtype, d, up.shape[0]


def check_moe_experts(x, idx, weights, up, down, *, op="moe_experts"):  # -> (dtype, t, l, e, f, k)
    """x [t,l], idx [t,k] distinct expert ids in [0, e), weights [t,k], up [e,f,l], down [e,l,f]."""
    dtype = check_float(op, x, weights, *dense(up, down))
    check_shape(op, "x", x, (None, None))
    t, l = x.shape
    check_shape(op, "idx", idx, (t, None))
    check_shape(op, "weights", weights, tuple(idx.shape))
    check_shape(op, "up", up, (None, None, l))
    e, f = up.shape[:2]
    check_shape(op, "down", down, (e, l, f))
    if not np.issubdtype(idx.dtype, np.integer):
        raise DtypeError(f"{op}: idx has dtype {idx.dtype}, expected integer expert indices")
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= e:
            raise InputError(f"{op}: idx holds expert ids in [{lo}, {hi}], expected [0, {e}) for the e={e} "
                             "experts of up/down")
        ordered = get_xp(idx).sort(idx, axis=-1)
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise InputError(f"{op}: idx names one expert twice for a token; route() picks k distinct experts")
    _check_packed(op, up=up, down=down)
    return dtype, t, l, e, f, idx.shape[1]


def check_latent_moe(x, idx, weights, up, down, fc1=None, fc2=None, *, op="latent_moe"):  # -> (dtype, t, d, l)
    """fc1 [l,d] squeezes x [t,d] to the experts' width l, fc2 [d,l] expands back; None = identity (l = d)."""
    dtype = check_float(op, x, *dense(fc1, fc2))
    check_shape(op, "x", x, (None, None))
    t, d = x.shape
    l = up.shape[-1]
    if fc1 is not None:
        check_shape(op, "fc1", fc1, (l, d))
    if fc2 is not None:
        check_shape(op, "fc2", fc2, (d, l))
    _check_packed(op, fc1=fc1, fc2=fc2)
    return dtype, t, d, l


# ------------------------------------------------------------------------------------------------ linear, codecs

def check_linear(x, w, *, op="linear"):  # -> (dtype, out, in)
    dtype = check_float(op, x, *dense(w))
    if len(w.shape) != 2:
        raise ShapeError(f"{op}: the weight has shape {list(w.shape)}, expected [out, in] (index stacked "
                         "experts with w[e] first)")
    out, inn = w.shape
    if x.ndim == 0 or x.shape[-1] != inn:
        raise ShapeError(f"{op}: x has shape {list(x.shape)}, expected [..., {inn}] (the weight's in)")
    _check_packed(op, w=w)
    return dtype, out, inn


def _check_packed(op, **weights):
    """A packed weight among the arguments obeys its codec's own rules (a bank's experts share one format and
    shape, ops/formats.py, so its first expert stands for all)."""
    for arg, w in weights.items():
        if isinstance(w, ExpertBank):
            w = w[0]
        if isinstance(w, BF16Weight):
            check_bf16_decode(w.bits, op=f"{op} ({arg})")
        elif isinstance(w, NVFP4Weight):
            check_nvfp4(w.packed, w.block_scale, w.global_scale, op=f"{op} ({arg})")
        elif isinstance(w, FP8Weight):
            check_fp8(w.data, w.scale, op=f"{op} ({arg})")


def check_codes(codes, limit, *, op, arg="codes"):
    """uint8 codes, each <= limit (15 for 4-bit E2M1 codes, 255 for bytes)."""
    if np.dtype(codes.dtype) != np.uint8:
        raise DtypeError(f"{op}: {arg} has dtype {codes.dtype}, expected uint8 codes")
    if limit < 255 and codes.size and int(codes.max()) > limit:
        raise InputError(f"{op}: {arg} holds code {int(codes.max())}, expected 4-bit codes 0..{limit}")


def check_e2m1_decode(codes, *, op="e2m1_decode"):  # -> (None,)
    check_codes(codes, 15, op=op)
    return (None,)


def check_e4m3_decode(codes, *, op="e4m3_decode"):  # -> (None,)
    check_codes(codes, 255, op=op)
    return (None,)


def check_nvfp4(packed, block_scale, global_scale, *, op):  # -> (lead, out, in)
    """The ModelOpt NVFP4 triple: packed u8 [..., out, in/2], block_scale u8 [..., out, in/16], f32 [...]."""
    for arg, a in (("packed", packed), ("block_scale", block_scale)):
        if np.dtype(a.dtype) != np.uint8:
            raise DtypeError(f"{op}: {arg} has dtype {a.dtype}, expected uint8"
                             + (" (E4M3 bit patterns)" if arg == "block_scale" else " (two E2M1 codes a byte)"))
    if np.dtype(global_scale.dtype) != np.float32:
        raise DtypeError(f"{op}: global_scale has dtype {global_scale.dtype}, expected float32")
    if packed.ndim < 2:
        raise ShapeError(f"{op}: packed has shape {list(packed.shape)}, expected [..., out, in/2]")
    *lead, out, half = packed.shape
    inn = 2 * half
    if inn % NVFP4_BLOCK:
        raise ShapeError(f"{op}: packed has in/2={half} bytes a row, so in={inn} is not a multiple of "
                         f"{NVFP4_BLOCK}")
    check_shape(op, "block_scale", block_scale, (*lead, out, inn // NVFP4_BLOCK))
    if tuple(global_scale.shape) not in (tuple(lead), (*lead, 1)):
        raise ShapeError(f"{op}: global_scale has shape {list(global_scale.shape)}, expected {lead} "
                         "(one per tensor, or per stacked expert)")
    return tuple(lead), out, inn


def check_fp8(data, scale, *, op):  # -> (out, in)
    """The ModelOpt FP8 pair: data u8 [..., out, in] (E4M3 bit patterns), scale f32 [...]."""
    if np.dtype(data.dtype) != np.uint8:
        raise DtypeError(f"{op}: data has dtype {data.dtype}, expected uint8 (E4M3 bit patterns)")
    if np.dtype(scale.dtype) != np.float32:
        raise DtypeError(f"{op}: scale has dtype {scale.dtype}, expected float32")
    if data.ndim < 2:
        raise ShapeError(f"{op}: data has shape {list(data.shape)}, expected [..., out, in]")
    lead = tuple(data.shape[:-2])
    if tuple(scale.shape) not in (lead, (*lead, 1)):
        raise ShapeError(f"{op}: scale has shape {list(scale.shape)}, expected {list(lead)} "
                         "(one per tensor, or per stacked expert)")
    return data.shape[-2], data.shape[-1]


def check_nvfp4_dequantize(packed, block_scale, global_scale, *, op="nvfp4_dequantize"):  # -> (None, lead, out, in)
    return (None, *check_nvfp4(packed, block_scale, global_scale, op=op))


def check_fp8_dequantize(data, scale, *, op="fp8_dequantize"):  # -> (None, out, in)
    return (None, *check_fp8(data, scale, op=op))


def _check_matmul(op, x, inn, weight_ndim, rows_per_tile):  # -> dtype
    dtype = check_float(op, x)
    if weight_ndim != 2:
        raise ShapeError(f"{op}: the weight has {weight_ndim} dims, expected [out, in] (index stacked "
                         "experts with w[e] first)")
    if x.ndim == 0 or x.shape[-1] != inn:
        raise ShapeError(f"{op}: x has shape {list(x.shape)}, expected [..., {inn}] (the weight's in)")
    if rows_per_tile is not None and (isinstance(rows_per_tile, bool) or not isinstance(rows_per_tile, int)
                                      or rows_per_tile <= 0):
        raise InputError(f"{op}: rows_per_tile must be a positive integer (or None: the op's own tile), got "
                         f"{rows_per_tile!r}")
    return dtype


def check_bf16_decode(bits, *, op="bf16_decode"):  # -> (None,)
    if np.dtype(bits.dtype) != np.uint16:
        raise DtypeError(f"{op}: bits has dtype {bits.dtype}, expected uint16 (bfloat16 bit patterns)")
    return (None,)


def check_bf16_matmul(x, bits, rows_per_tile=None, *, op="bf16_matmul"):  # -> (dtype, out, in)
    check_bf16_decode(bits, op=op)
    out, inn = bits.shape[-2:] if bits.ndim >= 2 else (0, 0)
    return _check_matmul(op, x, inn, bits.ndim, rows_per_tile), out, inn


def check_dense_matmul(x, w, rows_per_tile=None, *, op="dense_matmul"):  # -> (dtype, out, in)
    dtype = check_float(op, x, w)
    out, inn = w.shape[-2:] if w.ndim >= 2 else (0, 0)
    _check_matmul(op, x, inn, w.ndim, rows_per_tile)
    return dtype, out, inn


def check_nvfp4_matmul(x, packed, block_scale, global_scale, rows_per_tile=128, *, op="nvfp4_matmul"):
    # -> (dtype, out, in)
    _, out, inn = check_nvfp4(packed, block_scale, global_scale, op=op)
    return _check_matmul(op, x, inn, packed.ndim, rows_per_tile), out, inn


def check_fp8_matmul(x, data, scale, rows_per_tile=128, *, op="fp8_matmul"):  # -> (dtype, out, in)
    out, inn = check_fp8(data, scale, op=op)
    return _check_matmul(op, x, inn, data.ndim, rows_per_tile), out, inn


# op name (a backend method) -> its check. ``ssd_scan`` is the backends' name for the prefill scan.
CHECKS = {
    "rms_norm": check_rms_norm,
    "gated_rms_norm": check_gated_rms_norm,
    "causal_conv1d": check_causal_conv1d,
    "causal_conv1d_step": check_causal_conv1d_step,
    "discretize_dt": check_discretize_dt,
    "ssd_scan_sequential": check_ssd_scan_sequential,
    "ssd_scan_chunked": check_ssd_scan_chunked,
    "ssd_scan": check_ssd_scan_chunked,
    "ssd_step": check_ssd_step,
    "gqa_attention": check_gqa_attention,
    "gqa_decode": check_gqa_decode,
    "route": check_route,
    "relu2": check_relu2,
    "mlp": check_mlp,
    "moe_experts": check_moe_experts,
    "latent_moe": check_latent_moe,
    "linear": check_linear,
    "bf16_decode": check_bf16_decode,
    "bf16_matmul": check_bf16_matmul,
    "dense_matmul": check_dense_matmul,
    "e2m1_decode": check_e2m1_decode,
    "e4m3_decode": check_e4m3_decode,
    "nvfp4_dequantize": check_nvfp4_dequantize,
    "nvfp4_matmul": check_nvfp4_matmul,
    "fp8_dequantize": check_fp8_dequantize,
    "fp8_matmul": check_fp8_matmul,
}
