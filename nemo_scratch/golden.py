"""Golden vectors for kernel authors: an op's inputs and its reference outputs in float64 and float32.

    nemo-scratch golden --op ssd_scan_chunked --shape b=1,t=40,h=4,p=8,g=2,n=16,chunk=16 --out ssd.safetensors
    nemo-scratch golden --op route --case ties --out route_ties.safetensors

The file is plain safetensors. It holds ``in.<arg>`` (float inputs in float64: cast them to float32 for the
float32 reference; integer and packed inputs as the op takes them), ``out64.<name>`` and ``out32.<name>``,
and string metadata: op, case, dims and static (JSON), seed, nemo_scratch_version, tolerance_key and
kernel_tolerance_key (keys of tests/tolerances.py, or "exact" for bit-exact decodes), atol_scale and
kernel_rtol / kernel_atol (the float32 kernel tolerance, its atol times atol_scale, copied for readers
without the table). ``--case`` picks the inputs: "random" (default) or one of the op's tie and boundary cases
(golden_cases.py). docs/oracle.md says how to read and compare it; ``check_golden(path)`` recomputes with the
reference and compares.

The public pieces a kernel author builds on (nemo_scratch.oracle does): ``OPS`` (each op's default dims,
input maker, reference, output names and tolerance key), ``parse_dims``, ``cast_inputs``, ``compute``,
``kernel_key`` and ``compare``.

Bounds: every dimension is at most MAX_DIM and the inputs of one file at most MAX_ELEMENTS elements; the
memory the reference needs is estimated from the dims (``golden_bytes``) and refused before anything is
drawn when it exceeds what the machine has (nemo_scratch/memory.py). A file read back must hold exactly
the inputs and outputs of its op, with the shapes its ``dims`` metadata implies (``INPUT_SHAPES``), its
static arguments, case and tolerance key must be ones the op takes: anything else is a CheckpointError
naming the file and the tensor or field.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .errors import CheckpointError, InputError, NemoScratchError
from .golden_cases import RANDOM, case_names, make_case
from .golden_compare import EXACT, check_layout, compare, kernel_key, rtol_atol, tolerance_table  # noqa: F401
from .ops import attention, conv, moe, norm, quant, ssd
from .golden_sizes import INPUT_SHAPES, MAX_DIM, MAX_ELEMENTS, check_size, golden_bytes  # noqa: F401
from .strict_json import brief, parse_json

# ------------------------------------------------------------------------------------------------ inputs
# Each maker takes (rng, dims) and returns (array inputs by argument name, static keyword arguments).

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
    if k > e:
        raise InputError(f"each token is routed to k={k} distinct experts, so k <= e={e}")
    idx = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int64)
    return {"x": rng.standard_normal((t, l_)), "idx": idx, "weights": rng.uniform(0, 1, (t, k)),
            "up": 0.2 * rng.standard_normal((e, f, l_)), "down": 0.2 * rng.standard_normal((e, l_, f))}, {}


def _nvfp4_weight(rng, d):
    w = quant.nvfp4_quantize(rng.standard_normal((d["out"], d["in"])).astype(np.float32))
    return {"packed": w.packed, "block_scale": w.block_scale, "global_scale": np.asarray(w.global_scale)}


def _nvfp4_matmul_inputs(rng, d):
    return {"x": rng.standard_normal((d["m"], d["in"])), **_nvfp4_weight(rng, d)}, {}


def _nvfp4_dequantize_inputs(rng, d):
    return _nvfp4_weight(rng, d), {}


# op -> (default dims, inputs(rng, dims) -> (inputs, static kwargs), reference, output names, tolerance key).
# The reference is called as reference(**inputs, **static) and returns the outputs in this order.
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
    "nvfp4_matmul": (dict(m=2, out=32, **{"in": 64}), _nvfp4_matmul_inputs, quant.nvfp4_matmul, ("y",),
                     "quant_matmul"),
    "nvfp4_dequantize": (dict(out=32, **{"in": 64}), _nvfp4_dequantize_inputs, quant.nvfp4_dequantize, ("w",),
                         EXACT),
}


# ------------------------------------------------------------------------------------------------ files

def parse_dims(op, spec):
    """'b=1,t=16' -> dims dict over the op's defaults; InputError on unknown names or bad values."""
    if op not in OPS:
        raise InputError(f"--op {op!r} has no golden vectors; expected one of {sorted(OPS)}")
    dims = dict(OPS[op][0])
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, value = item.partition("=")
        if name not in dims:
            raise InputError(f"--shape: {op} has no dimension {name!r}; its dimensions are {sorted(dims)}")
        if not re.fullmatch(r"[+-]?[0-9]{1,30}", value.strip()):
            raise InputError(f"--shape: {name}={value!r} is not an integer")
        dims[name] = int(value)
        if dims[name] <= 0:
            raise InputError(f"--shape: {name} must be positive, got {dims[name]}")
        if dims[name] > MAX_DIM:
            raise InputError(f"--shape: {name}={dims[name]} is more than the bound {MAX_DIM} of a golden dimension")
    return dims


