"""bench/pipeline_slice.py, the GPU check's pipeline step, rehearsed on the CPU: a random `small` slice with
every block type, written as drawn codes, stream-loaded onto 3 virtual devices, equal to the NumPy reference
bit for bit, with measured bytes per stage equal to the plan and the projection's arithmetic."""

import re
import sys
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pipeline_slice  # noqa: E402

from nemo_scratch import load  # noqa: E402
from nemo_scratch.checkpoint.writer import init_std  # noqa: E402
from nemo_scratch.ops.quant import fp8_dequantize, nvfp4_dequantize  # noqa: E402
from nemo_scratch.presets import preset  # noqa: E402


def fields(w):
    return w.packed, w.block_scale, w.global_scale


def test_cpu_rehearsal_agrees_and_measures_the_plan(capsys, tmp_path):
    rc = pipeline_slice.main(["--backend", "numpy", "--preset", "small", "--pattern", "ME*-", "--stages", "3",
                              "--prompt-len", "6", "--decode-steps", "2", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "prefill ok" in out and "2 decode steps ok" in out
    rows = re.findall(r"^\| (\d) \| \S+ \| ([\d.]+) \| ([\d.]+) \|", out, flags=re.M)
    assert len(rows) == 3 and all(planned == measured for _, planned, measured in rows)
    assert re.search(r"projected small \(10 layers\) decode .* tok/s", out)
    assert list(tmp_path.iterdir()) == []          # the checkpoint went with its temporary directory


def test_drawn_codes_make_a_loadable_finite_model(tmp_path):
    """Every format of the ultra recipe is drawn as codes: the checkpoint loads with the plain loader, and the
    weights have about their init's scale, so the logits are finite and not degenerate."""
    cfg = preset("small", hybrid_override_pattern="ME*-", num_nextn_predict_layers=0)
    nbytes, _ = pipeline_slice.write_slice(tmp_path / "ckpt", cfg, "ultra", seed=1)
    model = load(tmp_path / "ckpt")
    assert nbytes == sum(f.stat().st_size for f in (tmp_path / "ckpt").glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in (tmp_path / "ckpt").glob("*.safetensors"))
    logits = model.forward([[1, 2, 3, 4]])
    assert np.isfinite(logits).all() and logits.std() > 0
    mamba, moe = model.params["layers"][0], model.params["layers"][1]
    decoded = {"out_proj": fp8_dequantize(mamba["out_proj"].data, mamba["out_proj"].scale),          # FP8
               "expert_up": nvfp4_dequantize(*fields(moe["experts_up"][0])),                         # NVFP4
               "q_proj": np.asarray(model.params["layers"][2]["q_proj"])}      # BF16, decoded at load (float32)
    for role, w in decoded.items():
        assert 0.5 < w.std() / init_std(cfg, SimpleNamespace(role=role)) < 2, role


def test_projection_scales_measured_layers_to_the_full_model():
    slice_cfg = preset("small", hybrid_override_pattern="ME*-")
    full = preset("small")
    times = {"layer 0": 1.0, "layer 1": 2.0, "layer 2": 0.5, "layer 3": 0.25, "embedding": 0.1, "head": 0.2}
    counts = {bt: full.layers_block_type.count(bt) for bt in set(full.layers_block_type)}
    want = counts["mamba"] * 1.0 + counts["moe"] * 2.0 + counts.get("attention", 0) * 0.5 + counts["mlp"] * 0.25
    assert pipeline_slice.project(slice_cfg, full, times) == pytest.approx(want + 0.3)
    with pytest.raises(SystemExit, match="no mlp layer"):
        pipeline_slice.project(preset("small", hybrid_override_pattern="ME*"), full, times)
