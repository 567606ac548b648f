"""Writing checkpoints in NVIDIA's layout, and random but numerically sane test checkpoints.

A written directory is what NVIDIA ships and ``load_tensors`` reads: config.json, then model.safetensors or
shards ``model-0000k-of-0000N.safetensors`` with model.safetensors.index.json, and, for a quantized model,
hf_quant_config.json. Plain weights are stored BF16, except A_log, D and the router's
e_score_correction_bias, which NVIDIA keeps in F32; NVFP4Weight / FP8Weight become ModelOpt's tensor sets
(spec 9.2): ``X.weight`` codes + ``X.weight_scale`` (+ ``X.weight_scale_2``, ``X.input_scale``). Both
writers go through checkpoint/stream.py: headers first, then the data a piece at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..ops.quant import FP8Weight, NVFP4Weight
from .modelopt import RECIPES, quant_config_for, recipe_format
from .names import check_tensor_set
from .safe_write import check_destination
from .safetensors_io import STORAGE, bf16_to_float32, check_item, float32_to_bf16
from .schema import expected_tensors
from .stream import (F32_SUFFIXES, HOLD_ELEMS, array_entry, check_disk, encoded_entry, layout_of, row_slices,
                     stream_peak_bytes, write_streamed)


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
    _check_float_dtype("write_checkpoint", float_dtype)
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
    groups = [(name, _stored_tensors(name, value, float_dtype)) for name, value in tensors.items()]
    for _, group in groups:
        for stored, value in group:
            check_item(out_dir, stored, value)
    return write_streamed(out_dir, cfg, [array_entry(name, group) for name, group in groups], shards=shards,
                          quant_config=quant_config, overwrite=overwrite, sources=sources, extra_files=extra_files)


def _check_float_dtype(what, float_dtype):
    if float_dtype not in ("BF16", "F16", "F32"):
        raise InputError(f"{what}: argument float_dtype={float_dtype!r}; expected 'BF16', 'F16' or 'F32'")


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


# ---------------------------------------------------------------------------------------------- random models

NORM_ROLES = ("norm", "norm_f", "gated_norm", "enorm", "hnorm", "final_layernorm")
# Projections writing into the residual stream: scaled by 1/sqrt(2 * layers) (GPT-2 / Megatron init).
RESIDUAL_ROLES = ("out_proj", "o_proj", "mlp_down", "expert_down", "shared_down")


def random_tensors(cfg, seed=0) -> dict:
    """A random but numerically sane float32 model for ``cfg`` ({NVIDIA name: array}, MTP head included when
    cfg.num_nextn_predict_layers > 0). Values that write_checkpoint stores as BF16 are rounded to bfloat16
    here, so a default write + load_tensors round trip returns exactly these arrays. make_random_checkpoint
    writes the same values without holding them (random_rows, a slice of rows at a time)."""
    rng = np.random.default_rng(seed)
    return {spec.name: random_rows(cfg, spec, rng, spec.shape[0]) for spec in expected_tensors(cfg)}


def init_std(cfg, spec) -> float:
    """The standard deviation of a tensor's normal init: 1 for the embedding, 0.02 / sqrt(2 layers) for the
    projections writing into the residual stream (residual_std), 0.02 for every other projection and bias."""
    if spec.role == "embedding":
        return 1.0
    return 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if spec.role in RESIDUAL_ROLES else 0.02


def random_rows(cfg, spec, rng, rows):  # -> float32 [rows, *spec.shape[1:]]
    """The next ``rows`` rows of the random tensor ``spec``, drawn from ``rng``: drawing a tensor in slices of
    rows gives the values of drawing it whole (every draw below is element by element)."""
    shape = (rows, *spec.shape[1:])

    def normal(std):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    if spec.role in NORM_ROLES:
        value = np.float32(1.0) + normal(0.1)        # not all ones, so the norm weights are exercised
    elif spec.role == "A_log":
        # A = -exp(A_log) in [-16, -1]  (the Mamba-2 init)
        value = np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    elif spec.role == "D":
        value = np.ones(shape, dtype=np.float32)
    elif spec.role == "dt_bias":
        # dt ~ log-uniform[time_step_min, time_step_max]; dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt))
        dt = np.exp(rng.uniform(math.log(cfg.time_step_min), math.log(cfg.time_step_max), shape))
        value = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
    elif spec.role == "conv":
        value = normal(0.3)
    elif spec.role == "conv_bias":
        value = normal(0.1)
    else:   # the embedding, in_proj, q/k/v, up and down projections, router and its bias, latent, eh_proj, lm_head
        value = normal(init_std(cfg, spec))
    if not spec.name.endswith(F32_SUFFIXES):
        value = bf16_to_float32(float32_to_bf16(value))
    return value


class _RandomStream:
    """random_tensors' draws, one tensor after another from one generator, a slice of rows at a time.

    ``values(k, spec)`` yields tensor k's slices; asked again for the same tensor (a quantized weight reads
    its values twice), it rewinds the generator to where that tensor began."""

    def __init__(self, cfg, seed):
        self.cfg, self.rng = cfg, np.random.default_rng(seed)
        self.current, self.start = -1, None

    def values(self, k, spec):
        if k == self.current + 1:
            self.current, self.start = k, self.rng.bit_generator.state
        elif k != self.current:
            raise CheckpointError(f"random tensor {spec.name!r} (number {k}) drawn out of order: tensor "
                                  f"{self.current} was the last one drawn")
        self.rng.bit_generator.state = self.start
        for r0, r1 in row_slices(spec.shape):
            yield random_rows(self.cfg, spec, self.rng, r1 - r0)


def random_entries(cfg, seed=0, recipe="bf16", float_dtype="BF16") -> list:
    """The stream.Entry list of random_tensors(cfg, seed), each weight stored as ``recipe`` says (quantized
    from the same bfloat16-rounded values that quantize would read back from a BF16 write)."""
    stream = _RandomStream(cfg, seed)
    entries = []
    for k, spec in enumerate(expected_tensors(cfg)):
        fmt = recipe_format(spec, recipe, cfg)
        entries.append(encoded_entry(spec.name, spec.shape, fmt, lambda k=k, spec=spec: stream.values(k, spec),
                                     float_dtype))
    return entries


def make_random_checkpoint(out_dir, cfg, seed=0, shards=None, shard_bytes=None, recipe="bf16", overwrite=False,
                           sources=(), float_dtype="BF16", progress=None, quiet=False) -> Path:
    """A loadable random checkpoint: random_tensors(cfg, seed) written tensor by tensor, never held.

    shards / shard_bytes  as many shards of about equal bytes, or shards of at most this many bytes (default
                          stream.DEFAULT_SHARD_BYTES); one shard is model.safetensors
    recipe                "bf16" (default), or a quantization recipe ("ultra", "super", "nano", "fp8"): the
                          checkpoint make-random then quantize would write, written directly
    progress / quiet      a byte progress bar on stderr (progress.py), or ``progress`` (update(n), close())

    With recipe "bf16" and the same shards this writes the bytes of write_checkpoint(out_dir, cfg,
    random_tensors(cfg, seed), shards). The seed, the shards, the destination, the memory
    (stream.stream_peak_bytes) and the disk space are checked before a value is drawn."""
    from ..guards import check_seed
    from ..memory import check_fits
    from ..progress import progress_bar

    check_seed(seed)
    if recipe not in RECIPES:
        raise InputError(f"make_random_checkpoint: argument recipe={recipe!r}; expected one of {RECIPES}")
    _check_float_dtype("make_random_checkpoint", float_dtype)
    specs = expected_tensors(cfg)
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)
                               or not 1 <= shards <= len(specs)):
        raise InputError(f"make_random_checkpoint: argument shards={shards!r}; expected an integer in [1, "
                         f"{len(specs)}] (the number of tensors)")
    check_destination(out_dir, overwrite, sources, what="write_checkpoint: out_dir")
    what = (f"a random checkpoint of {cfg.num_hidden_layers} layers (d={cfg.hidden_size}, {cfg.n_routed_experts} "
            f"experts{'' if recipe == 'bf16' else ', recipe ' + recipe})")
    formats = [recipe_format(spec, recipe, cfg) for spec in specs]
    nvfp4 = max((spec.numel for spec, fmt in zip(specs, formats) if fmt == "nvfp4"), default=0)
    quantized = max((spec.numel for spec, fmt in zip(specs, formats) if fmt in ("nvfp4", "fp8")
                     and spec.numel <= HOLD_ELEMS), default=0)
    check_fits(stream_peak_bytes(nvfp4, quantized), what, "make-random")
    stored = [t for spec, fmt in zip(specs, formats) for t in layout_of(spec.name, spec.shape, fmt, float_dtype)]
    total = sum(math.prod(shape) * STORAGE[dtype].itemsize for _, dtype, shape in stored)
    check_disk(out_dir, total, what)          # before the entry list is built: Ultra's has 55k entries
    del specs, formats, stored
    bar = progress if progress is not None else progress_bar(total, f"writing {Path(out_dir).name}", quiet)
    try:
        return write_streamed(out_dir, cfg, random_entries(cfg, seed, recipe, float_dtype), shards=shards,
                              shard_bytes=shard_bytes, quant_config=quant_config_for(cfg, recipe),
                              overwrite=overwrite, sources=sources, progress=bar, what="make_random_checkpoint",
                              disk_what=what)
    finally:
        bar.close()
