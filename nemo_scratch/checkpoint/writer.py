"""Writing checkpoints in NVIDIA's layout, and random but numerically sane test checkpoints.

A written directory is what NVIDIA ships and ``load_tensors`` reads: config.json, then model.safetensors or
shards ``model-0000k-of-0000N.safetensors`` with model.safetensors.index.json, and, for a quantized model,
hf_quant_config.json. Plain weights are stored BF16, except A_log, D and the router's
e_score_correction_bias, which NVIDIA keeps in F32; NVFP4Weight / FP8Weight become ModelOpt's tensor sets
(spec 9.2): ``X.weight`` codes + ``X.weight_scale`` (+ ``X.weight_scale_2``, ``X.input_scale``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..ops.quant import FP8Weight, NVFP4Weight
from .modelopt import config_json_entry
from .names import check_tensor_set
from .reader import CONFIG, INDEX, QUANT_CONFIG, SINGLE
from .safe_write import atomic_directory, atomic_file, check_destination, copy_file
from .safetensors_io import STORAGE, bf16_to_float32, float32_to_bf16, write_safetensors
from .schema import expected_tensors

# Kept in F32 whatever the float dtype, as NVIDIA ships them (A_log and D feed exp and a skip connection; the
# router bias only ranks experts, and transformers keeps it fp32 too: _keep_in_fp32_modules_strict).
F32_SUFFIXES = (".A_log", ".D", ".gate.e_score_correction_bias")
METADATA = {"format": "pt"}   # transformers refuses a safetensors file whose metadata lacks a format


def write_checkpoint(out_dir, cfg, tensors, shards=1, quant_config=None, overwrite=False, float_dtype="BF16",
                     sources=(), extra_files=()):
    """Write ``tensors`` ({NVIDIA name: float array | NVFP4Weight | FP8Weight}) and ``cfg`` as a checkpoint.

    The tensors are first checked against ``cfg`` exactly as load_tensors checks a checkpoint (all present, none
    extra, every logical shape right; the MTP head all or nothing). ``float_dtype`` ("BF16", "F16" or "F32")
    stores the plain weights; ``quant_config`` (a dict) goes to hf_quant_config.json and to config.json's
    "quantization_config"; ``extra_files`` (paths, e.g. a tokenizer.json) are copied in by name.

    Safe: ``out_dir`` may not be, lie inside or contain any of ``sources`` (the checkpoints the tensors came
    from); an existing non-empty ``out_dir`` is refused unless ``overwrite=True``, which replaces it as a whole
    (its old files, TRAINING.md included, go); everything is written into a temporary sibling that takes the
    place of ``out_dir`` only once complete (checkpoint/safe_write.py). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InputError(f"write_checkpoint: argument shards={shards!r}; expected an integer >= 1")
    if float_dtype not in ("BF16", "F16", "F32"):
        raise InputError(f"write_checkpoint: argument float_dtype={float_dtype!r}; expected 'BF16', 'F16' or 'F32'")
    if quant_config is not None and not isinstance(quant_config, dict):
        raise InputError(f"write_checkpoint: argument quant_config must be a dict, got {type(quant_config).__name__}")
    if not isinstance(tensors, dict):
        raise InputError(f"write_checkpoint: argument tensors must be a dict {{name: array}}, got "
                         f"{type(tensors).__name__}")
    check_destination(out_dir, overwrite, sources, what="write_checkpoint: out_dir")
    shapes = {name: tuple(np.shape(value)) if not isinstance(value, (NVFP4Weight, FP8Weight)) else value.shape
              for name, value in tensors.items()}
    check_tensor_set(cfg, shapes, lambda name: f"write_checkpoint: tensor {name!r}", "write_checkpoint: tensors",
                     config_name="cfg")
    groups = [_stored_tensors(name, value, float_dtype) for name, value in tensors.items()]
    if shards > len(groups):
        raise InputError(f"write_checkpoint: argument shards={shards} exceeds the {len(groups)} weights to write")
    extra_files = [Path(f) for f in extra_files]
    for f in extra_files:
        if not f.is_file():
            raise InputError(f"write_checkpoint: extra file {f} not found")
    _check_disk(out_dir, sum(_nbytes(array, dtype) for g in groups for _, (array, dtype) in g)
                + sum(f.stat().st_size for f in extra_files))
    with atomic_directory(out_dir, overwrite, sources, what="write_checkpoint: out_dir") as tmp:
        write_checkpoint_files(tmp, cfg, groups, shards, quant_config)
        for f in extra_files:
            with atomic_file(tmp / f.name, what=f"write_checkpoint: {f.name}") as out:
                copy_file(f, out)
    return out_dir