def cast_inputs(inputs, dtype):
    """The inputs a ``dtype`` run takes: float arrays cast to ``dtype``, integer and packed ones as they are
    (an NVFP4 global_scale is part of the packed weight: float32 in every mode)."""
    return {k: (v.astype(dtype) if v.dtype.kind == "f" and k != "global_scale" else v) for k, v in inputs.items()}


def compute(op, inputs, static, dtype):
    """Run the reference on ``cast_inputs(inputs, dtype)`` -> a tuple of outputs (OPS[op][3] names them)."""
    out = OPS[op][2](**cast_inputs(inputs, dtype), **static)
    return out if isinstance(out, tuple) else (out,)


def write_golden(op, shape_spec, out, seed=0, overwrite=False, case=RANDOM):
    """Write the golden file of ``op`` at the dims ``shape_spec`` ('t=40,chunk=16') to ``out``; return out.

    ``case`` names the inputs: "random", or one of the op's tie and boundary cases (golden_cases.CASES).
    An existing ``out`` is refused unless ``overwrite=True``; the file appears only once complete."""
    from . import __version__
    from .checkpoint.safe_write import check_destination
    from .checkpoint.safetensors_io import write_safetensors

    dims = parse_dims(op, shape_spec)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise InputError(f"--seed must be a non-negative integer below 2**64, got {seed!r}")
    check_destination(out, overwrite, what="golden: --out", kind="file")
    check_size(op, dims)
    if case not in case_names(op):
        raise InputError(f"--case {case!r}: {op} has the cases {list(case_names(op))}")
    rng = np.random.default_rng(seed)
    key = OPS[op][4]
    try:
        inputs, static = OPS[op][1](rng, dims)
        inputs, static, atol_scale = make_case(op, case, rng, dims, inputs, static)
        outputs = {tag: compute(op, inputs, static, dtype) for tag, dtype in (("out64", np.float64),
                                                                              ("out32", np.float32))}
    except (NemoScratchError, ValueError) as exc:  # the ops' own ShapeError / InputError name the misfit
        raise InputError(f"--shape {shape_spec or ''!r} (dims {dims}) does not fit {op}: {exc}") from None
    tensors = {f"in.{k}": v for k, v in inputs.items()}
    for tag, values in outputs.items():
        tensors.update({f"{tag}.{name}": value for name, value in zip(OPS[op][3], values)})
    kernel_rtol, kernel_atol = rtol_atol(kernel_key(key), np.float32)
    meta = {"op": op, "case": case, "dims": json.dumps(dims), "static": json.dumps(static), "seed": str(seed),
            "tolerance_key": key, "kernel_tolerance_key": kernel_key(key), "atol_scale": repr(atol_scale),
            "kernel_rtol": repr(float(kernel_rtol)), "kernel_atol": repr(float(kernel_atol) * atol_scale),
            "nemo_scratch_version": __version__}
    check_destination(out, overwrite, what="golden: --out", kind="file")
    write_safetensors(out, {name: (np.asarray(v), _st_dtype(v)) for name, v in tensors.items()}, metadata=meta)
    return out


