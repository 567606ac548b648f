"""Parameter / byte / GPU accounting (nemo_scratch/params.py) against NVIDIA's published figures.

Stated tolerances: totals within 1 %; active counts within 2.5 % (the published "12B" / "55B" are rounded
model-name figures); the Ultra NVFP4 checkpoint size and bits per parameter within 0.5 %; the BF16 size 0.1 %.
"""

import pytest

from nemo_scratch.config import preset
from nemo_scratch.errors import ConfigError, InputError
from nemo_scratch.params import GB, GIB, PUBLISHED, count_bytes, count_params, format_plan, plan, tensor_bytes


def within(computed, published, rel):
    return abs(computed / published - 1) <= rel


@pytest.fixture(scope="module")
def ultra_plan():
    return plan("ultra", "ultra", gpus=8, gpu_mem_gib=80)


@pytest.mark.parametrize("name", ["nano", "super", "ultra"])
def test_published_parameter_counts(name):
    p, pub = count_params(preset(name)), PUBLISHED[name]
    assert within(p["total"], pub["total"], 0.01), (p["total"], pub["total"])
    assert within(p["active"], pub["active"], 0.025), (p["active"], pub["active"])
    if "total_with_mtp" in pub:
        assert within(p["total_with_mtp"], pub["total_with_mtp"], 0.01)
    if "active_with_embeddings" in pub:
        assert within(p["active_with_embeddings"], pub["active_with_embeddings"], 0.01)


def test_ultra_recipe_bytes_bits_and_gpu_fit(ultra_plan):
    b, g = ultra_plan["bytes"], ultra_plan["gpus"]
    assert within(b["total"], 352.3e9, 0.005), b["total"]
    assert within(b["bits_per_param"], 5.03, 0.005), b["bits_per_param"]
    assert b["params"] == ultra_plan["params"]["total_with_mtp"]          # the checkpoint carries the MTP head
    assert g["fits"] and g["per_gpu_bytes"] == pytest.approx(b["total"] / 8)
    assert g["per_gpu_gib"] == pytest.approx(b["total"] / 8 / GIB)
    assert set(b["by_format"]) == {"bf16", "f32", "fp8", "nvfp4"}
    assert within(count_bytes(preset("ultra"), "bf16")["total"], 1121e9, 0.001)


def test_plan_reports_a_misfit_without_raising():
    one = plan("nano", "bf16", gpus=1, gpu_mem_gib=40)                    # 63 GB on one 40 GiB GPU
    assert not one["gpus"]["fits"] and "does NOT fit" in format_plan(one)
    two = plan("nano", "bf16", gpus=2, gpu_mem_gib=40)
    assert two["gpus"]["fits"] and two["gpus"]["per_gpu_bytes"] == pytest.approx(one["bytes"]["total"] / 2)
    assert plan("tiny", "nano", gpus=1, gpu_mem_gib=0.001)["gpus"]["fits"]


def test_format_plan_prints_published_beside_computed(ultra_plan):
    text = format_plan(ultra_plan)
    assert "published ~352.3 GB" in text and "~5.03 bits" in text and ": fits" in text
    assert "published ~550B" in text and "published ~560B" in text and "published ~55B" in text
    assert "nvfp4" in text and "fp8" in text
    nano = format_plan(plan("nano", "nano"))
    assert "published ~3.2B" in nano and "published ~3.6B" in nano and "published ~31.6B" in nano


def test_tensor_bytes_per_format():
    n = 32 * 64
    assert tensor_bytes(n, "nvfp4") == n / 2 + n / 16 + 8                 # codes + E4M3 scales + 2 float32
    assert tensor_bytes(n, "nvfp4", with_input_scale=False) == n / 2 + n / 16 + 4
    assert tensor_bytes(n, "fp8") == n + 8
    assert tensor_bytes(n, "bf16") == 2 * n and tensor_bytes(n, "f32") == 4 * n
    with pytest.raises(InputError, match="unknown storage format 'int4'"):
        tensor_bytes(n, "int4")


