"""Tensor names: NVIDIA's checkpoint names (the canonical ones, spec section 7) and transformers' names.

Three spellings of one model are met in the wild:

- NVIDIA's checkpoints, and what transformers 5.x ``save_pretrained`` writes (it reverses its own load-time
  conversion when saving; checked by saving a tiny NemotronHForCausalLM with transformers 5.23):
      backbone.embeddings.weight, backbone.layers.{i}.mixer.experts.{x}.up_proj.weight [f, l], mtp.layers.*
- transformers' in-memory names (``model.state_dict()``, and so any file written straight from it):
      model.embeddings.weight, model.layers.{i}.mixer.experts.up_proj [e, f, l] / down_proj [e, l, f]
  i.e. ``backbone.`` -> ``model.`` and the routed experts of a layer stacked on a leading [e] axis.
- NVIDIA's older remote code, which spelled the table ``backbone.embedding.weight``.

Everything inside nemo_scratch uses NVIDIA's names; this module maps the others to them and back, and checks
a set of names and logical shapes against the config (``check_tensor_set``: the reader and the writer share it).
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import CheckpointError
from .schema import expected_tensors

NVIDIA_PREFIX, TRANSFORMERS_PREFIX = "backbone.", "model."
LEGACY_EMBEDDING, EMBEDDING = "backbone.embedding.weight", "backbone.embeddings.weight"

# transformers' stacked experts: "<layer>.mixer.experts.up_proj" [e, f, l] / ".down_proj" [e, l, f]
_STACKED = re.compile(r"^(?P<mixer>.+\.mixer)\.experts\.(?P<proj>up_proj|down_proj)$")
# NVIDIA's per-expert weights: "<layer>.mixer.experts.<x>.up_proj.weight"
_PER_EXPERT = re.compile(r"^(?P<mixer>.+\.mixer)\.experts\.(?P<x>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")


def nvidia_name(name: str) -> str:
    """The NVIDIA name of a stored (non-stacked) tensor name; names already NVIDIA's, or unknown, pass through."""
    if name.startswith(TRANSFORMERS_PREFIX):
        name = NVIDIA_PREFIX + name[len(TRANSFORMERS_PREFIX):]
    if name == LEGACY_EMBEDDING:
        name = EMBEDDING
    return name


def transformers_name(name: str) -> str:
    """The transformers in-memory name of an NVIDIA (non-expert) tensor name: ``backbone.`` -> ``model.``."""
    if name.startswith(NVIDIA_PREFIX):
        return TRANSFORMERS_PREFIX + name[len(NVIDIA_PREFIX):]
    return name


def is_stacked(name: str) -> bool:
    """True for transformers' stacked routed-expert tensors (``...mixer.experts.up_proj``, no ``.weight``)."""
    return _STACKED.match(name) is not None


def expert_names(stacked: str, num_experts: int) -> list:
    """The NVIDIA per-expert names a stacked tensor splits into, in expert order."""
    m = _STACKED.match(stacked)
    if m is None:
        raise CheckpointError(f"tensor {stacked!r} is not a stacked expert tensor name "
                              "(expected '<layer>.mixer.experts.up_proj' or '.down_proj')")
    mixer = nvidia_name(m["mixer"])
    return [f"{mixer}.experts.{x}.{m['proj']}.weight" for x in range(num_experts)]


def from_transformers(tensors: dict) -> dict:
    """transformers' names (stacked experts) -> NVIDIA's names (one entry per expert: ``stacked[x]``)."""
    out = {}
    for name, value in tensors.items():
        if is_stacked(name):
            for x, expert in enumerate(expert_names(name, len(value))):
                out[expert] = value[x]
        else:
            out[nvidia_name(name)] = value
    return out


def to_transformers(tensors: dict) -> dict:
    """NVIDIA's names -> transformers' in-memory names, stacking each layer's routed experts on a leading [e]
    axis (in expert order; the experts of a layer must be numbered 0..e-1). Plain arrays only."""
    out, experts = {}, {}
    for name, value in tensors.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[transformers_name(name)] = value
        else:
            stacked = transformers_name(f"{m['mixer']}.experts.{m['proj']}")
            experts.setdefault(stacked, {})[int(m["x"])] = value
            out.setdefault(stacked, None)   # keep the first expert's position in the order
    for stacked, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointError(f"to_transformers: tensor {stacked!r} would stack experts {sorted(by_index)}; "
                                  f"expected them numbered 0..{len(by_index) - 1}")
        out[stacked] = np.stack([np.asarray(by_index[x]) for x in range(len(by_index))])
    return out


# ---------------------------------------------------------------------------------------------- validation

