"""No silent garbage: non-finite weights and scales refused at load, non-finite activations named in a forward.

Load (``check_loaded``, called by checkpoint.load_tensors): every small dense tensor (1-D ones: norms,
biases, A_log, D, dt_bias, the router bias; and anything up to SMALL elements, e.g. conv1d) must be finite,
and every quantization scale must be finite and >= 0; a weight scale of 0 is accepted only for a weight
whose codes are all zero (what nvfp4_quantize / fp8_quantize write for an all-zero tensor). Large matrices
are not read at load (that would read the whole checkpoint).

Forward (``FiniteTrail`` and ``check_logits``, a few lines in Model.hidden / Model.logits): after the
embedding lookup and after every block a device-side "all finite" flag is kept; the output is checked once,
and only when it holds NaN or inf are the flags read to find the first stage that went non-finite and that
stage's weights scanned for the first non-finite tensor, which the NonFiniteError names (layer, NVIDIA
tensor name, index). Non-finite logits from a finite hidden state name lm_head (or the MTP head's weights).
Set ``model.check_finite = False`` to skip the flags (benchmarks).
"""

from __future__ import annotations

import numpy as np

from .errors import CheckpointError, InputError, NonFiniteError
from .ops.formats import BF16Weight, ExpertBank, FP8Weight, NVFP4Weight
from .ops.quant import bf16_decode

SMALL = 2**20                      # dense tensors up to this many elements are checked at load
E4M3_NAN = (0x7F, 0xFF)            # the two NaN codes of E4M3FN (block scales, FP8 weights)
MAX_SEED = 2**64 - 1


