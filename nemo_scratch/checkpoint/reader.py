"""Checkpoint directories: config.json plus safetensors files, opened and validated with NumPy alone.

A checkpoint directory holds config.json and one of
- model.safetensors,
- model.safetensors.index.json ({"weight_map": {tensor: file}}) and the shard files it names,
- several *.safetensors files without an index (every tensor in exactly one of them).
Optional: hf_quant_config.json (ModelOpt), or a "quantization_config" object inside config.json.

``open_checkpoint`` gives tensor-by-tensor access to what is stored; ``load_tensors`` turns that into the
validated logical weights the model reads (NVIDIA names, float arrays or packed NVFP4Weight / FP8Weight).

Nothing here unpickles or runs code from the checkpoint, and no file outside the directory is ever opened
(paths.py: index entries must be plain file names; absolute names, ``..`` and symlinks leading out are
refused, for config.json, hf_quant_config.json and tokenizer.json too, except the Hugging Face hub
cache's snapshot links into its ``blobs``). Every JSON file is read with bounded size and depth
(strict_json.py). A directory an interrupted write left behind (it still holds safe_write.MARKER) is
refused, and files whose names start with "." (temporaries, macOS "._" companions) are not shards.
Small tensors and quantization scales must be finite (guards.check_loaded), and the memory the load needs
is checked first (memory.py).
"""

from __future__ import annotations

import difflib
from functools import cached_property
from pathlib import Path

import numpy as np

from ..config import NemotronConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..guards import check_loaded
from ..memory import available_bytes, check_fits
from ..ops.formats import BF16Weight, FP8Weight, NVFP4Weight
from ..strict_json import CONFIG_BYTES, INDEX_BYTES, read_json
from .names import check_tensor_set, expert_names, is_stacked, nvidia_name
from .paths import check_file_name, resolve_inside
from .safe_write import MARKER
from .safetensors_io import STORAGE, SafetensorsFile

CONFIG, SINGLE, INDEX, QUANT_CONFIG = "config.json", "model.safetensors", "model.safetensors.index.json", \
    "hf_quant_config.json"


