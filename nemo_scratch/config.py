"""NemotronConfig: the model geometry, read from a Hugging Face ``config.json`` and validated.

Spec: docs/spec.md sections 1 (the fields) and 8 (the real configurations).

Both spellings of the layer pattern are accepted:
- new transformers: ``layers_block_type = ["mamba"|"linear_attention", "moe", "attention"|"full_attention", "mlp"]``
- NVIDIA / legacy: ``hybrid_override_pattern = "MEM*E-"`` (M mamba, E moe, * attention, - mlp)

Internally a block type is one of ``"mamba", "attention", "moe", "mlp"``.

Strictness. Everything below is a ConfigError naming the field (transformers would accept the first four
silently or with a warning; Deviation: a contradiction here means the file is wrong, and a wrong guess
would give logits of a different model):
- a wrong type: a string "false" for a boolean, a string or bool for a number, a float for an integer;
- a value out of its bounds (BOUNDS, checked before anything is sized from it: a config with millions of
  experts or layers fails at once), or a model past MAX_PARAMS parameters / MAX_TENSORS tensors;
- a non-finite float (layer_norm_epsilon, routed_scaling_factor, time_step_min/max; time_step_limit's max
  alone may be infinite);
- ``num_hidden_layers`` contradicting the length of the layer pattern (transformers warns and uses the
  pattern);
- a feature this reference does not implement: mamba_hidden_act other than "silu", mlp_hidden_act other
  than "relu2", attention_bias / mlp_bias / use_bias / mamba_proj_bias true;
- num_nextn_predict_layers > 0 with an empty MTP pattern; and the consistency rules of ``validate``.
A warning (UserWarning naming the field), as in transformers: a ``model_type`` other than "nemotron_h".
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config_parse import (BLOCK_ALIASES, BLOCK_TYPES, CHAR_BLOCK, MAX_LAYERS, PATTERN_CHAR,  # noqa: F401
                           block_list, check_raw, number, pattern_blocks, step_limit)
from .errors import ConfigError
from .presets import PRESETS, preset  # noqa: F401  (re-exported: nemo_scratch.config.preset)

# Legacy config.json keys -> the current field name.
LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_limit": "time_step_limit",
    "mamba_d_state": "ssm_state_size",
    "num_local_experts": "n_routed_experts",
}

# Upper bounds of the integer fields: generous (the largest published model is well inside), and checked
# before any size is computed from them.
BOUNDS = {
    "vocab_size": 2**24, "hidden_size": 2**17, "num_attention_heads": 2**12, "num_key_value_heads": 2**12,
    "head_dim": 2**12, "mamba_num_heads": 2**13, "mamba_head_dim": 2**12, "n_groups": 2**12,
    "ssm_state_size": 2**12, "conv_kernel": 64, "chunk_size": 2**16, "n_routed_experts": 2**14,
    "num_experts_per_tok": 2**10, "moe_intermediate_size": 2**20, "moe_shared_expert_intermediate_size": 2**20,
    "moe_latent_size": 2**17, "n_group": 2**14, "topk_group": 2**14, "intermediate_size": 2**20,
    "num_nextn_predict_layers": 64, "max_position_embeddings": 2**40,
}
MAX_PARAMS = 2**43          # ~8.8e12 parameters
MAX_TENSORS = 2**21         # ~2.1e6 checkpoint tensors
@dataclass
class NemotronConfig:
    """The geometry of a Nemotron-H / Nemotron 3 model. Field names are the config.json keys."""

    layers_block_type: list = field(default_factory=lambda: ["mamba", "moe", "attention", "mlp"])
    vocab_size: int = 131072
    hidden_size: int = 4096
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    n_groups: int = 8
    ssm_state_size: int = 128
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_limit: tuple = (0.0, math.inf)
    # MoE / LatentMoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # dense MLP blocks ("-")
    intermediate_size: int = 21504
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_layers_block_type: list = field(default_factory=lambda: ["attention", "moe"])
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "bfloat16"
    # Keys we read but that change no math here (kept so a round trip loses nothing we understand).
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived sizes (spec section 3)
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        return "".join(PATTERN_CHAR[b] for b in self.layers_block_type)

    @property
    def mtp_hybrid_override_pattern(self) -> str:
        return "".join(PATTERN_CHAR[b] for b in self.mtp_layers_block_type)

    @property
    def mamba_intermediate(self) -> int:
        """I = H_m * P (not expand * hidden: pitfall 1)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels the causal conv covers: x, B and C (not z, not dt)."""
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_out(self) -> int:
        """Rows of the Mamba in_proj: z | xBC | dt."""
        return self.mamba_intermediate + self.conv_dim + self.mamba_num_heads

    @property
    def moe_input_width(self) -> int:
        """Width the routed experts see: the latent size for LatentMoE, else hidden_size."""
        return self.moe_latent_size or self.hidden_size

    def count(self, block: str) -> int:
        return sum(1 for b in self.layers_block_type if b == block)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "NemotronConfig":
        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
            if value > BOUNDS.get(name, value):
                raise ConfigError(f"config field {name!r} is {value}, more than the bound {BOUNDS[name]} "
                                  "(nemo_scratch.config.BOUNDS)")

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel",
                     "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "n_group", "topk_group", "intermediate_size", "max_position_embeddings"):
            positive(name)
        for name in ("use_conv_bias", "norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name!r} must be true or false, got {getattr(self, name)!r}")
        for name in ("layers_block_type", "mtp_layers_block_type"):
            blocks = getattr(self, name)
            if not isinstance(blocks, (list, tuple)) or len(blocks) > MAX_LAYERS:
                raise ConfigError(f"config field {name!r} must be a list of at most {MAX_LAYERS} block types, got "
                                  f"{type(blocks).__name__} of length {len(blocks) if hasattr(blocks, '__len__') else '?'}")
        for name in ("layer_norm_epsilon", "routed_scaling_factor", "time_step_min", "time_step_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a finite number > 0, got {value!r}")
        if self.time_step_min > self.time_step_max:
            raise ConfigError(f"config fields 'time_step_min' ({self.time_step_min}) and 'time_step_max' "
                              f"({self.time_step_max}): expected min <= max")
        if self.moe_latent_size is not None:
            positive("moe_latent_size")
        nextn = self.num_nextn_predict_layers
        if isinstance(nextn, bool) or not isinstance(nextn, int) or not 0 <= nextn <= BOUNDS["num_nextn_predict_layers"]:
            raise ConfigError("config field 'num_nextn_predict_layers' must be an integer in "
                              f"[0, {BOUNDS['num_nextn_predict_layers']}], got {nextn!r}")
        if nextn and not self.mtp_layers_block_type:
            raise ConfigError(f"config field 'mtp_layers_block_type' (or 'mtp_hybrid_override_pattern') is empty "
                              f"but 'num_nextn_predict_layers' is {nextn}: an MTP head needs at least one layer")
        if not self.layers_block_type:
            raise ConfigError("config field 'layers_block_type' (or 'hybrid_override_pattern') is empty: "
                              "a model needs at least one layer")
        for where, blocks in (("layers_block_type", self.layers_block_type),
                              ("mtp_layers_block_type", self.mtp_layers_block_type)):
            for i, b in enumerate(blocks):
                if b not in BLOCK_TYPES:
                    raise ConfigError(f"config field {where!r}[{i}] is {b!r}: expected one of {BLOCK_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config field 'num_attention_heads' ({self.num_attention_heads}) must be divisible "
                              f"by 'num_key_value_heads' ({self.num_key_value_heads})")
        if self.mamba_num_heads % self.n_groups:
            raise ConfigError(f"config field 'mamba_num_heads' ({self.mamba_num_heads}) must be divisible "
                              f"by 'n_groups' ({self.n_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                              f"'n_routed_experts' ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"config field 'n_routed_experts' ({self.n_routed_experts}) must be divisible "
                              f"by 'n_group' ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ConfigError(f"config field 'topk_group' ({self.topk_group}) exceeds 'n_group' ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and self.topk_group * per_group < self.num_experts_per_tok:
            raise ConfigError(f"config fields 'topk_group' x experts per group ({self.topk_group} x {per_group}) "
                              f"must be >= 'num_experts_per_tok' ({self.num_experts_per_tok})")
        lo, hi = self.time_step_limit
        if not (0.0 <= lo <= hi) or not math.isfinite(lo):
            raise ConfigError(f"config field 'time_step_limit' must be (min, max) with 0 <= min <= max and min "
                              f"finite, got {lo, hi}")
        self._check_size()
        return self

    def _check_size(self):
        """The tensor and parameter counts this config implies, from the formulas (no list is built)."""
        d, e, l_ = self.hidden_size, self.n_routed_experts, self.moe_input_width
        sh, lat = self.moe_shared_expert_intermediate_size, self.moe_latent_size or 0
        per_block = {  # (tensors, parameters) of one block, its norm included (checkpoint/schema.py)
            "mamba": (8 + self.use_conv_bias, self.in_proj_out * d + self.conv_dim * (self.conv_kernel + 1)
                      + 3 * self.mamba_num_heads + self.mamba_intermediate * (d + 1) + d),
            "attention": (5, 2 * (self.num_attention_heads + self.num_key_value_heads) * self.head_dim * d + d),
            "moe": (3 + 2 * e + 2 * bool(sh) + 2 * bool(lat),
                    e * (d + 1) + 2 * e * self.moe_intermediate_size * l_ + 2 * sh * d + 2 * lat * d + d),
            "mlp": (3, 2 * self.intermediate_size * d + d),
        }
        blocks = list(self.layers_block_type) + list(self.mtp_layers_block_type) * self.num_nextn_predict_layers
        tensors = 3 + sum(per_block[b][0] for b in blocks)
        params = 2 * self.vocab_size * d + sum(per_block[b][1] for b in blocks)
        if tensors > MAX_TENSORS or params > MAX_PARAMS:
            raise ConfigError(f"config describes {tensors:,} tensors and {params:.3e} parameters, more than the "
                              f"bounds of {MAX_TENSORS:,} tensors and {MAX_PARAMS:.3e} parameters (see n_routed_experts "
                              f"= {e}, {len(self.layers_block_type)} layers, hidden_size = {d})")

    # ------------------------------------------------------------------ reading and writing config.json
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "NemotronConfig":
        """Build from the dict of an HF config.json (new or legacy keys). ``source`` names it in errors."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        check_raw(raw, source)
        data = dict(raw)
        for old, new in LEGACY_KEYS.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
        if "layers_block_type" in data and data["layers_block_type"] is not None:
            data["layers_block_type"] = block_list(data["layers_block_type"], "layers_block_type", source)
        elif "hybrid_override_pattern" in data:
            data["layers_block_type"] = pattern_blocks(data["hybrid_override_pattern"], "hybrid_override_pattern",
                                                        source)
        else:
            raise ConfigError(f"{source}: neither 'layers_block_type' nor 'hybrid_override_pattern' is present")
        data.pop("hybrid_override_pattern", None)
        layers = data.get("num_hidden_layers")
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)
                                   or layers != len(data["layers_block_type"])):
            raise ConfigError(f"{source}: field 'num_hidden_layers' is {layers!r} but the layer pattern has "
                              f"{len(data['layers_block_type'])} layers; expected them to agree (or leave "
                              "num_hidden_layers out)")
        if data.get("mtp_layers_block_type") is not None:
            data["mtp_layers_block_type"] = block_list(data["mtp_layers_block_type"], "mtp_layers_block_type", source)
        elif data.get("mtp_hybrid_override_pattern"):
            data["mtp_layers_block_type"] = pattern_blocks(data["mtp_hybrid_override_pattern"],
                                                            "mtp_hybrid_override_pattern", source)
        else:
            data.pop("mtp_layers_block_type", None)
        data.pop("mtp_hybrid_override_pattern", None)
        if data.get("num_key_value_heads") is None and "num_attention_heads" in data:
            data["num_key_value_heads"] = data["num_attention_heads"]
        if "time_step_limit" in data:
            data["time_step_limit"] = step_limit(data["time_step_limit"], source)
        if data.get("num_nextn_predict_layers") is None:
            data["num_nextn_predict_layers"] = 0

        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for f in dataclasses.fields(cls):
            kind = f.type.replace(" | None", "")
            if f.name in kwargs and kind in ("int", "float") and kwargs[f.name] is not None:
                kwargs[f.name] = number(kwargs[f.name], f.name, kind, source)
            elif f.name in kwargs and kind in ("bool", "str") and not isinstance(kwargs[f.name], {"bool": bool,
                                                                                                   "str": str}[kind]):
                if kind == "str" and kwargs[f.name] is None:
                    continue
                expected = "true or false" if kind == "bool" else "a string"
                raise ConfigError(f"{source}: field {f.name!r} must be {expected}, got {kwargs[f.name]!r}")
        try:
            cfg = cls(**kwargs, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"{source}: {exc}") from None
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, path) -> "NemotronConfig":
        from .strict_json import read_json

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: file not found (a checkpoint directory needs a config.json)")
        return cls.from_dict(read_json(path, error=ConfigError, expect=None), source=str(path))

    def to_dict(self) -> dict:
        """The HF config.json dict, in NVIDIA's layout (hybrid_override_pattern, model_type nemotron_h)."""
        out = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "layers_block_type", "mtp_layers_block_type"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        # inf is written as JSON's "Infinity" extension, as transformers writes it
        out["time_step_limit"] = [float(v) for v in self.time_step_limit]
        out["hybrid_override_pattern"] = self.hybrid_override_pattern
        out["num_hidden_layers"] = self.num_hidden_layers
        if self.num_nextn_predict_layers:
            out["mtp_hybrid_override_pattern"] = self.mtp_hybrid_override_pattern
        out["n_groups"] = self.n_groups
        out["expand"] = 2
        out["mamba_hidden_act"] = "silu"
        out["mlp_hidden_act"] = "relu2"
        out["attention_bias"] = out["mlp_bias"] = out["use_bias"] = out["mamba_proj_bias"] = False
        return out

    def save(self, directory) -> Path:
        """Write ``directory``/config.json (atomically; an existing one is replaced)."""
        from .checkpoint.safe_write import atomic_file

        path = Path(directory) / "config.json"
        with atomic_file(path, overwrite=True, what=str(path), error=ConfigError) as f:
            f.write((json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return path

    def replace(self, **changes) -> "NemotronConfig":
        return dataclasses.replace(self, **changes).validate()

