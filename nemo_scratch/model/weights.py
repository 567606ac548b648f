"""From a flat dict of checkpoint tensors (NVIDIA names) to the parameter tree the blocks read.

The tree is plain dicts of arrays (picoGPT style): the parameter tree *is* the call graph.

    {"embeddings": [v,d], "norm_f": [d], "lm_head": [v,d] (the embedding table if tied),
     "layers": [{"type": "mamba", "norm": [d], "in_proj", "conv_weight" [c,w], "conv_bias" [c], "A" [h],
                 "D" [h], "dt_bias" [h], "gated_norm" [i], "out_proj"}, ...],
     "mtp": {"enorm", "hnorm", "eh_proj", "layers": [...], "final_layernorm"} or None}

Routed experts stay where the checkpoint has them: an ExpertBank (ops/formats.py) of the per-expert weights,
``bank[x]`` expert x's [out, in] weight; nothing is stacked on the host (a GPU backend stacks on its device).
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError
from ..ops.formats import BF16Weight, ExpertBank
from ..ops.quant import bf16_decode

_MIXER_KEYS = {
    "mamba": {"in_proj.weight": "in_proj", "conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias",
              "D": "D", "dt_bias": "dt_bias", "norm.weight": "gated_norm", "out_proj.weight": "out_proj"},
    "attention": {"q_proj.weight": "q_proj", "k_proj.weight": "k_proj", "v_proj.weight": "v_proj",
                  "o_proj.weight": "o_proj"},
    "moe": {"gate.weight": "gate", "gate.e_score_correction_bias": "gate_bias",
            "shared_experts.up_proj.weight": "shared_up", "shared_experts.down_proj.weight": "shared_down",
            "fc1_latent_proj.weight": "fc1", "fc2_latent_proj.weight": "fc2"},
    "mlp": {"up_proj.weight": "up", "down_proj.weight": "down"},
}


def as_dense(w, dtype):  # [...] -> [...] float array
    """The float array of a small weight (a norm, a bias, a conv filter): a stored BF16Weight is decoded
    (exactly) where it is used, a float array is returned as it is."""
    if isinstance(w, BF16Weight):
        return bf16_decode(w.bits).astype(dtype, copy=False)
    return w


def expert_bank(weights, name):
    """The routed experts of one layer as an ExpertBank (no copy); one storage format for all of them."""
    first = weights[0]
    if any(type(w) is not type(first) for w in weights):
        raise CheckpointError(f"{name}: routed experts mix storage formats "
                              f"({sorted({type(w).__name__ for w in weights})}); expected one format")
    return ExpertBank(weights)


def _reshape(w, shape):
    """A view of w in ``shape`` (a stored BF16Weight keeps its bits)."""
    return BF16Weight(w.bits.reshape(shape)) if isinstance(w, BF16Weight) else w.reshape(shape)


def layer_params(cfg, tensors, prefix, block_type, dtype=np.float32):
    """The parameter dict of one block (backbone or MTP) from ``{prefix}.norm.weight`` and ``{prefix}.mixer.*``."""
    p = {"type": block_type, "norm": tensors[f"{prefix}.norm.weight"]}
    mixer = f"{prefix}.mixer."
    for key, field in _MIXER_KEYS[block_type].items():
        p[field] = tensors.get(mixer + key)
    if block_type == "mamba":
        # A = -exp(A_log)  (spec 3.1)
        a_log = as_dense(tensors[mixer + "A_log"], dtype)
        p["A"] = -np.exp(a_log)
        p["conv_weight"] = _reshape(p["conv_weight"], (cfg.conv_dim, cfg.conv_kernel))   # [c,1,w] -> [c,w]
    if block_type == "moe":
        e = cfg.n_routed_experts
        p["experts_up"] = expert_bank([tensors[f"{mixer}experts.{x}.up_proj.weight"] for x in range(e)],
                                        mixer + "experts.*.up_proj.weight")
        p["experts_down"] = expert_bank([tensors[f"{mixer}experts.{x}.down_proj.weight"] for x in range(e)],
                                          mixer + "experts.*.down_proj.weight")
        if p["gate_bias"] is None:
            p["gate_bias"] = np.zeros(e, dtype=dtype)
    return p


def build_params(cfg, tensors, with_mtp=True, dtype=np.float32):
    """The parameter tree for ``cfg`` from validated checkpoint tensors (checkpoint.load_tensors), whose compute
    dtype is ``dtype`` (what the few derived arrays, A = -exp(A_log) and a missing router bias, are made in)."""
    params = {
        "embeddings": tensors["backbone.embeddings.weight"],
        "norm_f": tensors["backbone.norm_f.weight"],
        "layers": [layer_params(cfg, tensors, f"backbone.layers.{i}", bt, dtype)
                   for i, bt in enumerate(cfg.layers_block_type)],
    }
    params["lm_head"] = tensors.get("lm_head.weight", params["embeddings"])
    params["mtp"] = None
    if with_mtp and cfg.num_nextn_predict_layers and "mtp.layers.0.eh_proj.weight" in tensors:
        blocks = cfg.mtp_layers_block_type
        last = f"mtp.layers.{len(blocks) - 1}"
        params["mtp"] = {
            "enorm": tensors["mtp.layers.0.enorm.weight"],
            "hnorm": tensors["mtp.layers.0.hnorm.weight"],
            "eh_proj": tensors["mtp.layers.0.eh_proj.weight"],
            "layers": [layer_params(cfg, tensors, f"mtp.layers.{j}", bt, dtype) for j, bt in enumerate(blocks)],
            "final_layernorm": tensors[f"{last}.final_layernorm.weight"],
        }
    return params


def map_tree(tree, fn):
    """Apply ``fn`` to every array (and packed weight) of a parameter tree; strings and None pass through."""
    if isinstance(tree, dict):
        return {k: map_tree(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tree(v, fn) for v in tree]
    if tree is None or isinstance(tree, str):
        return tree
    return fn(tree)
