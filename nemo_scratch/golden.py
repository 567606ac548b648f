"""Golden vectors for kernel authors: an op's random inputs and its reference outputs in float64 and float32.

    nemo-scratch golden --op ssd_scan_chunked --shape b=1,t=40,h=4,p=8,g=2,n=16,chunk=16 --out ssd.safetensors

The file holds ``in.<arg>`` (float64 inputs; cast them to float32 for the float32 reference),
``out64.<name>`` and ``out32.<name>``, and metadata: op, dims (JSON), seed, the nemo_scratch version and the
tolerance key of tests/tolerances.py. ``check_golden(path)`` recomputes with the reference and compares.
"""

from __future__ import annotations

import json

import numpy as np

from .errors import InputError
from .ops import attention, conv, moe, norm, quant, ssd


def _norm_inputs(rng, d):
    return {"x": rng.standard_normal((d["b"], d["t"], d["d"])), "weight": 1 + 0.1 * rng.standard_normal(d["d"])}, \
        {"eps": 1e-5}


def _gated_inputs(rng, d):
    i = d["i"]
    return {"y": rng.standard_normal((d["b"], d["t"], i)), "z": rng.standard_normal((d["b"], d["t"], i)),
            "weight": 1 + 0.1 * rng.standard_normal(i)}, {"n_groups": d["g"], "eps": 1e-5}


def _conv_inputs(rng, d):
    b, t, c, w = d["b"], d["t"], d["c"], d["w"]
    return {"x": rng.standard_normal((b, t, c)), "weight": 0.3 * rng.standard_normal((c, w)),
            "bias": 0.1 * rng.standard_normal(c), "state": rng.standard_normal((b, c, w))}, {}


def _conv_step_inputs(rng, d):
    b, c, w = d["b"], d["c"], d["w"]
    return {"x": rng.standard_normal((b, c)), "state": rng.standard_normal((b, c, w)),
            "weight": 0.3 * rng.standard_normal((c, w)), "bias": 0.1 * rng.standard_normal(c)}, {}


def _ssd_inputs(rng, d):
    b, t, h, p, g, n = d["b"], d["t"], d["h"], d["p"], d["g"], d["n"]
    return {"x": rng.standard_normal((b, t, h, p)), "dt": rng.uniform(0.001, 0.1, (b, t, h)),
            "A": -rng.uniform(1, 16, h), "B": rng.standard_normal((b, t, g, n)),
            "C": rng.standard_normal((b, t, g, n)), "D": rng.standard_normal(h),
            "initial_state": 0.1 * rng.standard_normal((b, h, p, n))}, {"chunk": d["chunk"]}


def _ssd_step_inputs(rng, d):
    b, h, p, g, n = d["b"], d["h"], d["p"], d["g"], d["n"]
    return {"x": rng.standard_normal((b, h, p)), "dt": rng.uniform(0.001, 0.1, (b, h)),
            "A": -rng.uniform(1, 16, h), "B": rng.standard_normal((b, g, n)), "C": rng.standard_normal((b, g, n)),
            "D": rng.standard_normal(h), "state": rng.standard_normal((b, h, p, n))}, {}


def _attn_inputs(rng, d):
    b, t, s, q, kv, dh = d["b"], d["t"], d["s"], d["q"], d["kv"], d["dh"]
    return {"q": rng.standard_normal((b, t, q, dh)), "k": rng.standard_normal((b, s, kv, dh)),
            "v": rng.standard_normal((b, s, kv, dh))}, {}


def _route_inputs(rng, d):
    return {"x": rng.standard_normal((d["t"], d["d"])), "gate_weight": 0.2 * rng.standard_normal((d["e"], d["d"])),
            "correction_bias": 0.05 * rng.standard_normal(d["e"])}, \
        {"top_k": d["k"], "n_group": d["n_group"], "topk_group": d["topk_group"], "routed_scaling_factor": 2.5}


def _experts_inputs(rng, d):
    t, e, k, f, l_ = d["t"], d["e"], d["k"], d["f"], d["l"]
    idx = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int64)
    return {"x": rng.standard_normal((t, l_)), "idx": idx, "weights": rng.uniform(0, 1, (t, k)),
            "up": 0.2 * rng.standard_normal((e, f, l_)), "down": 0.2 * rng.standard_normal((e, l_, f))}, {}


def _nvfp4_inputs(rng, d):
    w = quant.nvfp4_quantize(rng.standard_normal((d["out"], d["in"])).astype(np.float32))
    return {"x": rng.standard_normal((d["m"], d["in"])), "packed": w.packed, "block_scale": w.block_scale,
            "global_scale": np.asarray(w.global_scale, dtype=np.float32)}, {}


