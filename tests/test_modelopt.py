"""ModelOpt quant configs and recipes (nemo_scratch/checkpoint/modelopt.py). Spec section 9.1."""

import json

import pytest

from nemo_scratch.checkpoint.modelopt import (config_json_entry, module_name, parse_quant_config,
                                              quant_config_for, read_quant_config, recipe_format, recipe_formats)
from nemo_scratch.checkpoint.schema import expected_tensors
from nemo_scratch.config import preset
from nemo_scratch.errors import ConfigError, InputError

L = "backbone.layers"

# The shape of the published Nano NVFP4 hf_quant_config.json (spec 9.1), abridged, with one glob.
NANO_STYLE = {
    "producer": {"name": "modelopt", "version": "0.29.0"},
    "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                     "exclude_modules": ["lm_head", f"{L}.4.mixer.in_proj", f"{L}.4.mixer.out_proj",
                                         f"{L}.5.mixer.q_proj", f"{L}.*.mixer.conv1d"]},
}
# The shape of the published Super map (spec 9.1), abridged.
SUPER_STYLE = {
    "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8", "quantized_layers": {
        f"{L}.0.mixer.in_proj": {"quant_algo": "FP8"},
        f"{L}.1.mixer.experts.7.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
        f"{L}.1.mixer.shared_experts.down_proj": {"quant_algo": "NVFP4", "group_size": 16},
    }},
}


# ------------------------------------------------------------------------------------------------ parsing

def test_uniform_nvfp4_with_exclude_globs():
    q = parse_quant_config(NANO_STYLE, "hf_quant_config.json")
    assert q.algo == "NVFP4" and q.kv_cache_quant_algo == "FP8" and q.group_size == 16
    assert q.format_of("lm_head") == "bf16"
    assert q.format_of(f"{L}.4.mixer.in_proj") == "bf16" and q.format_of(f"{L}.4.mixer.in_proj.weight") == "bf16"
    assert q.format_of(f"{L}.9.mixer.conv1d") == "bf16"                       # the glob
    assert q.format_of(f"{L}.2.mixer.in_proj") == "nvfp4"
    assert q.format_of(f"{L}.5.mixer.k_proj") == "nvfp4"                      # not listed here
    assert q.format_of(f"{L}.1.mixer.experts.3.down_proj") == "nvfp4"
    # not nn.Linear: never quantized, whatever the list says
    assert q.format_of("backbone.embeddings") == "bf16" and q.format_of(f"{L}.1.mixer.gate") == "bf16"
    assert q.format_of(f"{L}.1.norm") == "bf16"


def test_mixed_precision_map():
    q = parse_quant_config(SUPER_STYLE, "hf_quant_config.json")
    assert q.algo == "MIXED_PRECISION"
    assert q.format_of(f"{L}.0.mixer.in_proj") == "fp8"
    assert q.format_of(f"{L}.1.mixer.experts.7.up_proj.weight") == "nvfp4"
    assert q.format_of(f"{L}.1.mixer.shared_experts.down_proj") == "nvfp4"
    assert q.format_of(f"{L}.1.mixer.experts.6.up_proj") == "bf16"           # unlisted = BF16
    assert q.format_of("lm_head") == "bf16"


def test_config_json_forms():
    flat = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", "*.q_proj"]}
    for raw in (flat, {"model_type": "nemotron_h", "quantization_config": flat}):
        q = parse_quant_config(raw, "config.json")
        assert q.algo == "FP8"
        assert q.format_of(f"{L}.5.mixer.q_proj") == "bf16" and q.format_of(f"{L}.5.mixer.o_proj") == "fp8"
    # config.json of the Super checkpoint: MIXED_PRECISION plus config_groups (read, not needed)
    mixed = {"quantization_config": {"quant_method": "modelopt", "config_groups": {"group_0": {}}, "ignore": [],
                                     **SUPER_STYLE["quantization"]}}
    assert parse_quant_config(mixed, "config.json").format_of(f"{L}.0.mixer.in_proj") == "fp8"
    assert parse_quant_config({"quantization": {"quant_algo": None}}).format_of("lm_head") == "bf16"


def test_read_quant_config_from_a_directory(tmp_path):
    assert read_quant_config(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert read_quant_config(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "modelopt",
                                                                              "quant_algo": "FP8"}}))
    assert read_quant_config(tmp_path).algo == "FP8"
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(NANO_STYLE))   # preferred over config.json
    assert read_quant_config(tmp_path).algo == "NVFP4"
    (tmp_path / "hf_quant_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="hf_quant_config.json: not valid JSON"):
        read_quant_config(tmp_path)


def _with(field, value):
    return {"quantization": {**NANO_STYLE["quantization"], field: value}}


@pytest.mark.parametrize("raw, match", [
    ([1, 2], "expected a JSON object, got list"),
    ({"quantization": "NVFP4"}, "field 'quantization' must be a JSON object"),
    (_with("quant_algo", "INT4"), "field 'quantization.quant_algo' is 'INT4': expected \"NVFP4\" or \"FP8\""),
    (_with("quant_algo", 4), "field 'quantization.quant_algo' must be a str"),
    (_with("group_size", 32), "field 'quantization.group_size' is 32: NVFP4 uses blocks of 16"),
    (_with("exclude_modules", "lm_head"), "field 'quantization.exclude_modules' must be a list"),
    (_with("exclude_modules", ["lm_head", 3]), "field 'quantization.exclude_modules\\[1\\]' must be a string"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
     "field 'quantization_config.quant_method' is 'gptq'"),
    ({"quantization": {"quant_algo": "MIXED_PRECISION"}}, "field 'quantization.quantized_layers' is missing"),
    ({"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a.q_proj": "FP8"}}},
     "field 'quantization.quantized_layers\\['a.q_proj'\\]' must be an object"),
    ({"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a.q_proj": {"quant_algo": "W8"}}}},
     "field 'quantization.quantized_layers\\['a.q_proj'\\].quant_algo' is 'W8'"),
    ({"quantization": {"quant_algo": "MIXED_PRECISION",
                       "quantized_layers": {"a.q_proj": {"quant_algo": "NVFP4", "group_size": 8}}}},
     "field 'quantization.quantized_layers\\['a.q_proj'\\].group_size' is 8"),
])
def test_malformed_configs_name_the_file_and_field(raw, match):
    with pytest.raises(ConfigError, match="^ckpt/hf_quant_config.json: " + match):
        parse_quant_config(raw, "ckpt/hf_quant_config.json")


