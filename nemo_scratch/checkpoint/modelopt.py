"""ModelOpt quantization configs and the quantization recipes of Nemotron 3. Spec section 9.1.

Three things, one vocabulary of storage formats (``FORMATS``):
- ``parse_quant_config(raw)`` reads what ModelOpt writes (hf_quant_config.json, or config.json's
  ``quantization_config``) and answers ``format_of(module_name)`` for any module;
- ``recipe_format(spec, recipe)`` says how a recipe stores each checkpoint tensor (schema.TensorSpec);
- ``quant_config_for(cfg, recipe)`` writes the hf_quant_config.json of a recipe, so that parsing it gives
  back ``recipe_format`` for every tensor. params.py counts bytes with ``recipe_format`` too, so the byte
  accounting, the quantizer and the written config can never disagree.

A module name is a tensor name without ".weight" (``backbone.layers.1.mixer.experts.0.up_proj``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..config import NemotronConfig
from ..errors import ConfigError, InputError
from ..strict_json import INDEX_BYTES, brief, read_json
from .schema import TensorSpec, expected_tensors

FORMATS = ("bf16", "f32", "fp8", "nvfp4")
RECIPES = ("bf16", "fp8", "nano", "super", "ultra")
NVFP4_GROUP_SIZE = 16
MAX_EXCLUDE = 2**12   # exclude_modules globs (the published Nano file lists about a hundred)
QUANT_CONFIG_FILE = "hf_quant_config.json"

# Kept in float32 whatever the recipe, as NVIDIA ships them (spec section 7: A_log, D, the router bias).
F32_ROLES = frozenset({"A_log", "D", "gate_bias"})
ROUTED_ROLES = frozenset({"expert_up", "expert_down"})
SHARED_ROLES = frozenset({"shared_up", "shared_down"})
MAMBA_IO_ROLES = frozenset({"in_proj", "out_proj"})
ATTENTION_ROLES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def module_name(tensor_name: str) -> str:
    """``...mixer.in_proj.weight`` -> ``...mixer.in_proj`` (ModelOpt names modules, not tensors)."""
    return tensor_name.removesuffix(".weight")


def is_quantizable(module: str) -> bool:
    """The nn.Linear modules of Nemotron-H: every ``*_proj`` and ``lm_head``. Embeddings, norms and the router
    (a custom Parameter) are never quantized; conv1d is a Conv1d whose 4-wide rows cannot hold a 16-block."""
    return module.endswith("_proj") or module.split(".")[-1] == "lm_head"


# ================================================================================================ parsing

@dataclass(frozen=True)
class QuantConfig:
    """A parsed ModelOpt quantization config.

    algo      "NVFP4" or "FP8" (one format for every quantizable module not excluded), "MIXED_PRECISION"
              (only the modules listed in ``layers``), or None (nothing quantized)
    exclude   glob patterns of modules left unquantized (uniform algos)
    layers    module -> "nvfp4" | "fp8" (MIXED_PRECISION)
    """

    algo: str | None
    exclude: tuple = ()
    layers: dict = field(default_factory=dict)
    group_size: int = NVFP4_GROUP_SIZE
    kv_cache_quant_algo: str | None = None
    source: str = "quantization config"

    def format_of(self, module: str) -> str:
        """How this module's weight is stored: "bf16" | "nvfp4" | "fp8" (non-Linear tensors answer "bf16")."""
        module = module_name(module)
        if self.algo == "MIXED_PRECISION":
            return self.layers.get(module, "bf16")
        if self.algo is None or not is_quantizable(module):
            return "bf16"
        if self._excluded.match(module):
            return "bf16"
        return self.algo.lower()

    @cached_property
    def _excluded(self):
        """The exclude globs as one compiled regex (one match a module, however many patterns)."""
        return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.exclude) or "(?!)")


def _field(raw, key, kind, source, where, default=None):
    """raw[key] checked against ``kind``; ConfigError names the file and the field."""
    value = raw.get(key, default)
    if value is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{source}: field '{where}{key}' must be a {names}, got {brief(value)}")
    return value


def _algo(value, source, where):
    if not isinstance(value, str) or value.upper() not in ("NVFP4", "FP8"):
        raise ConfigError(f"{source}: field '{where}' is {brief(value)}: expected \"NVFP4\" or \"FP8\"")
    return value.upper()