def read_golden(path):
    """(op, inputs, static kwargs, {"out64": {...}, "out32": {...}}, metadata) from a golden file, validated:
    metadata fields, input names, dtypes and shapes (against ``dims``), output names."""
    from .checkpoint.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    meta = f.metadata or {}
    missing = [k for k in ("op", "static", "tolerance_key") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a golden file: its metadata lacks {missing} (write one with "
                              "`nemo-scratch golden`)")
    op = meta["op"]
    if op not in OPS:
        raise CheckpointError(f"{path}: golden file of op {brief(op)}, expected one of {sorted(OPS)}")
    defaults, make = OPS[op][0], OPS[op][1]
    want_inputs, want_static = make(np.random.default_rng(0), defaults)   # names and dtypes, at the small defaults
    dims = _meta_json(path, meta, "dims") if "dims" in meta else None
    if dims is not None:
        if sorted(dims) != sorted(defaults) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       and 0 < v <= MAX_DIM for v in dims.values()):
            raise CheckpointError(f"{path}: metadata 'dims' is {brief(dims)}, expected positive integers "
                                  f"<= {MAX_DIM} for {sorted(defaults)}")
        shapes = INPUT_SHAPES[op](dims)
    inputs, outs = {}, {"out64": {}, "out32": {}}
    for name in f.keys():
        tag, _, arg = name.partition(".")
        if tag not in ("in", "out64", "out32") or not arg:
            raise CheckpointError(f"{path}: tensor {name!r} is not in.<arg>, out64.<name> or out32.<name>")
        if tag == "in":
            if arg not in want_inputs:
                raise CheckpointError(f"{path}: tensor {name!r} is not an input of {op} ({sorted(want_inputs)})")
            if f.dtype_of(name) != _st_dtype(want_inputs[arg]):
                raise CheckpointError(f"{path}: tensor {name!r} is {f.dtype_of(name)}, expected "
                                      f"{_st_dtype(want_inputs[arg])}")
            if dims is not None and tuple(f.shape_of(name)) != tuple(shapes[arg]):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(f.shape_of(name))}, but the "
                                      f"metadata dims {dims} give {list(shapes[arg])}")
        (inputs if tag == "in" else outs[tag])[arg] = np.array(f.get(name))
    for tag, found in outs.items():
        if sorted(found) != sorted(OPS[op][3]):
            raise CheckpointError(f"{path}: {tag} holds {sorted(found)}, expected the outputs "
                                  f"{sorted(OPS[op][3])} of {op}")
    if sorted(inputs) != sorted(want_inputs):
        raise CheckpointError(f"{path}: inputs {sorted(inputs)}, expected in.<arg> for {sorted(want_inputs)} of {op}")
    static = _meta_json(path, meta, "static")
    if sorted(static) != sorted(want_static) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in static.values()):
        raise CheckpointError(f"{path}: metadata 'static' is {brief(static)}, expected the numeric arguments "
                              f"{sorted(want_static)} of {op}")
    key = meta["tolerance_key"]
    if key != EXACT and (key, "float32") not in tolerance_table():
        raise CheckpointError(f"{path}: metadata 'tolerance_key' {brief(key)} is not a key of "
                              "nemo_scratch/tolerances.py (nor 'exact')")
    if meta.get("case", RANDOM) not in case_names(op):
        raise CheckpointError(f"{path}: metadata 'case' {brief(meta['case'])} is not a case of {op} "
                              f"({list(case_names(op))})")
    atol_scale(path, meta)
    if dims is not None:
        check_size(op, dims, where=f"{path}: dims")
    return op, inputs, static, outs, meta


def atol_scale(path, meta):
    """The file's atol_scale (1.0 in files written before cases had one): a finite positive number."""
    text = meta.get("atol_scale", "1.0")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0) or len(text) > 40:
        raise CheckpointError(f"{path}: metadata 'atol_scale' is {brief(text)}, expected a positive number")
    return value


def _meta_json(path, meta, key) -> dict:
    value = parse_json(meta[key], f"{path}: metadata {key!r}", error=CheckpointError)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata {key!r} is {brief(value)}, expected a JSON object")
    return value


def check_golden(path):
    """Recompute a golden file with the reference and compare -> {"out64"|"out32"|"out32_vs_out64": {name: errors}}.

    out64: the float64 reference now vs the file, with (tolerance_key, float64);
    out32: the float32 reference now vs the file, with (tolerance_key, float32);
    out32_vs_out64: the file's float32 outputs vs its float64 ones, with (tolerance_key, float32);
    each with the file's atol_scale. errors = compare(...) = {"max_abs", "max_rel", "used", "first_bad",
    "n_bad", "reason"}. Raises CheckpointError naming the tensor, the reason and the first bad index when
    any comparison fails.
    """
    op, inputs, static, outs, meta = read_golden(path)
    key, scale = meta["tolerance_key"], atol_scale(path, meta)
    try:
        now = {tag: dict(zip(OPS[op][3], compute(op, inputs, static, dtype)))
               for tag, dtype in (("out64", np.float64), ("out32", np.float32))}
    except (NemoScratchError, ValueError, TypeError) as exc:   # inputs that do not fit together
        raise CheckpointError(f"{path}: the inputs of this golden file do not fit {op}: {exc}") from None
    report = {"out64": {}, "out32": {}, "out32_vs_out64": {}}
    for name in OPS[op][3]:
        report["out64"][name] = compare(now["out64"][name], outs["out64"][name], key, np.float64, scale)
        report["out32"][name] = compare(now["out32"][name], outs["out32"][name], key, np.float32, scale)
        report["out32_vs_out64"][name] = compare(outs["out32"][name], outs["out64"][name], key, np.float32, scale)
    for check, by_name in report.items():
        for name, e in by_name.items():
            if e["used"] > 1:
                where = "" if e["first_bad"] is None else f", first at index {list(e['first_bad'])}"
                raise CheckpointError(f"{path}: {check} {name!r} of {op} is out of tolerance ({key!r}): "
                                      f"{e['reason']}{where}; max abs err {e['max_abs']:.3e}, max rel err "
                                      f"{e['max_rel']:.3e}, {100 * e['used']:.1f}% of the budget "
                                      "atol + rtol*|ref|")
    return report


def _st_dtype(a):
    return {"float64": "F64", "float32": "F32", "int64": "I64", "uint8": "U8"}[np.asarray(a).dtype.name]