def write_checkpoint_files(directory: Path, cfg, groups, shards=1, quant_config=None) -> list:
    """Write the files of a checkpoint into the (new, empty) ``directory``: shards and index, then config.json,
    then hf_quant_config.json. ``groups`` are the stored tensors of each weight (_stored_tensors). -> names."""
    written = []
    if shards == 1:
        written.append(write_safetensors(directory / SINGLE, dict(e for g in groups for e in g), METADATA).name)
    else:
        weight_map, total = {}, 0
        for k, part in enumerate(_split(groups, shards)):
            file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            entries = dict(e for g in part for e in g)
            write_safetensors(directory / file_name, entries, METADATA)
            weight_map.update({name: file_name for name in entries})
            total += sum(_nbytes(array, dtype) for array, dtype in entries.values())
            written.append(file_name)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(directory / INDEX, index)
        written.append(INDEX)
    config = cfg.to_dict()
    if quant_config is not None:
        _write_json(directory / QUANT_CONFIG, quant_config)
        written.append(QUANT_CONFIG)
        # config.json carries the flat form transformers and vLLM read (quant_method "modelopt")
        config["quantization_config"] = config_json_entry(quant_config)
    _write_json(directory / CONFIG, config, sort_keys=True)
    return written + [CONFIG]


def _check_disk(out_dir, nbytes):
    """Refuse before writing when the filesystem of ``out_dir`` has less room than the new files need (the
    old files stay until the new ones are complete, so their room does not count)."""
    from ..memory import free_disk_bytes, gib

    free = free_disk_bytes(out_dir)
    need = nbytes + 2**20   # headers, index and config files
    if free is not None and need > free:
        raise InputError(f"write_checkpoint: out_dir {out_dir}: the checkpoint needs about {gib(need)} on disk but "
                         f"only {gib(free)} is free there")