def _group_size(raw, source, where):
    size = _field(raw, "group_size", int, source, where, default=NVFP4_GROUP_SIZE)
    if size != NVFP4_GROUP_SIZE:
        raise ConfigError(f"{source}: field '{where}group_size' is {size}: NVFP4 uses blocks of "
                          f"{NVFP4_GROUP_SIZE}")
    return size


def parse_quant_config(raw, source: str = "quantization config") -> QuantConfig:
    """Parse any of the ModelOpt forms (``source`` names the file in errors):

    hf_quant_config.json   {"producer": ..., "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                             "exclude_modules": [globs]}}
                           {"quantization": {"quant_algo": "MIXED_PRECISION",
                                             "quantized_layers": {module: {"quant_algo": "FP8" | "NVFP4"}}}}
    config.json            {"quantization_config": {"quant_method": "modelopt", "quant_algo": ..., ...}}, or
                           that inner object alone (``ignore`` is read as a synonym of ``exclude_modules``)
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    where = ""
    for key in ("quantization_config", "quantization"):
        if isinstance(raw, dict) and key in raw:
            raw, where = raw[key], where + key + "."
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field '{where.rstrip('.')}' must be a JSON object, got {brief(raw)}")
    method = raw.get("quant_method", "modelopt")
    if method != "modelopt":
        raise ConfigError(f"{source}: field '{where}quant_method' is {brief(method)}: only ModelOpt checkpoints "
                          "(\"modelopt\") are supported")
    algo = _field(raw, "quant_algo", str, source, where)
    kv = _field(raw, "kv_cache_quant_algo", str, source, where)
    if algo is None:
        return QuantConfig(None, kv_cache_quant_algo=kv, source=source)
    if algo.upper() == "MIXED_PRECISION":
        layers_raw = _field(raw, "quantized_layers", dict, source, where)
        if layers_raw is None:
            raise ConfigError(f"{source}: field '{where}quantized_layers' is missing (quant_algo is "
                              "MIXED_PRECISION)")
        layers = {}
        for module, entry in layers_raw.items():
            at = f"{where}quantized_layers[{module!r}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: field '{at}' must be an object like {{\"quant_algo\": \"FP8\"}}, "
                                  f"got {brief(entry)}")
            fmt = _algo(entry.get("quant_algo"), source, at + ".quant_algo")
            if fmt == "NVFP4":
                _group_size(entry, source, at + ".")
            layers[module_name(module)] = fmt.lower()
        return QuantConfig("MIXED_PRECISION", layers=layers, kv_cache_quant_algo=kv, source=source)
    algo = _algo(algo, source, where + "quant_algo")
    exclude = _field(raw, "exclude_modules", list, source, where)
    if exclude is None:
        exclude = _field(raw, "ignore", list, source, where, default=[])
    if len(exclude) > MAX_EXCLUDE:
        raise ConfigError(f"{source}: field '{where}exclude_modules' lists {len(exclude)} patterns, more than the "
                          f"bound {MAX_EXCLUDE}")
    for i, pattern in enumerate(exclude):
        if not isinstance(pattern, str):
            raise ConfigError(f"{source}: field '{where}exclude_modules[{i}]' must be a string, got {brief(pattern)}")
    group = _group_size(raw, source, where) if algo == "NVFP4" else NVFP4_GROUP_SIZE
    return QuantConfig(algo, exclude=tuple(exclude), group_size=group, kv_cache_quant_algo=kv, source=source)


def read_quant_config(directory) -> QuantConfig | None:
    """hf_quant_config.json in ``directory``, else config.json's quantization_config, else None."""
    directory = Path(directory)
    for name, key in ((QUANT_CONFIG_FILE, None), ("config.json", "quantization_config")):
        path = directory / name
        if not path.is_file():
            continue
        raw = read_json(path, error=ConfigError, max_bytes=INDEX_BYTES, expect=None)
        if key is None or (isinstance(raw, dict) and raw.get(key) is not None):
            return parse_quant_config(raw, source=str(path))
    return None


# ================================================================================================ recipes

def _ultra(spec: TensorSpec):
    """Ultra NVFP4 (spec 9.1): routed experts NVFP4; shared experts and Mamba in/out_proj FP8; attention,
    latent projections, embeddings, lm_head, MTP, conv and routers stay BF16 (F32 where shipped so)."""
    if spec.mtp:
        return None
    if spec.role in ROUTED_ROLES:
        return "nvfp4"
    if spec.role in SHARED_ROLES or spec.role in MAMBA_IO_ROLES:
        return "fp8"
    return None


