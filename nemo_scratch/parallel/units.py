"""The units a pipeline placement moves as a whole, and the bytes of their weights.

A unit is the embedding table, one backbone layer, the final norm with the LM head ("head"), or the whole MTP
head ("mtp"); in execution order they are ``embedding, layer 0 .. layer n-1, head, mtp``. Their weight bytes
come from one of two sources, in one of two weight modes:

- a config (a preset or a config.json) and a quantization recipe: every tensor of
  checkpoint/schema.expected_tensors in its checkpoint/modelopt.recipe_format, counted with params.tensor_bytes,
  so that in "stored" mode the units add up to params.count_bytes exactly;
- a checkpoint directory: every stored tensor, ModelOpt scale companions included, sized from the safetensors
  headers alone (dtype and shape; no tensor data is read). The FP8 KV-cache scales (``k_scale``/``v_scale``)
  are left out: the loader skips them (checkpoint/reader.py IGNORED), so they never reach a device.

Weight modes: "stored" keeps every tensor as stored (BF16 2 B, F32 4 B, NVFP4/FP8 packed with their scales);
"float32" upcasts BF16/F16 (and F64) tensors to 4 B, what load() does today, and keeps packed weights packed.
A tied embedding table (tie_word_embeddings) is counted again in the head unit, whose device needs its own
copy to multiply by; the units then add up to count_bytes plus the table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..checkpoint.modelopt import recipe_formats
from ..checkpoint.names import nvidia_name
from ..checkpoint.reader import IGNORED, open_checkpoint
from ..checkpoint.safetensors_io import STORAGE
from ..errors import CheckpointError
from ..params import tensor_bytes

WEIGHT_MODES = ("stored", "float32")
EMBEDDING, HEAD, MTP = "embedding", "head", "mtp"
UPCAST_DTYPES = ("BF16", "F16", "F64")   # read into float32 by the loader in "float32" mode
STORED_UPCAST_DTYPES = ("F16", "F64")    # read into float32 in "stored" mode too (the ops take float32/64 only)
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Unit:
    """One placed unit: its weights and what it reserves on its device (memory.py)."""

    name: str                  # "embedding", "layer 7", "head", "mtp"
    kind: str                  # "embedding" | "mamba" | "attention" | "moe" | "mlp" | "head" | "mtp"
    weight_bytes: int
    tensors: tuple = ()        # stored tensor names (checkpoint) or schema names (config), in listing order
    kv_bytes: int = 0
    state_bytes: int = 0       # conv + SSM states (+ the speculative record history)
    activation_bytes: int = 0  # prefill peak while this unit runs (not summed over a device: a max)

    @property
    def resident_bytes(self) -> int:
        """What stays allocated for the whole run: weights, KV cache, states."""
        return self.weight_bytes + self.kv_bytes + self.state_bytes

    @property
    def short(self) -> str:
        """"emb", "L7", "head", "mtp" (table cells)."""
        return {EMBEDDING: "emb", HEAD: "head", MTP: "mtp"}.get(self.name, self.name.replace("layer ", "L"))


def unit_names(cfg, with_mtp=True) -> list:
    """(name, kind) of every unit in execution order."""
    out = [(EMBEDDING, EMBEDDING)] + [(f"layer {i}", bt) for i, bt in enumerate(cfg.layers_block_type)]
    out.append((HEAD, HEAD))
    if with_mtp and cfg.num_nextn_predict_layers:
        out.append((MTP, MTP))
    return out


def unit_of(name: str, cfg) -> str | None:
    """The unit an NVIDIA-named (or transformers-named) tensor belongs to; None if none of cfg's units."""
    name = nvidia_name(name)
    if name.startswith("backbone.embeddings."):
        return EMBEDDING
    if name.startswith(("backbone.norm_f.", "lm_head.")):
        return HEAD
    if name.startswith("mtp."):
        return MTP if cfg.num_nextn_predict_layers else None
    m = _LAYER.match(name)
    if m and int(m.group(1)) < cfg.num_hidden_layers:
        return f"layer {int(m.group(1))}"
    return None


def _recipe_tensor_bytes(spec, fmt, weights, input_scales) -> int:
    if weights == "float32" and fmt == "bf16":
        return 4 * spec.numel
    return int(tensor_bytes(spec.numel, fmt, with_input_scale=input_scales))


def config_weights(cfg, recipe, weights="stored", input_scales=True, with_mtp=True) -> dict:
    """{unit name: (weight bytes, tensor names)} from the config and the recipe's storage formats.

    ``input_scales`` counts ModelOpt's 4-byte input_scale beside each quantized weight (NVIDIA's checkpoints
    carry one, params.count_bytes counts it); ``nemo-scratch quantize`` writes none, so pass False to match
    one of its checkpoints byte for byte.
    """
    out = {name: [0, []] for name, _ in unit_names(cfg, with_mtp)}
    for spec, fmt in recipe_formats(cfg, recipe, include_mtp=with_mtp and bool(cfg.num_nextn_predict_layers)):
        row = out[unit_of(spec.name, cfg)]
        row[0] += _recipe_tensor_bytes(spec, fmt, weights, input_scales)
        row[1].append(spec.name)
    if cfg.tie_word_embeddings:   # the head multiplies by the embedding table: it needs its own copy there
        out[HEAD][0] += out[EMBEDDING][0]
    return {name: (nbytes, tuple(names)) for name, (nbytes, names) in out.items()}


def checkpoint_weights(path, weights="stored", with_mtp=True):
    """(cfg, {unit name: (weight bytes, stored tensor names)}) from a checkpoint's safetensors headers."""
    reader = open_checkpoint(path)
    cfg = reader.config
    has_mtp = with_mtp and any(nvidia_name(n).startswith("mtp.") for n in reader.names())
    out = {name: [0, []] for name, _ in unit_names(cfg, has_mtp)}
    for stored in reader.names():
        if stored.endswith(IGNORED):
            continue
        unit = unit_of(stored, cfg)
        if unit == MTP and not has_mtp:
            continue
        if unit is None:
            raise CheckpointError(f"{reader.file_of(stored)}: tensor {stored!r} belongs to none of the units of the "
                                  f"model {reader.directory / 'config.json'} describes (embedding, layers 0.."
                                  f"{cfg.num_hidden_layers - 1}, norm_f + lm_head, mtp): the config does not "
                                  "match the weights")
        dtype, shape = reader.dtype_of(stored), reader.shape_of(stored)
        upcast = UPCAST_DTYPES if weights == "float32" else STORED_UPCAST_DTYPES
        itemsize = 4 if dtype in upcast else STORAGE[dtype].itemsize
        out[unit][0] += math.prod(shape) * itemsize
        out[unit][1].append(stored)
    if cfg.tie_word_embeddings:
        out[HEAD][0] += out[EMBEDDING][0]
    return cfg, {name: (nbytes, tuple(names)) for name, (nbytes, names) in out.items()}
