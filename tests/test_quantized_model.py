"""A quantized tiny model: quantize -> load -> forward equals forward on the dequantized weights,
and inspect's byte accounting equals the plan's prediction from the config alone."""

import json

import numpy as np
import pytest

import nemo_scratch
from nemo_scratch.checkpoint import load_tensors, make_random_checkpoint
from nemo_scratch.checkpoint.convert import format_inspection, inspect_checkpoint, quantize_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import CheckpointError
from nemo_scratch.model.model import Model
from nemo_scratch.model.weights import build_params
from nemo_scratch.ops.quant import FP8Weight, NVFP4Weight, fp8_dequantize, nvfp4_dequantize
from nemo_scratch.params import count_bytes
from tolerances import assert_close


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    make_random_checkpoint(out, preset("tiny"), seed=3)
    return out


def _dequantized(tensors):
    out = {}
    for name, w in tensors.items():
        if isinstance(w, NVFP4Weight):
            out[name] = nvfp4_dequantize(w.packed, w.block_scale, w.global_scale)
        elif isinstance(w, FP8Weight):
            out[name] = fp8_dequantize(w.data, w.scale)
        else:
            out[name] = w
    return out


@pytest.mark.parametrize("recipe, packed", [("ultra", {"nvfp4", "fp8"}), ("nano", {"nvfp4"}), ("fp8", {"fp8"})])
def test_quantized_forward_equals_dequantized(src, tmp_path, recipe, packed):
    dst = tmp_path / recipe
    counts = quantize_checkpoint(src, dst, recipe)
    assert packed <= set(counts)
    model = nemo_scratch.load(dst)
    cfg, tensors, info = load_tensors(dst)
    assert packed == {f for f in info["formats"].values() if f in ("nvfp4", "fp8")}
    reference = Model(cfg, build_params(cfg, _dequantized(tensors)))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
    assert_close(model.forward(ids), reference.forward(ids), "model_quantized_vs_dequantized", np.float32)
    # greedy MTP still lossless on packed weights
    np.testing.assert_array_equal(model.generate([1, 2, 3], 6, mtp=True).ids, model.generate([1, 2, 3], 6).ids)


def test_quantized_layout_matches_modelopt(src, tmp_path):
    dst = tmp_path / "ultra"
    quantize_checkpoint(src, dst, "ultra")
    hf_quant = json.loads((dst / "hf_quant_config.json").read_text())
    layers = hf_quant["quantization"]["quantized_layers"]
    assert hf_quant["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert layers["backbone.layers.2.mixer.experts.0.up_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["backbone.layers.0.mixer.in_proj"] == {"quant_algo": "FP8"}
    assert "backbone.layers.1.mixer.q_proj" not in layers          # attention stays BF16
    from nemo_scratch.checkpoint import open_checkpoint

    r = open_checkpoint(dst)
    e = "backbone.layers.2.mixer.experts.0.up_proj"
    assert r.dtype_of(e + ".weight") == "U8" and r.dtype_of(e + ".weight_scale") == "F8_E4M3"
    assert r.dtype_of(e + ".weight_scale_2") == "F32"
    assert r.shape_of(e + ".weight") == (16, 8) and r.shape_of(e + ".weight_scale") == (16, 1)
    assert r.dtype_of("backbone.layers.0.mixer.in_proj.weight") == "F8_E4M3"


@pytest.mark.parametrize("recipe", ["bf16", "ultra", "nano", "fp8"])
def test_inspect_bytes_equal_the_plan(src, tmp_path, recipe):
    path = src
    if recipe != "bf16":
        path = tmp_path / recipe
        quantize_checkpoint(src, path, recipe)
    report = inspect_checkpoint(path)
    plan = count_bytes(preset("tiny"), recipe)
    assert report["total_params"] == plan["params"]
    # the plan also counts a 4-byte input_scale per quantized tensor; quantize writes none (no calibration data)
    n_quant = sum(r["tensors"] for f, r in plan["by_format"].items() if f in ("nvfp4", "fp8"))
    assert report["total_bytes"] == pytest.approx(plan["total"] - 4 * n_quant, abs=0.5)
    for row in report["groups"]:
        if row["format"] == "nvfp4":
            assert 4.5 <= row["bits_per_param"] < 4.5 + 64 / 128   # codes + E4M3 scales + one fp32 per tensor
        if row["format"] == "bf16":
            assert row["bits_per_param"] == 16
    assert "total" in format_inspection(report)


def test_quantize_refuses_packed_source(src, tmp_path):
    quantize_checkpoint(src, tmp_path / "q", "nano")
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", "nano")


def test_quant_config_must_match_the_stored_formats(src, tmp_path):
    """A module the quantization config declares NVFP4 but the file stores in BF16 (or the reverse) is an error
    that names the tensor and the config file."""
    dst = tmp_path / "ultra"
    quantize_checkpoint(src, dst, "ultra")
    path = dst / "hf_quant_config.json"
    cfg = json.loads(path.read_text())
    layers = cfg["quantization"]["quantized_layers"]
    del layers["backbone.layers.0.mixer.in_proj"]                       # stored FP8, now declared BF16
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"backbone.layers.0.mixer.in_proj.weight.*stored as FP8.*"
                                              r"hf_quant_config.json declares BF16"):
        nemo_scratch.load(dst)
    layers["backbone.layers.0.mixer.in_proj"] = {"quant_algo": "FP8"}
    layers["backbone.layers.1.mixer.q_proj"] = {"quant_algo": "NVFP4", "group_size": 16}   # stored BF16
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*stored as BF16.*declares NVFP4"):
        nemo_scratch.load(dst)