def _nano(spec: TensorSpec, cfg: NemotronConfig):
    """Nano NVFP4 (spec 9.1): every *_proj Linear NVFP4 except lm_head, attention q/k/v/o, and the
    in/out_proj of each Mamba layer right before an attention layer; conv1d excluded."""
    if not spec.is_linear or spec.role in ATTENTION_ROLES:
        return None
    blocks = cfg.mtp_layers_block_type if spec.mtp else cfg.layers_block_type
    if spec.role in MAMBA_IO_ROLES:
        nxt = spec.layer + 1
        if nxt < len(blocks) and blocks[nxt] == "attention":
            return None
    return "nvfp4"


def _fp8(spec: TensorSpec):
    """Every *_proj Linear per-tensor FP8 (lm_head, embeddings, routers, conv stay BF16)."""
    return "fp8" if spec.is_linear else None


def recipe_format(spec: TensorSpec, recipe: str, cfg: NemotronConfig | None = None) -> str:
    """How ``recipe`` stores the tensor ``spec``: "nvfp4" | "fp8" | "bf16" | "f32".

    recipes: "bf16" (nothing quantized), "fp8", "nano", "super" (the intent of super-nvfp4.yaml: routed
    experts NVFP4, Mamba in/out and shared experts FP8; the same rule as "ultra"; the published Super map
    also has a few calibration-chosen FP8 latent/o_proj modules, which a rule cannot reproduce), "ultra".
    ``cfg`` is needed by "nano" (which Mamba layer precedes an attention layer).
    """
    if recipe not in RECIPES:
        raise InputError(f"unknown quantization recipe {recipe!r}: expected one of {RECIPES}")
    if spec.role in F32_ROLES:
        return "f32"
    if recipe == "nano":
        if cfg is None:
            raise InputError("recipe_format: recipe 'nano' needs the model config (argument cfg)")
        fmt = _nano(spec, cfg)
    else:
        fmt = {"bf16": lambda s: None, "fp8": _fp8, "super": _ultra, "ultra": _ultra}[recipe](spec)
    return fmt or "bf16"


def recipe_formats(cfg: NemotronConfig, recipe: str, include_mtp: bool = True) -> list:
    """[(TensorSpec, format)] for every tensor of ``cfg`` (schema.expected_tensors order)."""
    return [(s, recipe_format(s, recipe, cfg)) for s in expected_tensors(cfg, include_mtp=include_mtp)]


def quant_config_for(cfg: NemotronConfig, recipe: str) -> dict | None:
    """The hf_quant_config.json dict of ``recipe`` for ``cfg``; None for "bf16" (nothing to describe).

    "nano": uniform NVFP4 with exclude_modules (every unquantized Linear, and each Mamba conv1d, as the
    published Nano file lists them). "fp8" / "super" / "ultra": MIXED_PRECISION with quantized_layers.
    The KV cache stays BF16 here, so kv_cache_quant_algo is null.
    """
    from .. import __version__

    formats = recipe_formats(cfg, recipe)
    if recipe == "bf16":
        return None
    body = {"kv_cache_quant_algo": None}
    if recipe == "nano":
        body.update(quant_algo="NVFP4", group_size=NVFP4_GROUP_SIZE, exclude_modules=[
            module_name(s.name) for s, fmt in formats
            if (is_quantizable(module_name(s.name)) or s.role == "conv") and fmt != "nvfp4"])
    else:
        layers = {}
        for s, fmt in formats:
            if fmt == "nvfp4":
                layers[module_name(s.name)] = {"quant_algo": "NVFP4", "group_size": NVFP4_GROUP_SIZE}
            elif fmt == "fp8":
                layers[module_name(s.name)] = {"quant_algo": "FP8"}
        body.update(quant_algo="MIXED_PRECISION", quantized_layers=layers)
    return {"producer": {"name": "nemo_scratch", "version": __version__}, "quantization": body}


def config_json_entry(hf_quant_config: dict) -> dict:
    """The config.json ``quantization_config`` for an hf_quant_config.json dict: the flat form that
    transformers and vLLM read (``quant_method: "modelopt"`` plus the fields of "quantization")."""
    return {"quant_method": "modelopt", **hf_quant_config["quantization"],
            "producer": hf_quant_config.get("producer")}