def check_tensor_set(cfg, shapes, where, source, config_name="config.json"):
    """Check {NVIDIA name: logical shape} against expected_tensors(cfg): the config must match the weights,
    nothing may be missing or unexpected, every shape must be right. ``where(name)`` names a present tensor
    and its file in messages; ``source`` names the files as a whole. Returns whether the MTP head is present:
    a config declaring MTP layers may come with no mtp.* tensor at all (transformers drops them), not some."""
    present_mtp = [n for n in shapes if n.startswith("mtp.")]
    include_mtp = cfg.num_nextn_predict_layers > 0 and bool(present_mtp)
    expected = {s.name: s for s in expected_tensors(cfg, include_mtp=include_mtp)}
    embedding = shapes.get(EMBEDDING)
    if embedding is not None and tuple(embedding) != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"{where(EMBEDDING)} has shape {list(embedding)} = [vocab, hidden], but {config_name} "
                              f"says vocab_size = {cfg.vocab_size}, hidden_size = {cfg.hidden_size}: the config "
                              "does not match the weights")
    missing = [s for n, s in expected.items() if n not in shapes]
    if missing and include_mtp and all(s.mtp for s in missing):
        raise CheckpointError(f"{source}: partial MTP head: {len(present_mtp)} mtp.* tensors present but "
                              f"{len(missing)} missing, e.g. {missing[0].name!r} (shape {list(missing[0].shape)}); "
                              f"{config_name} declares {cfg.num_nextn_predict_layers} MTP layer(s) "
                              f"{cfg.mtp_hybrid_override_pattern!r}: expected all of their tensors, or none")
    if missing:
        s = missing[0]
        raise CheckpointError(f"{source}: missing tensor {s.name!r} (shape {list(s.shape)}, {_part(s)} per "
                              f"{config_name}){_more([m.name for m in missing], 'missing')}")
    unexpected = [n for n in shapes if n not in expected]
    if unexpected:
        hint = " (it declares no MTP layers: num_nextn_predict_layers = 0)" if unexpected[0].startswith("mtp.") else ""
        raise CheckpointError(f"{where(unexpected[0])} is unexpected: not a tensor of the model {config_name} "
                              f"describes{hint}{_more(unexpected, 'unexpected')}")
    for name, s in expected.items():
        if tuple(shapes[name]) != s.shape:
            raise CheckpointError(f"{where(name)} has shape {list(shapes[name])}, expected {list(s.shape)} for "
                                  f"{_part(s)} from {config_name} (fields {_SHAPE_FIELDS.get(s.role, 'hidden_size')})")
    return include_mtp


# Which config.json fields make each tensor's shape (named in shape errors); hidden_size shapes nearly all.
_MAMBA = "hidden_size, mamba_num_heads, mamba_head_dim, n_groups, ssm_state_size"
_SHAPE_FIELDS = {
    "embedding": "vocab_size, hidden_size", "lm_head": "vocab_size, hidden_size",
    "in_proj": _MAMBA, "conv": _MAMBA + ", conv_kernel", "conv_bias": _MAMBA, "A_log": "mamba_num_heads",
    "D": "mamba_num_heads", "dt_bias": "mamba_num_heads", "gated_norm": "mamba_num_heads, mamba_head_dim",
    "out_proj": "hidden_size, mamba_num_heads, mamba_head_dim",
    "q_proj": "hidden_size, num_attention_heads, head_dim", "o_proj": "hidden_size, num_attention_heads, head_dim",
    "k_proj": "hidden_size, num_key_value_heads, head_dim", "v_proj": "hidden_size, num_key_value_heads, head_dim",
    "mlp_up": "hidden_size, intermediate_size", "mlp_down": "hidden_size, intermediate_size",
    "gate": "hidden_size, n_routed_experts", "gate_bias": "n_routed_experts",
    "expert_up": "moe_intermediate_size, moe_latent_size or hidden_size",
    "expert_down": "moe_intermediate_size, moe_latent_size or hidden_size",
    "shared_up": "hidden_size, moe_shared_expert_intermediate_size",
    "shared_down": "hidden_size, moe_shared_expert_intermediate_size",
    "fc1_latent": "hidden_size, moe_latent_size", "fc2_latent": "hidden_size, moe_latent_size",
    "eh_proj": "hidden_size",
}


def _part(spec) -> str:
    if spec.layer is None:
        return {"embedding": "the embedding table", "head": "the LM head"}.get(spec.block, "the final norm")
    return f"{'MTP layer' if spec.mtp else 'layer'} {spec.layer} ({spec.block})"


def _more(names, what, shown=3) -> str:
    """'; 5 missing in all: a, b, c, ...' when there is more than one."""
    if len(names) < 2:
        return ""
    return f"; {len(names)} {what} in all: {', '.join(names[:shown])}{', ...' if len(names) > shown else ''}"