def check_seed(seed, name="seed"):
    """A seed is None or an integer in [0, 2**64 - 1] (numpy's SeedSequence takes any size; we bound it)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        shown = f"{name} {seed}" if name.startswith("--") else f"{name}={seed!r}"
        raise InputError(f"{shown}: expected an integer in [0, 2**64 - 1] (or none)")
    return int(seed)


def first_bad(array):
    """(index tuple, value) of the first NaN/inf of a float array, or None when all are finite."""
    a = np.asarray(array)
    if a.dtype.kind != "f":
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return index, a[index]


def _where(index) -> str:
    return f" at [{', '.join(map(str, index))}]" if index else ""


# ---------------------------------------------------------------------------------------------- at load

def check_loaded(tensors, where) -> None:
    """CheckpointError naming the tensor when a small tensor or a scale is non-finite (see module docstring).
    ``where(name)`` -> "file: tensor 'name'" for the message."""
    for name, value in tensors.items():
        if isinstance(value, NVFP4Weight):
            _check_scale(where(name), "weight_scale_2", value.global_scale, value.packed, 0x77)
            _check_scale(where(name), "input_scale", value.input_scale)
        elif isinstance(value, FP8Weight):
            _check_scale(where(name), "weight_scale", value.scale, value.data, 0x7F)
            _check_scale(where(name), "input_scale", value.input_scale)
        elif np.ndim(value) <= 1 or np.size(value) <= SMALL:
            found = first_bad(value)
            if found is not None:
                raise CheckpointError(f"{where(name)} holds {found[1]}{_where(found[0])}: a non-finite weight "
                                      "would make every logit NaN")


def _check_scale(where, suffix, scale, codes=None, magnitude=0x7F):
    """Finite and >= 0; zero only over all-zero codes (``magnitude`` masks off the sign bits: 0x77 for two
    packed E2M1 codes a byte, 0x7F for E4M3)."""
    if scale is None:
        return
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(s) | (s < 0)
    if bad.any():
        raise CheckpointError(f"{where}: its {suffix} is {s[bad][0]}: a quantization scale must be finite and "
                              ">= 0")
    if codes is not None and (s == 0).any():
        zero = np.asarray(codes).reshape(s.size, -1)[s == 0] & magnitude
        if zero.any():
            raise CheckpointError(f"{where}: its {suffix} is 0 but its codes are not all zero: every weight "
                                  "would decode to 0 (a zero scale is only written for an all-zero tensor)")


# ---------------------------------------------------------------------------------------------- in a forward

PARAM_NAMES = {   # parameter-tree key of a block -> NVIDIA tensor name after "<prefix>."
    "norm": "norm.weight", "in_proj": "mixer.in_proj.weight", "conv_weight": "mixer.conv1d.weight",
    "conv_bias": "mixer.conv1d.bias", "A": "mixer.A_log", "D": "mixer.D", "dt_bias": "mixer.dt_bias",
    "gated_norm": "mixer.norm.weight", "out_proj": "mixer.out_proj.weight", "q_proj": "mixer.q_proj.weight",
    "k_proj": "mixer.k_proj.weight", "v_proj": "mixer.v_proj.weight", "o_proj": "mixer.o_proj.weight",
    "gate": "mixer.gate.weight", "gate_bias": "mixer.gate.e_score_correction_bias",
    "shared_up": "mixer.shared_experts.up_proj.weight", "shared_down": "mixer.shared_experts.down_proj.weight",
    "fc1": "mixer.fc1_latent_proj.weight", "fc2": "mixer.fc2_latent_proj.weight", "up": "mixer.up_proj.weight",
    "down": "mixer.down_proj.weight", "experts_up": "mixer.experts.{x}.up_proj.weight",
    "experts_down": "mixer.experts.{x}.down_proj.weight",
}


def _bad_weight(value, host):
    """(index, part, description) of the first non-finite part of a weight, or None; the index of an expert
    bank's weight starts with the expert."""
    if isinstance(value, ExpertBank):
        for x, w in enumerate(value.experts):
            found = _bad_weight(w, host)
            if found:
                return (x, *found[0]), found[1], found[2]
        return None
    if isinstance(value, BF16Weight):
        value = bf16_decode(np.asarray(host(value.bits)))
    if isinstance(value, NVFP4Weight):
        parts = (("weight_scale_2", value.global_scale, "f"), ("weight_scale", value.block_scale, "e4m3"))
    elif isinstance(value, FP8Weight):
        parts = (("weight_scale", value.scale, "f"), ("weight", value.data, "e4m3"))
    else:
        parts = (("weight", value, "f"),)
    for label, array, kind in parts:
        a = host(array)
        bad = np.isin(a, E4M3_NAN) if kind == "e4m3" else ~np.isfinite(a) if a.dtype.kind == "f" else None
        if bad is not None and bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0]) if a.ndim else ()
            what = "a NaN E4M3 code" if kind == "e4m3" else str(a[index])
            return index, label, what
    return None


def diagnose(model, stage, ids=None) -> str:
    """Why ``stage`` ("embeddings", a layer index, "norm_f" or "lm_head") went non-finite: one sentence."""
    host = model.backend.to_numpy
    if stage == "embeddings":
        table = model.params["embeddings"]
        rows = host(bf16_decode(table.bits[np.asarray(ids)]) if isinstance(table, BF16Weight)
                    else table[np.asarray(ids)])
        found = first_bad(rows)
        token = int(np.asarray(ids)[found[0][:-1]]) if found else None
        return (f"the embedding row of token id {token} (tensor 'backbone.embeddings.weight') holds {found[1]}"
                if found else "the embedding lookup")
    if stage in ("norm_f", "lm_head"):
        name = "backbone.norm_f.weight" if stage == "norm_f" else "lm_head.weight"
        key = "norm_f" if stage == "norm_f" else "lm_head"
        found = _bad_weight(model.params[key], host)
        if found:
            return f"tensor {name!r} holds {found[2]}{_where(found[0])}"
        return f"{'the final norm' if stage == 'norm_f' else 'lm_head'} (its weights are finite: an overflow)"
    p, prefix = model.params["layers"][stage], f"backbone.layers.{stage}"
    for key, value in p.items():
        if key == "type" or value is None or isinstance(value, str):
            continue
        found = _bad_weight(value, host)
        if found is None:
            continue
        index, label, what = found
        name = PARAM_NAMES.get(key, key)
        stacked = "{x}" in name
        name = name.format(x=index[0] if stacked and index else "*")
        if label != "weight":
            name = name.removesuffix("weight") + label
        shown = index[1:] if stacked else index
        note = " (as A = -exp(A_log))" if key == "A" else ""
        return f"layer {stage} ({p['type']}): tensor '{prefix}.{name}' holds {what}{_where(shown)}{note}"
    return (f"layer {stage} ({p['type']}): its weights are finite, so its activations overflowed "
            f"{np.dtype(model.dtype).name} (try dtype float64)")