def _write_json(path, value, sort_keys=False):
    with atomic_file(path, overwrite=True, what=str(path), error=CheckpointError) as f:
        f.write((json.dumps(value, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8"))


def _stored_tensors(name, value, float_dtype) -> list:
    """One logical weight -> its stored [(name, (array, safetensors dtype))], ModelOpt sets expanded."""
    base = name[:-len("weight")] if name.endswith(".weight") else None
    if isinstance(value, (NVFP4Weight, FP8Weight)) and base is None:
        raise CheckpointError(f"write_checkpoint: tensor {name!r} is {type(value).__name__}, but only a "
                              "'.weight' can be stored quantized")
    if isinstance(value, NVFP4Weight):
        out, cols = value.shape[-2:]
        if np.shape(value.block_scale) != (out, cols // 16) or cols % 16:
            raise CheckpointError(f"write_checkpoint: tensor {name!r}: NVFP4 block_scale has shape "
                                  f"{list(np.shape(value.block_scale))}, expected [{out}, {cols // 16}] (one scale "
                                  f"per 16 of the {cols} inputs, a multiple of 16)")
        stored = [(name, (value.packed, "U8")), (base + "weight_scale", (value.block_scale, "F8_E4M3")),
                  (base + "weight_scale_2", (_scalar(name, value.global_scale), "F32"))]
    elif isinstance(value, FP8Weight):
        stored = [(name, (value.data, "F8_E4M3")), (base + "weight_scale", (_scalar(name, value.scale), "F32"))]
    else:
        return [(name, (np.asarray(value), "F32" if name.endswith(F32_SUFFIXES) else float_dtype))]
    if value.input_scale is not None:
        stored.append((base + "input_scale", (_scalar(name, value.input_scale), "F32")))
    return stored


def _scalar(name, value):
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind != "f":
        raise CheckpointError(f"write_checkpoint: tensor {name!r}: a quantization scale must be one float, got "
                              f"{array.dtype} of shape {list(array.shape)}")
    return array.astype(np.float32).reshape(())


def _nbytes(array, dtype) -> int:
    return int(np.size(array)) * STORAGE[dtype].itemsize


def _split(groups, shards) -> list:
    """Cut the weights, in order, into ``shards`` non-empty parts of about equal bytes (a quantized weight's
    tensors stay together)."""
    sizes = [sum(_nbytes(array, dtype) for _, (array, dtype) in g) for g in groups]
    total, done, parts = sum(sizes), 0, [[]]
    for i, (group, size) in enumerate(zip(groups, sizes)):
        shards_left = shards - len(parts)
        if parts[-1] and shards_left and (len(groups) - i <= shards_left or done >= total * len(parts) / shards):
            parts.append([])
        parts[-1].append(group)
        done += size
    return parts


# ---------------------------------------------------------------------------------------------- random models

NORM_ROLES = ("norm", "norm_f", "gated_norm", "enorm", "hnorm", "final_layernorm")
# Projections writing into the residual stream: scaled by 1/sqrt(2 * layers) (GPT-2 / Megatron init).
RESIDUAL_ROLES = ("out_proj", "o_proj", "mlp_down", "expert_down", "shared_down")


def random_tensors(cfg, seed=0) -> dict:
    """A random but numerically sane float32 model for ``cfg`` ({NVIDIA name: array}, MTP head included when
    cfg.num_nextn_predict_layers > 0). Values that write_checkpoint stores as BF16 are rounded to bfloat16
    here, so a default write + load_tensors round trip returns exactly these arrays."""
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    tensors = {}
    for spec in expected_tensors(cfg):
        def normal(std):
            return rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(std)

        if spec.role == "embedding":
            value = normal(1.0)
        elif spec.role in NORM_ROLES:
            value = np.float32(1.0) + normal(0.1)        # not all ones, so the norm weights are exercised
        elif spec.role == "A_log":
            # A = -exp(A_log) in [-16, -1]  (the Mamba-2 init)
            value = np.log(rng.uniform(1.0, 16.0, spec.shape)).astype(np.float32)
        elif spec.role == "D":
            value = np.ones(spec.shape, dtype=np.float32)
        elif spec.role == "dt_bias":
            # dt ~ log-uniform[time_step_min, time_step_max]; dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt))
            dt = np.exp(rng.uniform(math.log(cfg.time_step_min), math.log(cfg.time_step_max), spec.shape))
            value = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        elif spec.role == "conv":
            value = normal(0.3)
        elif spec.role == "conv_bias":
            value = normal(0.1)
        elif spec.role == "gate_bias":
            value = normal(0.02)
        elif spec.role in RESIDUAL_ROLES:
            value = normal(residual_std)
        else:   # in_proj, q/k/v, up projections, router, latent projections, eh_proj, lm_head
            value = normal(0.02)
        if not spec.name.endswith(F32_SUFFIXES):
            value = bf16_to_float32(float32_to_bf16(value))
        tensors[spec.name] = value
    return tensors


def make_random_checkpoint(out_dir, cfg, seed=0, shards=1, **write_options) -> Path:
    """write_checkpoint(out_dir, cfg, random_tensors(cfg, seed), shards): a loadable test checkpoint.

    The seed, the destination and the memory the float32 tensors need are checked before a tensor is drawn."""
    from ..guards import check_seed
    from ..memory import check_fits, random_checkpoint_bytes

    check_seed(seed)
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= len(expected_tensors(cfg)):
        raise InputError(f"make_random_checkpoint: argument shards={shards!r}; expected an integer in [1, "
                         f"{len(expected_tensors(cfg))}] (the number of tensors)")
    check_destination(out_dir, write_options.get("overwrite", False), write_options.get("sources", ()),
                      what="write_checkpoint: out_dir")
    check_fits(random_checkpoint_bytes(cfg), f"a random checkpoint of {cfg.num_hidden_layers} layers "
               f"(d={cfg.hidden_size}, {cfg.n_routed_experts} experts)", "make-random")
    return write_checkpoint(out_dir, cfg, random_tensors(cfg, seed), shards=shards, **write_options)
