"""Where a wrong result is wrong, and why: the chunk, block or tile of the first bad element, and the cause
when the result matches a known mistake (a tie broken the wrong way, a transposed or non-causal result, an
off-by-one block scale, a dropped chunk carry).

``AXES[op][output]`` names each output's axes with the glossary letters (docs/glossary.md);
``where(...)`` turns an index into words; ``causes(...)`` re-runs the reference with one mistake built in
(or inspects the inputs) and returns a sentence for each mistake the result matches.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..golden_compare import compare
from ..ops import attention, norm, quant, ssd
from ..ops.moe import moe_experts
from ..ops.quant import E2M1_VALUES, E4M3_VALUES, NVFP4_BLOCK
from .strategies import WARP

AXES = {
    "rms_norm": {"y": "b t d"},
    "gated_rms_norm": {"y": "b t i"},
    "causal_conv1d": {"y": "b t c", "state": "b c w"},
    "causal_conv1d_step": {"y": "b c", "state": "b c w"},
    "ssd_scan_chunked": {"y": "b t h p", "final_state": "b h p n"},
    "ssd_step": {"y": "b h p", "state": "b h p n"},
    "gqa_attention": {"o": "b t q dh"},
    "route": {"idx": "t k", "weights": "t k"},
    "moe_experts": {"y": "t l"},
    "nvfp4_matmul": {"y": "m out"},
    "nvfp4_dequantize": {"w": "out in"},
}


def axes(op, name):
    return AXES[op][name].split()


def index_text(op, name, index):
    """y[0, 37, 2, 1] (b=0, t=37, h=2, p=1)"""
    letters = ", ".join(f"{a}={i}" for a, i in zip(axes(op, name), index))
    return f"{name}[{', '.join(map(str, index))}] ({letters})"


def _lane(i):
    return f"lane {i % WARP} of warp {i // WARP}"


def where(op, name, index, dims, inputs, tile):  # -> the chunk / block / tile of ``index``, in words
    at = dict(zip(axes(op, name), index))
    if op == "ssd_scan_chunked" and name == "y":
        q = min(dims["chunk"], dims["t"])
        u, nc = at["t"] // q, -(-dims["t"] // q)
        ragged = ", the ragged last chunk" if u == nc - 1 and dims["t"] % q else ""
        return (f"chunk {u} of {nc} (steps {u * q}..{min((u + 1) * q, dims['t']) - 1} at chunk={dims['chunk']}"
                f"{ragged}), step {at['t'] % q} inside it; head {at['h']} reads B/C group "
                f"{at['h'] // (dims['h'] // dims['g'])}")
    if op in ("ssd_scan_chunked", "ssd_step"):
        last = "the state after the last chunk" if op == "ssd_scan_chunked" else "the new state"
        what = f"{last}, state channel n={at['n']} ({_lane(at['n'])}); " if "n" in at else ""
        return f"{what}head {at['h']} reads B/C group {at['h'] // (dims['h'] // dims['g'])}"
    if op == "gqa_attention":
        i, s, t = at["t"], dims["s"], dims["t"]
        return (f"query {i} sits at key position {s - t + i} and sees keys 0..{s - t + i}; query tile "
                f"{i // tile} of {tile} queries; query head {at['q']} reads kv head "
                f"{at['q'] // (dims['q'] // dims['kv'])}")
    if op == "nvfp4_dequantize":
        r, c = at["out"], at["in"]
        j = c // NVFP4_BLOCK
        code = int(quant.unpack_nibbles(inputs["packed"])[r, c])
        scale = int(inputs["block_scale"][r, j])
        return (f"16-element block {j} of row {r} (columns {j * NVFP4_BLOCK}..{j * NVFP4_BLOCK + 15}, block_scale"
                f"[{r}, {j}] = 0x{scale:02X} = {float(E4M3_VALUES[scale]):g}), element {c % NVFP4_BLOCK} of it: E2M1 "
                f"code {code} = {float(E2M1_VALUES[code]):g}; global_scale {float(inputs['global_scale']):.9g}")
    if op == "nvfp4_matmul":
        o = at["out"]
        scales = " ".join(f"0x{int(s):02X}" for s in inputs["block_scale"][o])
        return (f"weight row {o} in row tile {o // tile} of {tile} rows; its {dims['in'] // NVFP4_BLOCK} "
                f"16-element blocks have the scales {scales}")
    if op == "route":
        return f"token {at['t']}, slot {at['k']} (slots run by descending biased score)"
    if op == "moe_experts":
        t = at["t"]
        return (f"token {t}, routed to experts {inputs['idx'][t].tolist()} with weights "
                f"{np.round(inputs['weights'][t], 4).tolist()}; channel {at['l']} ({_lane(at['l'])})")
    if op == "gated_rms_norm":
        width = dims["i"] // dims["g"]
        return f"group {at['i'] // width} of g={dims['g']} (channels of {width}), channel {at['i']} " \
               f"({_lane(at['i'] % width)} of the group)"
    if op == "rms_norm":
        return f"row (b={at['b']}, t={at['t']}), channel d={at['d']} ({_lane(at['d'])} of a width-{dims['d']} row)"
    channel = f"channel c={at['c']} ({_lane(at['c'])})"
    return f"time step t={at['t']}, {channel}" if "t" in at else \
        (f"state slot {at['w']} (the last w raw inputs, oldest first), {channel}" if name == "state" else channel)


# ------------------------------------------------------------------------------------------------ causes

def permutation(got, ref):
    """The axis order ``perm`` with got == ref.transpose(perm) (not the identity), or None."""
    if got.ndim != ref.ndim or got.ndim < 2 or got.size != ref.size or got.size < 2:
        return None
    scale = float(np.nanmax(np.abs(ref), initial=0.0)) if ref.dtype.kind == "f" else 0.0

    def close(a, b):
        return np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-3, atol=1e-3 * scale + 1e-12,
                           equal_nan=True)

    if close(got, ref.reshape(got.shape)):        # a reshape, or values that no axis order tells apart
        return None
    for perm in itertools.permutations(range(ref.ndim)):
        cand = ref.transpose(perm)
        if perm != tuple(range(ref.ndim)) and cand.shape == got.shape and close(got, cand):
            return perm
    return None


def _matches(got, alt, key, dtype, atol_scale):
    return compare(got, np.asarray(alt), key, dtype, atol_scale)["used"] <= 1


def causes(op, name, got, ref, index, dims, inputs, static, key, dtype, atol_scale):
    """Sentences naming the mistakes ``got`` matches (empty when none of the known ones)."""
    found = []
    perm = permutation(got, ref)
    if perm is not None:
        found.append(f"its values are the reference's with the axes in the order "
                     f"[{', '.join(axes(op, name)[i] for i in perm)}]: a transposed result")
    if got.shape != ref.shape or index is None:
        return found
    try:
        for alt, text in _alternatives(op, name, dims, inputs, static):
            if _matches(got, alt(), key, dtype, atol_scale):
                found.append(text)
    except Exception:  # noqa: BLE001  a mistake the inputs cannot express (e.g. a block shift of one block)
        pass
    if op == "route" and name == "idx":
        found += _route_cause(got, ref, index, inputs, static)
    if op == "ssd_scan_chunked" and name == "y":
        q = min(dims["chunk"], dims["t"])
        if index[1] >= q and compare(got[:, :q], ref[:, :q], key, dtype, atol_scale)["used"] <= 1:
            found.append(f"chunk 0 is right and the error starts in chunk {index[1] // q}: the state carried "
                         "from chunk to chunk (step 6 of nemo_scratch/ops/ssd.py::ssd_scan_chunked) is the suspect")
    if op == "nvfp4_dequantize":
        found += _block_cause(got, index, inputs)
    return found


def _alternatives(op, name, dims, inputs, static):
    """(a reference run with one known mistake, the sentence that names it) for ``op``'s output ``name``."""
    out = list(_OUTPUTS[op]).index(name)
    run = lambda fn, **change: lambda: _as_tuple(fn(**{**inputs, **static, **change}))[out]  # noqa: E731
    if op == "gqa_attention":
        t, r = dims["t"], dims["q"] // dims["kv"]
        yield run(attention.gqa_attention, causal=False), "it matches attention WITHOUT the causal mask"
        if t < dims["s"]:
            yield run(attention.gqa_attention, k=inputs["k"][:, :t], v=inputs["v"][:, :t]), \
                "it matches a causal mask aligned to the FIRST t keys: the t queries are the LAST t positions"
        if r > 1 and dims["kv"] > 1:
            yield run(attention.gqa_attention, k=np.tile(inputs["k"], (1, 1, r, 1)),
                      v=np.tile(inputs["v"], (1, 1, r, 1))), \
                "query head j reads kv head j % kv: it must read kv head j // (q/kv) (repeat, not tile)"
    elif op == "ssd_scan_chunked":
        yield run(ssd.ssd_scan_chunked, initial_state=None), "it matches the scan with initial_state ignored"
        yield run(ssd.ssd_scan_chunked, D=None), "it matches the scan without the skip term D * x"
    elif op == "ssd_step":
        yield run(ssd.ssd_step, D=None), "it matches the step without the skip term D * x"
    elif op == "rms_norm":
        x, w, eps = inputs["x"], inputs["weight"], static["eps"]
        yield lambda: w * x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps), \
            "it matches x / (sqrt(mean(x^2)) + eps): eps goes INSIDE the square root"
    elif op == "moe_experts":
        yield run(moe_experts, weights=np.ones_like(inputs["weights"])), \
            "it matches the experts summed without the routing weights"
    elif op in ("nvfp4_dequantize", "nvfp4_matmul"):
        fn = quant.nvfp4_dequantize if op == "nvfp4_dequantize" else quant.nvfp4_matmul
        swapped = (inputs["packed"] >> np.uint8(4)) | (inputs["packed"] << np.uint8(4))
        yield run(fn, packed=swapped), "the nibbles are swapped: the LOW nibble holds the even element"
        for shift in (1, -1):
            yield run(fn, block_scale=np.roll(inputs["block_scale"], -shift, axis=-1)), \
                f"it matches a decode that reads block j{shift:+d}'s scale: an off-by-one block index"