def tiny_counts_by_hand(cfg):
    """Independent count for the 'tiny' preset straight from the config fields (spec sections 3-7)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    i, c, h = cfg.mamba_intermediate, cfg.conv_dim, cfg.mamba_num_heads
    mamba = cfg.in_proj_out * d + c * cfg.conv_kernel + c + 3 * h + i + d * i
    q, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attention = 2 * q * dh * d + 2 * kv * dh * d
    e, f, l, s = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_latent_size, \
        cfg.moe_shared_expert_intermediate_size
    experts = e * 2 * f * l
    moe_dense = e * d + e + 2 * s * d + 2 * l * d
    mlp = 2 * cfg.intermediate_size * d
    size = {"mamba": mamba, "attention": attention, "moe": moe_dense + experts, "mlp": mlp}
    backbone = sum(size[b] + d for b in cfg.layers_block_type) + d + 2 * v * d
    mtp = 2 * d + 2 * d * d + sum(size[b] + d for b in cfg.mtp_layers_block_type) + d
    share = cfg.num_experts_per_tok / e
    routed_backbone = experts * cfg.count("moe")
    active = backbone - v * d - routed_backbone * (1 - share)
    return backbone, backbone + mtp, active, active + mtp - experts * (1 - share)


def test_counts_match_a_hand_count_on_tiny():
    cfg = preset("tiny")
    total, total_mtp, active, active_mtp = tiny_counts_by_hand(cfg)
    p = count_params(cfg)
    assert (p["total"], p["total_with_mtp"]) == (total, total_mtp)
    assert p["active"] == round(active) and p["active_with_mtp"] == round(active_mtp)
    assert p["active_with_embeddings"] == p["active"] + cfg.vocab_size * cfg.hidden_size
    b = count_bytes(cfg, "ultra")
    assert b["params"] == total_mtp
    # ultra recipe: the backbone's routed experts (2 MoE layers x 8 experts x up/down) are NVFP4, MTP's are not
    per_expert = cfg.moe_intermediate_size * cfg.moe_latent_size
    assert b["by_format"]["nvfp4"] == {"tensors": 32, "params": 32 * per_expert,
                                       "bytes": 32 * (per_expert / 2 + per_expert / 16 + 8)}
    assert count_bytes(cfg, "ultra", include_mtp=False)["params"] == total


def test_tied_embeddings_count_the_table_as_the_head():
    cfg = preset("tiny").replace(tie_word_embeddings=True)
    untied = count_params(preset("tiny"))
    p = count_params(cfg)
    vd = cfg.vocab_size * cfg.hidden_size
    assert p["total"] == untied["total"] - vd
    assert p["active"] == p["active_with_embeddings"] == untied["active"]


def test_nano_has_no_mtp_and_bits_shrink_with_quantization():
    p = count_params(preset("nano"))
    assert p["total"] == p["total_with_mtp"] and p["active"] == p["active_with_mtp"]
    bits = {r: count_bytes(preset("small"), r)["bits_per_param"] for r in ("bf16", "fp8", "nano", "ultra")}
    assert bits["bf16"] == pytest.approx(16, abs=0.01)
    assert bits["nano"] < bits["ultra"] < bits["fp8"] < bits["bf16"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(gpus=0), "gpus must be a positive integer"), (dict(gpus=-2), "gpus must be a positive integer"),
    (dict(gpus=1.5), "gpus must be a positive integer"), (dict(gpus=True), "gpus must be a positive integer"),
    (dict(gpu_mem_gib=0), "gpu_mem_gib must be a positive number"),
    (dict(gpu_mem_gib="80"), "gpu_mem_gib must be a positive number"),
    (dict(recipe="int4"), "unknown recipe 'int4'"),
])
def test_plan_rejects_invalid_arguments(kwargs, match):
    args = dict(recipe="bf16", gpus=8, gpu_mem_gib=80.0) | kwargs
    with pytest.raises(InputError, match=match):
        plan("tiny", **args)


def test_plan_accepts_a_config_and_rejects_unknown_presets():
    report = plan(preset("tiny"), "fp8", gpus=2, gpu_mem_gib=1)
    assert report["model"] == "custom config" and report["published"] == {}
    assert "published" not in format_plan(report)
    with pytest.raises(ConfigError, match="unknown preset 'giga'"):
        plan("giga")
    with pytest.raises(InputError, match="NemotronConfig or a preset name"):
        plan(42)
    assert report["bytes"]["total"] / GB > 0