class CheckpointReader:
    """The tensors of one checkpoint directory, by stored name, whichever file holds them."""

    def __init__(self, directory: Path, files: dict, where: dict, raw_config: dict, source: str):
        self.directory = directory
        self.files = files            # {file name relative to the directory: SafetensorsFile}
        self._where = where           # {stored tensor name: file name}
        self.raw_config = raw_config  # config.json as a dict
        self.source = source          # how error messages name the tensor files as a whole

    @cached_property
    def config(self) -> NemotronConfig:
        return NemotronConfig.from_dict(self.raw_config, source=str(self.directory / CONFIG))

    @cached_property
    def quant_config(self):
        """The raw ModelOpt quantization dict: hf_quant_config.json, else config.json's quantization_config,
        else None (parsed into recipes by checkpoint/modelopt.py)."""
        path = self.directory / QUANT_CONFIG
        if path.is_file() or path.is_symlink():
            return read_json(resolve_inside(self.directory, QUANT_CONFIG, str(path)), max_bytes=INDEX_BYTES,
                             error=ConfigError)
        value = self.raw_config.get("quantization_config")
        return value if isinstance(value, dict) else None

    def names(self) -> list:
        """Every stored tensor name, sorted."""
        return sorted(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def file_of(self, name) -> Path:
        return self.directory / self._file_name(name)

    def _file_name(self, name) -> str:
        if name not in self._where:
            close = difflib.get_close_matches(str(name), list(self._where), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CheckpointError(f"{self.source}: no tensor {name!r} in this checkpoint{hint}")
        return self._where[name]

    def _file(self, name) -> SafetensorsFile:
        return self.files[self._file_name(name)]

    def dtype_of(self, name) -> str:
        return self._file(name).dtype_of(name)

    def shape_of(self, name) -> tuple:
        return self._file(name).shape_of(name)

    def get(self, name, copy=False):
        """The stored tensor as NumPy (BF16/F16 upcast to float32 exactly, F8_E4M3 as uint8 codes); ``copy``
        reads it into memory of its own instead of viewing the memory-mapped file."""
        return self._file(name).get(name, copy)

    def raw(self, name):
        """The stored values without conversion, a read-only view of the memory-mapped file (BF16 as uint16)."""
        return self._file(name).raw(name)


def open_checkpoint(path) -> CheckpointReader:
    """Open and validate a checkpoint directory (headers, index, file containment); tensors are read lazily."""
    try:
        directory = Path(path)
    except TypeError:
        raise CheckpointError(f"checkpoint path {path!r} is not a path") from None
    if "\0" in str(directory):
        raise CheckpointError(f"checkpoint path {str(directory)!r} holds a NUL byte")
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise CheckpointError(f"{directory}: {what}; expected a checkpoint directory holding config.json and "
                              "*.safetensors")
    if (directory / MARKER).exists():
        raise CheckpointError(f"{directory}: an interrupted write left this directory incomplete (it holds "
                              f"{MARKER}); it is not a checkpoint: delete it and write again")
    config_path = directory / CONFIG
    if not (config_path.exists() or config_path.is_symlink()):
        raise CheckpointError(f"{config_path}: not found; a checkpoint directory needs a config.json next to its "
                              "safetensors files")
    raw_config = read_json(resolve_inside(directory, CONFIG, str(config_path)), error=ConfigError,
                           max_bytes=CONFIG_BYTES)
    if (directory / INDEX).is_file() or (directory / INDEX).is_symlink():
        files, where, source = _open_indexed(directory)
    else:
        files, where, source = _open_unindexed(directory)
    return CheckpointReader(directory, files, where, raw_config, source)


def _open_indexed(directory):
    index_path = directory / INDEX
    index = read_json(resolve_inside(directory, INDEX, str(index_path)), max_bytes=INDEX_BYTES)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object {{tensor: file}}, got "
                              f"{str(weight_map)[:200]}")
    files = {}
    for name, file_name in weight_map.items():
        entry = f"{index_path}: weight_map entry {name[:200]!r}"
        if not isinstance(file_name, str) or file_name not in files:
            check_file_name(file_name, entry)
            files[file_name] = SafetensorsFile(resolve_inside(directory, file_name, entry))
        if name not in files[file_name]:
            raise CheckpointError(f"{index_path}: weight_map puts tensor {name!r} in {file_name}, but "
                                  f"{directory / file_name} has no such tensor")
    for file_name, f in files.items():
        for name in f.keys():
            if weight_map.get(name) != file_name:
                listed = f"puts it in {weight_map[name]}" if name in weight_map else "does not list it"
                raise CheckpointError(f"{directory / file_name}: holds tensor {name!r} but {index_path} {listed}")
    return files, dict(weight_map), f"{index_path} ({len(files)} shards)"


def _open_unindexed(directory):
    paths = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))
    if not paths:
        raise CheckpointError(f"{directory}: no {SINGLE}, {INDEX} or other *.safetensors file found")
    files, where = {}, {}
    for path in paths:
        f = files[path.name] = SafetensorsFile(resolve_inside(directory, path.name, str(directory)))
        for name in f.keys():
            if name in where:
                raise CheckpointError(f"{directory}: tensor {name!r} is stored twice, in {where[name]} and "
                                      f"{path.name}; expected each tensor in exactly one file")
            where[name] = path.name
    source = str(paths[0]) if len(paths) == 1 else f"{directory} ({', '.join(files)})"
    return files, where, source


# ---------------------------------------------------------------------------------------------- load_tensors

# ModelOpt's companions of a quantized "X.weight" (spec 9.2); weight_scale_2 first so it is not read as
# weight_scale.
COMPANIONS = ("weight_scale_2", "weight_scale", "input_scale")
# FP8 KV-cache calibration scales (spec 9.2). Harmless extras: a reference with a float KV cache has no use for
# them, so they are skipped and listed in info["ignored"].
IGNORED = (".k_proj.k_scale", ".v_proj.v_scale")
FORMAT_OF = {"BF16": "bf16", "F16": "f16", "F32": "f32", "F64": "f64"}


WEIGHT_MODES = ("stored", "float32", "auto")
# "auto" takes "float32" only when the upcast weights use at most this share of the memory available
AUTO_FLOAT32_SHARE = 0.5