_OUTPUTS = {op: tuple(named) for op, named in AXES.items()}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _route_cause(got, ref, index, inputs, static):
    """Compare the biased scores of the expected and the chosen expert at the first bad slot."""
    t, slot = index
    x, gate, bias = inputs["x"], inputs["gate_weight"], inputs["correction_bias"]
    scores = (norm.sigmoid(x @ gate.T) + (0 if bias is None else bias)).astype(np.float64)        # [t, e]
    want, chose = int(ref[t, slot]), int(got[t, slot])
    if set(got[t].tolist()) == set(ref[t].tolist()):
        return [f"token {t} has the right experts in another order: idx runs by descending biased score, "
                "ties to the lower index"]
    if not 0 <= chose < scores.shape[1]:
        return [f"expert {chose} does not exist (e={scores.shape[1]})"]
    if scores[t, chose] == scores[t, want]:
        side = "HIGHER" if chose > want else "lower"
        return [f"experts {want} and {chose} have the same biased score {scores[t, want]:.9g} (an exact tie) and "
                f"the tie went to the {side} index {chose}: ties go to the LOWER expert index"]
    groups = static["n_group"]
    if groups > 1:
        width = scores.shape[1] // groups
        top2 = np.sort(scores[t].reshape(groups, width), axis=-1)[:, -2:].sum(-1)
        gw, gc = want // width, chose // width
        if gw != gc and top2[gw] == top2[gc]:
            return [f"groups {gw} and {gc} have the same group score {top2[gw]:.9g} (a tie): group ties go to the "
                    "LOWER group index"]
    return [f"expected expert {want} (biased score {scores[t, want]:.9g}), got expert {chose} (biased score "
            f"{scores[t, chose]:.9g})"]


def _block_cause(got, index, inputs):
    """Which block's scale the first bad element of a decode was scaled with."""
    r, c = index
    code = int(quant.unpack_nibbles(inputs["packed"])[r, c])
    g = np.float32(inputs["global_scale"])
    value = E2M1_VALUES[code]
    if value == 0 or g == 0 or not np.isfinite(got[r, c]):
        return []
    scales = E4M3_VALUES[inputs["block_scale"][r]]
    own = c // NVFP4_BLOCK
    hits = sorted((j for j, s in enumerate(scales) if np.isfinite(s) and np.float32(value * s) * g == got[r, c]),
                  key=lambda j: abs(j - own))
    if hits and own not in hits:
        return [f"{float(got[r, c]):.9g} at column {c} is code {code} scaled by the scale of block {hits[0]}, not "
                f"of its own block {own} = column // 16: an off-by-one block index"]
    return []