# ------------------------------------------------------------------------------------------------ recipes

def _formats(cfg, recipe):
    return {s.name: fmt for s, fmt in recipe_formats(cfg, recipe)}


def test_ultra_recipe_spot_checks():
    f = _formats(preset("ultra"), "ultra")
    assert f[f"{L}.1.mixer.experts.511.up_proj.weight"] == "nvfp4"
    assert f[f"{L}.1.mixer.experts.0.down_proj.weight"] == "nvfp4"
    assert f[f"{L}.1.mixer.shared_experts.up_proj.weight"] == "fp8"
    assert f[f"{L}.0.mixer.in_proj.weight"] == "fp8" and f[f"{L}.0.mixer.out_proj.weight"] == "fp8"
    assert f[f"{L}.7.mixer.q_proj.weight"] == "bf16" and f[f"{L}.7.mixer.o_proj.weight"] == "bf16"
    assert f[f"{L}.1.mixer.fc1_latent_proj.weight"] == "bf16" and f[f"{L}.1.mixer.gate.weight"] == "bf16"
    assert f[f"{L}.0.mixer.conv1d.weight"] == "bf16" and f[f"{L}.0.mixer.dt_bias"] == "bf16"
    assert f[f"{L}.0.mixer.A_log"] == "f32" and f[f"{L}.0.mixer.D"] == "f32"
    assert f[f"{L}.1.mixer.gate.e_score_correction_bias"] == "f32"
    assert f["backbone.embeddings.weight"] == "bf16" and f["lm_head.weight"] == "bf16"
    assert f["mtp.layers.1.mixer.experts.0.up_proj.weight"] == "bf16"       # the MTP head stays BF16
    assert f["mtp.layers.0.eh_proj.weight"] == "bf16"
    assert _formats(preset("tiny"), "super") == _formats(preset("tiny"), "ultra")


def test_nano_recipe_reproduces_the_published_exclude_list():
    cfg = preset("nano")
    q = quant_config_for(cfg, "nano")["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16
    attention = [5, 12, 19, 26, 33, 42]
    published = {"lm_head"}
    published |= {f"{L}.{i - 1}.mixer.{m}" for i in attention for m in ("in_proj", "out_proj")}
    published |= {f"{L}.{i}.mixer.{m}" for i in attention for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    published |= {f"{L}.{i}.mixer.conv1d" for i, b in enumerate(cfg.layers_block_type) if b == "mamba"}
    assert set(q["exclude_modules"]) == published and len(q["exclude_modules"]) == len(published)
    f = _formats(cfg, "nano")
    assert f[f"{L}.2.mixer.in_proj.weight"] == "nvfp4" and f[f"{L}.4.mixer.in_proj.weight"] == "bf16"
    assert f[f"{L}.1.mixer.shared_experts.down_proj.weight"] == "nvfp4"
    assert f[f"{L}.1.mixer.experts.127.up_proj.weight"] == "nvfp4"


def test_fp8_and_bf16_recipes():
    cfg = preset("tiny")
    for spec, fmt in recipe_formats(cfg, "fp8"):
        want = "f32" if spec.role in ("A_log", "D", "gate_bias") else "fp8" if spec.name.endswith("_proj.weight") \
            else "bf16"
        assert fmt == want, spec.name
    assert {fmt for _, fmt in recipe_formats(cfg, "bf16")} == {"bf16", "f32"}
    assert quant_config_for(cfg, "bf16") is None


def test_recipe_errors():
    spec = expected_tensors(preset("tiny"))[0]
    with pytest.raises(InputError, match="unknown quantization recipe 'int4'"):
        recipe_format(spec, "int4")
    with pytest.raises(InputError, match="recipe 'nano' needs the model config"):
        recipe_format(spec, "nano")


@pytest.mark.parametrize("name", ["tiny", "small", "nano"])
@pytest.mark.parametrize("recipe", ["fp8", "nano", "super", "ultra"])
def test_written_config_parses_back_to_the_recipe(name, recipe):
    """quant_config_for -> JSON -> parse -> format_of agrees with recipe_format for every tensor, in both
    the hf_quant_config.json form and the config.json form."""
    cfg = preset(name)
    written = json.loads(json.dumps(quant_config_for(cfg, recipe)))
    for raw in (written, {"quantization_config": config_json_entry(written)}):
        q = parse_quant_config(raw, "hf_quant_config.json")
        for spec, fmt in recipe_formats(cfg, recipe):
            assert q.format_of(module_name(spec.name)) == ("bf16" if fmt == "f32" else fmt), (spec.name, recipe)