def load_tensors(path, dtype="float32", weights="float32"):
    """Read, map and validate a checkpoint directory: -> (cfg, tensors, info).

    tensors  {NVIDIA name of a logical weight: value}. NVFP4 / FP8 ModelOpt linears are NVFP4Weight /
             FP8Weight (codes as uint8 views of the file, scales float32 whatever ``dtype``). Every other tensor
             depends on ``weights``:
             "float32"  an array in ``dtype`` ("float32" or "float64"; BF16/F16 upcast exactly);
             "stored"   every tensor as the file stores it, memory-mapped and never copied: BF16 as a BF16Weight
                        of its bit patterns (the model decodes small ones, norms and biases, where it uses
                        them: model/weights.py::as_dense), F32 as a read-only view (copied to float64 in the
                        float64 oracle mode); F16 and F64 tensors are converted to ``dtype`` as in "float32".
             Nothing but the headers (and those small tensors) is read: tensor data stays on disk until used.
             "auto"     "float32" when its bytes fit in AUTO_FLOAT32_SHARE of the available memory, else "stored".
             "float32" is refused up front (InputError: what it needs, what is available) when it cannot fit.
    info     {"path", "files", "mtp": bool, "formats": {name: "bf16"|"f16"|"f32"|"f64"|"nvfp4"|"fp8"},
              "ignored": [stored names skipped], "quant_config": dict or None, "notes": [str],
              "weights": the weight mode}
    """
    dtype = _float_dtype(dtype)
    if weights not in WEIGHT_MODES:
        raise InputError(f"load_tensors: argument weights={weights!r}; expected one of {WEIGHT_MODES}")
    reader = open_checkpoint(path)
    cfg, weights_refs, companions, ignored, formats, include_mtp = validate_checkpoint(reader)
    mode = _weight_mode(reader, weights, dtype)
    stacks = {}   # a stacked expert tensor is read (and converted) once, then split into views
    tensors = {}
    for name, ref in weights_refs.items():
        if formats[name] in ("nvfp4", "fp8"):
            tensors[name] = _packed(reader, ref, companions[name], formats[name])
            continue
        if ref[0] not in stacks:
            stacks[ref[0]] = _plain(reader, ref[0], dtype, mode)
        tensors[name] = stacks[ref[0]] if ref[1] is None else stacks[ref[0]][ref[1]]
    check_loaded(tensors, lambda name: _where(reader, name, weights_refs[name]))
    notes = []
    config_name = str(reader.directory / CONFIG)
    if cfg.num_nextn_predict_layers and not include_mtp:
        notes.append(f"{config_name} declares {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint holds "
                     "no mtp.* tensor (transformers drops them when saving): loaded without the MTP head")
    info = {"path": str(reader.directory), "files": list(reader.files), "mtp": include_mtp, "formats": formats,
            "ignored": sorted(ignored), "quant_config": reader.quant_config, "notes": notes, "weights": mode,
            "dtype": dtype.name}
    return cfg, tensors, info


def validate_checkpoint(reader):
    """Names, shapes and formats of every stored tensor checked against the config, nothing read but headers:
    -> (cfg, weights {name: ref}, companions, ignored, formats {name: format}, include_mtp)."""
    cfg = reader.config
    weights, companions, ignored = _split_companions(reader, logical_view(reader))
    formats = {name: _detect_format(reader, name, ref, companions.get(name, {})) for name, ref in weights.items()}
    _check_quant_config(reader, formats, weights)
    shapes = {name: _logical_shape(reader, ref, formats[name]) for name, ref in weights.items()}
    include_mtp = check_tensor_set(cfg, shapes, lambda name: _where(reader, name, weights[name]), reader.source,
                                   str(reader.directory / CONFIG))
    return cfg, weights, companions, ignored, formats, include_mtp


def float32_bytes(reader, dtype=np.dtype(np.float32)) -> int:
    """Bytes the "float32" weight mode allocates: every float tensor converted to ``dtype`` (a stored one that
    already has it stays a view of the file); packed NVFP4/FP8 codes stay views too."""
    total = 0
    for name in reader.names():
        kind = reader.dtype_of(name)
        if kind in ("BF16", "F16", "F32", "F64") and np.dtype(STORAGE[kind].newbyteorder("=")) != dtype:
            total += int(np.prod(reader.shape_of(name), dtype=np.int64)) * dtype.itemsize
    return total


