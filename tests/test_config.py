"""NemotronConfig: both layer-pattern spellings, legacy keys, presets, and errors that name the field."""

import json
import math

import pytest

from nemo_scratch.config import PRESETS, NemotronConfig, preset
from nemo_scratch.errors import ConfigError


def test_pattern_and_list_forms_agree():
    a = NemotronConfig.from_dict({"hybrid_override_pattern": "ME*-"})
    b = NemotronConfig.from_dict({"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]})
    assert a.layers_block_type == b.layers_block_type == ["mamba", "moe", "attention", "mlp"]
    assert a.hybrid_override_pattern == "ME*-"


def test_legacy_keys_and_mtp_pattern():
    cfg = NemotronConfig.from_dict({"hybrid_override_pattern": "M*", "mamba_n_groups": 4, "mamba_d_conv": 3,
                                    "mamba_num_heads": 8, "num_nextn_predict_layers": 1,
                                    "mtp_hybrid_override_pattern": "*E", "time_step_limit": [0.0, "inf"]})
    assert cfg.n_groups == 4 and cfg.conv_kernel == 3
    assert cfg.mtp_layers_block_type == ["attention", "moe"]
    assert cfg.time_step_limit == (0.0, math.inf)


def test_json_round_trip(tmp_path):
    cfg = preset("tiny")
    cfg.save(tmp_path)
    again = NemotronConfig.from_json(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.layers_block_type == cfg.layers_block_type


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    cfg = preset(name)
    assert cfg.num_hidden_layers == len(cfg.hybrid_override_pattern)


def test_real_preset_geometry():
    nano, sup, ultra = preset("nano"), preset("super"), preset("ultra")
    assert (nano.num_hidden_layers, nano.count("mamba"), nano.count("moe"), nano.count("attention")) == (52, 23, 23, 6)
    assert (sup.num_hidden_layers, sup.count("mamba"), sup.count("moe"), sup.count("attention")) == (88, 40, 40, 8)
    assert (ultra.num_hidden_layers, ultra.count("mamba"), ultra.count("moe"), ultra.count("attention")) == (108, 48, 48, 12)
    # spec section 3 table: conv_dim and in_proj rows
    assert (nano.mamba_intermediate, nano.conv_dim, nano.in_proj_out) == (4096, 6144, 10304)
    assert (sup.conv_dim, sup.in_proj_out) == (10240, 18560)
    assert (ultra.conv_dim, ultra.in_proj_out) == (18432, 35072)


@pytest.mark.parametrize("change, field", [
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
    ({"mamba_num_heads": 6, "n_groups": 4}, "n_groups"),
    ({"hybrid_override_pattern": "MX"}, "hybrid_override_pattern"),
    ({"layers_block_type": ["mamba", "ffn"]}, "layers_block_type"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_experts_per_tok": 9, "n_routed_experts": 8}, "num_experts_per_tok"),
    ({"n_group": 3, "n_routed_experts": 8}, "n_routed_experts"),
    ({"topk_group": 2, "n_group": 1}, "topk_group"),
    ({"time_step_limit": [0.5, 0.1]}, "time_step_limit"),
])
def test_errors_name_the_field(change, field):
    raw = {"hybrid_override_pattern": "ME*", **change}
    with pytest.raises(ConfigError, match=field):
        NemotronConfig.from_dict(raw, source="config.json")


def test_missing_pattern_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="hybrid_override_pattern"):
        NemotronConfig.from_dict({"hidden_size": 8})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        NemotronConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="file not found"):
        NemotronConfig.from_json(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("mega")


def test_config_json_is_hf_compatible(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (extra 'oracle')")
    preset("tiny").save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    hf = transformers.NemotronHConfig.from_pretrained(tmp_path)
    assert hf.hidden_size == raw["hidden_size"]
    assert len(hf.layers_block_type) == len(raw["hybrid_override_pattern"])