class FiniteTrail:
    """The finiteness flags of one forward (see the module docstring)."""

    def __init__(self, model, ids=None):
        self.model, self.ids, self.flags = model, ids, []
        self.enabled = getattr(model, "check_finite", True)
        self.xp = model.backend.xp

    def record(self, stage, h):
        if self.enabled:
            self.flags.append((stage, self.xp.isfinite(h).all()))
        return h

    def check(self, out, last="norm_f"):
        """Return ``out``; NonFiniteError naming the first non-finite stage when ``out`` holds NaN/inf."""
        if not self.enabled or bool(self.xp.isfinite(out).all()):
            return out
        stage = next((s for s, ok in self.flags if not bool(ok)), last)
        raise NonFiniteError(f"forward: the output holds NaN/inf; first non-finite: "
                             f"{diagnose(self.model, stage, self.ids)}")


def check_logits(model, logits, h=None):
    """Model.logits: non-finite logits from a finite hidden state ``h`` are lm_head's doing; from a
    non-finite one (the backbone's hidden is checked already, so the MTP head's), that head's."""
    trail = FiniteTrail(model)
    if not trail.enabled or bool(trail.xp.isfinite(logits).all()):
        return logits
    if h is not None and not bool(trail.xp.isfinite(h).all()):
        raise NonFiniteError(f"MTP head: its hidden state holds NaN/inf; first non-finite: {diagnose_mtp(model)}")
    return trail.check(logits, last="lm_head")


def diagnose_mtp(model) -> str:
    """The first non-finite tensor of the MTP head (mtp.layers.*), or that its activations overflowed."""
    mtp, host = model.params.get("mtp") or {}, model.backend.to_numpy
    for key in ("enorm", "hnorm", "eh_proj", "final_layernorm"):
        found = mtp.get(key) is not None and _bad_weight(mtp[key], host)
        if found:
            return f"tensor 'mtp.layers.*.{key}.weight' holds {found[2]}{_where(found[0])}"
    for j, p in enumerate(mtp.get("layers", [])):
        for key, value in p.items():
            found = key != "type" and value is not None and not isinstance(value, str) and _bad_weight(value, host)
            if found:
                name = PARAM_NAMES.get(key, key).format(x=found[0][0] if found[0] else "*")
                return f"layer {j} ({p['type']}): tensor 'mtp.layers.{j}.{name}' holds {found[2]}"
    return f"its weights are finite, so its activations overflowed {np.dtype(model.dtype).name}"


# ---------------------------------------------------------------------------------------------- generate

MAX_DRAFT_DEPTH = 64


def check_generate(model, prompt_shape, max_new_tokens, seed=None, mtp=False, draft_depth=1,
                   prefill_chunk=None) -> None:
    """The arguments of generate() that its own checks leave open: the seed range, the draft depth bound,
    and the memory the prefill and the grown caches need (memory.py), all before the prefill."""
    from .memory import check_generate_memory

    check_seed(seed)
    if mtp and isinstance(draft_depth, (int, np.integer)) and draft_depth > MAX_DRAFT_DEPTH:
        raise InputError(f"draft_depth={draft_depth}: expected at most {MAX_DRAFT_DEPTH} draft tokens per round")
    check_generate_memory(model, prompt_shape[0], prompt_shape[1], int(max_new_tokens), mtp,
                          int(draft_depth) if mtp else 1, prefill_chunk)