def _weight_mode(reader, weights, dtype) -> str:
    """The weight mode a load runs in: ``weights``, with "auto" resolved and an impossible "float32" refused
    (MemoryBudgetError: what it needs, what is available, and weights='stored')."""
    if weights == "stored":
        return weights
    need, available = float32_bytes(reader, dtype), available_bytes()
    if weights == "auto":
        return "float32" if available is None or need <= AUTO_FLOAT32_SHARE * available else "stored"
    check_fits(need, f"loading {reader.directory} with weights='float32' ({dtype.name})", "load", dtype)
    return weights


def _plain(reader, stored, dtype, mode):
    """One unquantized stored tensor in the weight mode (see load_tensors)."""
    kind = reader.dtype_of(stored)
    if mode == "stored":
        if kind == "BF16":
            return BF16Weight(reader.raw(stored))
        if kind in ("F32", "F64") and np.dtype(STORAGE[kind].newbyteorder("=")) == dtype:
            return reader.raw(stored)
    # "float32": a copy of its own (a plain read), so no page of the file stays mapped once the load is done
    return np.asarray(reader.get(stored, copy=True), dtype=dtype)


def _check_quant_config(reader, formats, weights):
    """Every weight must be stored in the format the ModelOpt quantization config declares for its module
    (hf_quant_config.json, or config.json's quantization_config; both forms, see checkpoint/modelopt.py)."""
    if reader.quant_config is None:
        return
    from .modelopt import parse_quant_config

    source = str(reader.directory / (QUANT_CONFIG if (reader.directory / QUANT_CONFIG).is_file() else CONFIG))
    declared_formats = parse_quant_config(reader.quant_config, source=source)
    for name, fmt in formats.items():
        stored = fmt if fmt in ("nvfp4", "fp8") else "bf16"
        declared = declared_formats.format_of(name)
        if stored != declared:
            raise CheckpointError(f"{_where(reader, name, weights[name])} is stored as {stored.upper()}, but "
                                  f"{source} declares {declared.upper()} for module {name.removesuffix('.weight')!r}")


def logical_view(reader) -> dict:
    """{NVIDIA name: (stored name, expert index or None)} for every stored tensor; transformers' stacked
    experts [e, ...] become e entries (names.py holds the mapping)."""
    view = {}
    for stored in reader.names():
        if is_stacked(stored):
            shape = reader.shape_of(stored)
            if len(shape) != 3:
                raise CheckpointError(f"{reader.file_of(stored)}: stacked expert tensor {stored!r} has shape "
                                      f"{list(shape)}, expected 3 dimensions [e, rows, cols]")
            refs = [(name, (stored, x)) for x, name in enumerate(expert_names(stored, shape[0]))]
        else:
            refs = [(nvidia_name(stored), (stored, None))]
        for name, ref in refs:
            if name in view:
                raise CheckpointError(f"{reader.source}: tensor {name!r} is stored twice, as {view[name][0]!r} in "
                                      f"{reader.file_of(view[name][0])} and as {stored!r} in {reader.file_of(stored)}")
            view[name] = ref
    return view


def _where(reader, name, ref) -> str:
    stored = ref[0] if ref[1] is None else f"{ref[0]}[{ref[1]}]"
    alias = "" if stored == name else f" (stored as {stored!r})"
    return f"{reader.file_of(ref[0])}: tensor {name!r}{alias}"


def _split_companions(reader, view):
    """-> ({weight name: ref}, {weight name: {suffix: ref}}, [ignored stored names])."""
    weights, companions, ignored = {}, {}, []
    for name, ref in view.items():
        if name.endswith(IGNORED):
            ignored.append(ref[0])
            continue
        suffix = next((s for s in COMPANIONS if name.endswith("." + s)), None)
        if suffix is None:
            weights[name] = ref
        else:
            companions.setdefault(name[:-len(suffix)] + "weight", {})[suffix] = ref
    for base, group in companions.items():
        if base not in weights:
            stored = next(iter(group.values()))[0]
            raise CheckpointError(f"{reader.file_of(stored)}: tensor {stored!r} is unexpected: a quantization "
                                  f"scale whose weight {base!r} is not in the checkpoint")
    return weights, companions, ignored