# op -> (default dims, inputs(rng, dims) -> (inputs, static kwargs), reference, output names, tolerance key)
OPS = {
    "rms_norm": (dict(b=1, t=8, d=64), _norm_inputs, norm.rms_norm, ("y",), "rms_norm"),
    "gated_rms_norm": (dict(b=1, t=8, i=64, g=4), _gated_inputs, norm.gated_rms_norm, ("y",), "gated_rms_norm"),
    "causal_conv1d": (dict(b=1, t=16, c=32, w=4), _conv_inputs, conv.causal_conv1d, ("y", "state"), "conv1d"),
    "causal_conv1d_step": (dict(b=1, c=32, w=4), _conv_step_inputs, conv.causal_conv1d_step, ("y", "state"),
                           "conv1d"),
    "ssd_scan_chunked": (dict(b=1, t=40, h=4, p=8, g=2, n=16, chunk=16), _ssd_inputs, ssd.ssd_scan_chunked,
                         ("y", "final_state"), "ssd"),
    "ssd_step": (dict(b=1, h=4, p=8, g=2, n=16), _ssd_step_inputs, ssd.ssd_step, ("y", "state"), "ssd_step"),
    "gqa_attention": (dict(b=1, t=16, s=16, q=4, kv=2, dh=16), _attn_inputs, attention.gqa_attention, ("o",),
                      "attention"),
    "route": (dict(t=8, d=64, e=16, k=4, n_group=1, topk_group=1), _route_inputs, moe.route, ("idx", "weights"),
              "router"),
    "moe_experts": (dict(t=8, e=8, k=2, f=32, l=16), _experts_inputs, moe.moe_experts, ("y",), "moe"),
    "nvfp4_matmul": (dict(m=2, out=32, **{"in": 64}), _nvfp4_inputs, quant.nvfp4_matmul, ("y",), "quant_matmul"),
}


def parse_dims(op, spec):
    """'b=1,t=16' -> dims dict over the op's defaults; InputError on unknown names or bad values."""
    if op not in OPS:
        raise InputError(f"--op {op!r} has no golden vectors; expected one of {sorted(OPS)}")
    dims = dict(OPS[op][0])
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, value = item.partition("=")
        if name not in dims:
            raise InputError(f"--shape: {op} has no dimension {name!r}; its dimensions are {sorted(dims)}")
        try:
            dims[name] = int(value)
        except ValueError:
            raise InputError(f"--shape: {name}={value!r} is not an integer") from None
        if dims[name] <= 0:
            raise InputError(f"--shape: {name} must be positive, got {dims[name]}")
    return dims


def compute(op, inputs, static, dtype):
    """Run the reference on the float inputs cast to ``dtype`` (integer and packed inputs as they are)."""
    fn = OPS[op][2]
    args = {k: (v.astype(dtype) if v.dtype.kind == "f" and k != "global_scale" else v) for k, v in inputs.items()}
    out = fn(**args, **static)
    return out if isinstance(out, tuple) else (out,)


def write_golden(op, shape_spec, out, seed=0):
    from . import __version__
    from .checkpoint.safetensors_io import write_safetensors

    dims = parse_dims(op, shape_spec)
    rng = np.random.default_rng(seed)
    try:
        inputs, static = OPS[op][1](rng, dims)
    except ValueError as exc:  # includes ShapeError from the ops' own checks
        raise InputError(f"--shape {dims} does not fit {op}: {exc}") from None
    tensors = {f"in.{k}": (np.asarray(v), _st_dtype(v)) for k, v in inputs.items()}
    for dtype, tag in ((np.float64, "out64"), (np.float32, "out32")):
        for name, value in zip(OPS[op][3], compute(op, inputs, static, dtype)):
            value = np.asarray(value)
            tensors[f"{tag}.{name}"] = (value, _st_dtype(value))
    meta = {"op": op, "dims": json.dumps(dims), "static": json.dumps(static), "seed": str(seed),
            "tolerance_key": OPS[op][4], "nemo_scratch_version": __version__}
    write_safetensors(out, tensors, metadata=meta)
    return out


def read_golden(path):
    """(op, inputs, static kwargs, {"out64": {...}, "out32": {...}}, metadata) from a golden file."""
    from .checkpoint.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    meta = f.metadata
    inputs, outs = {}, {"out64": {}, "out32": {}}
    for name in f.keys():
        tag, _, key = name.partition(".")
        if tag == "in":
            inputs[key] = f.get(name)
        else:
            outs[tag][key] = f.get(name)
    return meta["op"], inputs, json.loads(meta["static"]), outs, meta


def _st_dtype(a):
    return {"float64": "F64", "float32": "F32", "int64": "I64", "uint8": "U8"}[np.asarray(a).dtype.name]

