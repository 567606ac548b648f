"""Reading the raw fields of a config.json: the layer-pattern spellings, numbers, the dt limit, and the fields
this reference does not implement (see config.py's docstring for what is an error and what a warning)."""

from __future__ import annotations

import json
import math
import warnings

from .errors import ConfigError

BLOCK_TYPES = ("mamba", "attention", "moe", "mlp")
PATTERN_CHAR = {"mamba": "M", "attention": "*", "moe": "E", "mlp": "-"}
CHAR_BLOCK = {c: b for b, c in PATTERN_CHAR.items()}
# Names transformers and vLLM use for the same four mixers.
BLOCK_ALIASES = {"linear_attention": "mamba", "full_attention": "attention", "mamba2": "mamba"}

MAX_LAYERS = 2**12          # layers of the backbone pattern (and of the MTP pattern)
UNSUPPORTED = {"mamba_hidden_act": "silu", "mlp_hidden_act": "relu2", "attention_bias": False, "mlp_bias": False,
               "use_bias": False, "mamba_proj_bias": False}


def check_raw(raw, source):
    """Fields read nowhere else: features this reference lacks, a foreign model_type (a warning)."""
    for name, supported in UNSUPPORTED.items():
        value = raw.get(name)
        if value is not None and (type(value) is not type(supported) or value != supported):
            raise ConfigError(f"{source}: field {name!r} is {value!r}: this reference implements only "
                              f"{json.dumps(supported)}")
    model_type = raw.get("model_type", "nemotron_h")
    if model_type != "nemotron_h":
        warnings.warn(f"{source}: field 'model_type' is {model_type!r}, expected 'nemotron_h'; reading it as a "
                      "Nemotron-H config", stacklevel=3)


def number(value, name, kind, source):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: field {name!r} must be a number, got {str(value)[:100]!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: field {name!r} must be a finite number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: field {name!r} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def step_limit(value, source):
    if value is None:
        return (0.0, math.inf)
    def number(v):  # transformers 5.x writes inf as {"__float__": "Infinity"}; others write "inf" or Infinity
        return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)

    try:
        lo, hi = (number(v) for v in value)
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("NaN")
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"{source}: field 'time_step_limit' must be a pair [min, max], got {value!r}") from None
    return (lo, hi)


def block_list(value, name, source):
    if isinstance(value, str):
        return pattern_blocks(value, name, source)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: field {name!r} must be a list of block types, got {str(value)[:100]!r}")
    if len(value) > MAX_LAYERS:
        raise ConfigError(f"{source}: field {name!r} lists {len(value)} layers, more than the bound {MAX_LAYERS}")
    out = []
    for i, b in enumerate(value):
        if not isinstance(b, str):
            raise ConfigError(f"{source}: field {name!r}[{i}] is {str(b)[:60]!r}: expected a block type string")
        b = BLOCK_ALIASES.get(b, b)
        if b not in BLOCK_TYPES:
            raise ConfigError(f"{source}: field {name!r}[{i}] is {b!r}: expected one of "
                              f"{BLOCK_TYPES + tuple(BLOCK_ALIASES)}")
        out.append(b)
    return out


def pattern_blocks(pattern, name, source):
    if not isinstance(pattern, str):
        raise ConfigError(f"{source}: field {name!r} must be a string like 'ME*-', got {str(pattern)[:100]!r}")
    if len(pattern) > MAX_LAYERS:
        raise ConfigError(f"{source}: field {name!r} has {len(pattern)} layers, more than the bound {MAX_LAYERS}")
    out = []
    for i, ch in enumerate(pattern):
        if ch not in CHAR_BLOCK:
            raise ConfigError(f"{source}: field {name!r} has {ch!r} at position {i}: expected one of "
                              "M (mamba), E (moe), * (attention), - (mlp)")
        out.append(CHAR_BLOCK[ch])
    return out