def _detect_format(reader, name, ref, group) -> str:
    """The storage format of one logical weight, from the dtypes of its tensors (spec 9.2)."""
    dtype, shape = reader.dtype_of(ref[0]), reader.shape_of(ref[0])
    if dtype in FORMAT_OF and not group:
        return FORMAT_OF[dtype]
    is_matrix = ref[1] is None and len(shape) == 2 and name.endswith(".weight")
    if is_matrix and dtype == "U8" and {"weight_scale", "weight_scale_2"} <= set(group):
        _check_companion(reader, group, "weight_scale", "F8_E4M3")
        _check_companion(reader, group, "weight_scale_2", "F32", scalar=True)
        _check_companion(reader, group, "input_scale", "F32", scalar=True)
        return "nvfp4"
    if is_matrix and dtype == "F8_E4M3" and "weight_scale" in group and "weight_scale_2" not in group:
        _check_companion(reader, group, "weight_scale", "F32", scalar=True)
        _check_companion(reader, group, "input_scale", "F32", scalar=True)
        return "fp8"
    if dtype in FORMAT_OF:
        stored = next(iter(group.values()))[0]
        raise CheckpointError(f"{reader.file_of(stored)}: tensor {stored!r} is unexpected: {ref[0]!r} is stored as "
                              f"{dtype}, not quantized, so it takes no scale tensors")
    scales = ", ".join(f"{s} {reader.dtype_of(r[0])}" for s, r in group.items()) or "no scale tensors"
    raise CheckpointError(f"{_where(reader, name, ref)} has unsupported dtype {dtype} (with {scales}): expected BF16, "
                          "F16, F32 or F64, or a ModelOpt NVFP4 set (U8 weight + F8_E4M3 weight_scale + F32 "
                          "weight_scale_2) or FP8 set (F8_E4M3 weight + F32 weight_scale)")


def _check_companion(reader, group, suffix, dtype, scalar=False):
    if suffix not in group:
        return
    stored = group[suffix][0]
    got, shape = reader.dtype_of(stored), reader.shape_of(stored)
    if got != dtype or (scalar and int(np.prod(shape)) != 1):
        want = f"{dtype} scalar ([] or [1])" if scalar else dtype
        raise CheckpointError(f"{reader.file_of(stored)}: tensor {stored!r} is {got} {list(shape)}, expected {want}")


def _logical_shape(reader, ref, fmt) -> tuple:
    shape = reader.shape_of(ref[0])
    if ref[1] is not None:
        return shape[1:]
    # NVFP4 packs two 4-bit codes a byte: [out, in/2] holds [out, in]
    return (shape[0], 2 * shape[1]) if fmt == "nvfp4" else shape


def _packed(reader, ref, group, fmt):
    """An NVFP4Weight or FP8Weight from a weight and its ModelOpt companions (shapes checked)."""
    def scalar(suffix):
        return None if suffix not in group else reader.get(group[suffix][0]).reshape(())

    weight = reader.get(ref[0])
    if fmt == "fp8":
        return FP8Weight(weight, scalar("weight_scale"), scalar("input_scale"))
    out, cols = weight.shape[0], 2 * weight.shape[1]
    block_scale = reader.get(group["weight_scale"][0])
    if cols % 16 or block_scale.shape != (out, cols // 16):
        raise CheckpointError(f"{reader.file_of(group['weight_scale'][0])}: tensor {group['weight_scale'][0]!r} has "
                              f"shape {list(block_scale.shape)}, expected [{out}, {cols // 16}]: one E4M3 scale per 16 "
                              f"weights of {ref[0]!r} [out, in] = [{out}, {cols}] (in a multiple of 16)")
    return NVFP4Weight(weight, block_scale, scalar("weight_scale_2"), scalar("input_scale"))


def _float_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"load_tensors: argument dtype={dtype!r}; expected 'float32' (default) or 'float64' "
                         "(oracle mode)")
    return dt
