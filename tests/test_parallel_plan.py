"""The pipeline placement planner (nemo_scratch/parallel/plan.py): pure arithmetic, checked on the Ultra preset
against the project's byte accounting, on random tiny checkpoints against their safetensors files, and the
min-max partition against brute force."""

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_cli import assert_one_line_error, run

from nemo_scratch.checkpoint import make_random_checkpoint, open_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import ConfigError, InputError, PlanError
from nemo_scratch.parallel import Placement, format_placement, plan_placement
from nemo_scratch.parallel.memory import (SCORE_TILE_BYTES, RunShape, activation_bytes, attention_tile, decode_tile_bytes,
                                          unit_reserves)
from nemo_scratch.parallel.plan import min_max_partition, pp_indices, stage_cost
from nemo_scratch.params import GB, GIB, count_bytes

ULTRA_BYTES = 351_881_457_152          # count_bytes(preset("ultra"), "ultra")["total"]
NO_RESERVE = dict(max_len=1, prefill_chunk=1, margin_bytes=0)   # (almost) weights only


@pytest.fixture(scope="module")
def ultra():
    return plan_placement("ultra", "ultra", gpus=8, gpu_mem_gib=80)


def test_stages_cover_every_unit_once_in_execution_order(ultra):
    assert isinstance(ultra, Placement) and len(ultra.stages) == 8
    assert [s.device for s in ultra.stages] == list(range(8))
    names = [u.name for s in ultra.stages for u in s.units]
    assert names == ["embedding"] + [f"layer {i}" for i in range(108)] + ["head", "mtp"]
    assert names == [u.name for u in ultra.units]
    assert all(s.units for s in ultra.stages) and ultra.device_of("mtp") == 7 and ultra.device_of("embedding") == 0
    with pytest.raises(InputError, match="no unit 'layer 108'"):
        ultra.device_of("layer 108")


def test_weight_bytes_equal_count_bytes_exactly(ultra):
    total = count_bytes(preset("ultra"), "ultra")["total"]
    assert total == ULTRA_BYTES and f"{total / GB:.2f}" == "351.88"
    assert ultra.weight_bytes == total == sum(s.weight_bytes for s in ultra.stages)
    assert all(isinstance(u.weight_bytes, int) for u in ultra.units)
    kinds = {u.kind: u.weight_bytes for u in ultra.units}   # the per-unit figures of the design brief
    assert round(kinds["moe"] / GB, 2) == 6.28 and round(kinds["mamba"] / GB, 2) == 0.42
    assert round(kinds["attention"] / GB, 2) == 0.28 and round(kinds["mtp"] / GB, 2) == 22.43


def test_largest_stage_and_the_45_gib_weight_budget():
    balanced = plan_placement("ultra", "ultra", gpus=8, gpu_mem_gib=80, **NO_RESERVE)
    assert max(s.weight_bytes for s in balanced.stages) <= 47.1 * GB
    tight = plan_placement("ultra", "ultra", gpus=8, gpu_mem_gib=45, **NO_RESERVE)   # fits: no PlanError
    assert all(s.fits and s.weight_bytes <= 45 * GIB for s in tight.stages)
    last = tight.equal_count[-1]
    assert not tight.equal_count_fits and not last.fits and [u.name for u in last.units][-2:] == ["head", "mtp"]
    assert 65.0 * GB < last.weight_bytes < 65.2 * GB                     # vLLM's split: 65 GB on the last GPU
    assert [len([u for u in s.units if u.name.startswith("layer")]) for s in tight.equal_count] == \
        [13, 13, 13, 14, 14, 14, 14, 13]
    assert "does NOT fit" in format_placement(tight)


def test_a_million_token_reserve_fits_80_gib():
    p = plan_placement("ultra", "ultra", gpus=8, gpu_mem_gib=80, max_len=2**20)
    assert all(s.total_bytes <= 80 * GIB and s.free_bytes >= 0 for s in p.stages)
    # K and V, float32, 2 kv heads x 128, 2^20 tokens: 2 GiB per attention layer (12 backbone + 1 MTP)
    assert sum(s.kv_bytes for s in p.stages) == 13 * 2 * 2**20 * 2 * 128 * 4 == 26 * GIB
    attention = [u for u in p.units if u.kind == "attention"]
    assert len(attention) == 12 and all(u.kv_bytes == 2 * GIB for u in attention)
    mamba = [u for u in p.units if u.kind == "mamba"]
    one_state = (18432 * 4 + 256 * 64 * 128) * 4   # conv [c, w] + SSM [h, p, n], float32
    assert len(mamba) == 48 and all(u.state_bytes == one_state for u in mamba)
    assert all(s.margin_bytes == 2 * GIB for s in p.stages)
    text = format_placement(p)
    for column in ("weights", "KV", "SSM/conv", "activ.", "margin", "total", "free", "equal layer counts"):
        assert column in text
    assert json.loads(json.dumps(p.to_dict()))["stages"][7]["units"][-1] == "mtp"


def test_an_impossible_plan_is_one_line_naming_unit_bytes_budget():
    with pytest.raises(PlanError) as err:
        plan_placement("ultra", "ultra", gpus=8, gpu_mem_gib=40)
    message = str(err.value)
    assert "\n" not in message and "layer " in message and "40.00 GiB" in message and "GiB (weights" in message
    assert "more GPUs" in message and "--max-len" in message
    with pytest.raises(PlanError, match=r"mtp \(mtp\) needs .* more than a whole 20.00 GiB device on its own"):
        plan_placement("ultra", "ultra", gpus=32, gpu_mem_gib=20, **NO_RESERVE)


def test_cli_prints_both_tables_and_fails_in_one_line():
    text = run("plan", "--preset", "ultra", "--recipe", "ultra", "--gpus", 8, "--gpu-mem-gib", 80, "--max-len",
               2**20).stdout
    assert "351.88 GB" in text and "pipeline placement of ultra" in text and "equal layer counts" in text
    report = json.loads(run("plan", "--preset", "ultra", "--recipe", "ultra", "--json").stdout)
    assert report["gpus"]["fits"] is True and len(report["placement"]["stages"]) == 8
    assert report["placement"]["weight_bytes"] == ULTRA_BYTES
    proc = run("plan", "--preset", "ultra", "--recipe", "ultra", "--gpus", 8, "--gpu-mem-gib", 40, ok=False)
    assert_one_line_error(proc, "plan: layer ", "does not fit", "40.00 GiB", "GiB (weights")
    assert_one_line_error(run("plan", ok=False), "exactly one of --preset")
    assert_one_line_error(run("plan", "--preset", "tiny", "--max-len", 0, ok=False), "max_len (--max-len)")
    assert_one_line_error(run("plan", "--preset", "tiny", "--margin-gib", "nan", ok=False), "--margin-gib")
    tiny = json.loads(run("plan", "--preset", "tiny", "--gpus", 2, "--gpu-mem-gib", 0.1, "--margin-gib", 0,
                          "--json").stdout)["placement"]
    assert tiny["margin_bytes"] == 0 and tiny["stages"][0]["units"][0] == "embedding"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random tiny checkpoint (2 shards) and its `quantize --recipe ultra` copy."""
    root = tmp_path_factory.mktemp("plan")
    src = make_random_checkpoint(root / "bf16", preset("tiny"), shards=2)
    quantize_checkpoint(src, root / "ultra", "ultra")
    return {"bf16": src, "ultra": root / "ultra"}


def _weights(p):
    return {u.name: u.weight_bytes for u in p.units}


@pytest.mark.parametrize("recipe", ["bf16", "ultra"])
@pytest.mark.parametrize("weights", ["stored", "float32"])
def test_checkpoint_headers_equal_the_recipe_accounting(checkpoints, recipe, weights):
    path, kw = checkpoints[recipe], dict(gpus=3, gpu_mem_gib=1, margin_bytes=0, weights=weights)
    from_headers = plan_placement(Path(path), **kw)
    # quantize writes no input_scale; NVIDIA's checkpoints (and count_bytes) carry one 4-byte scale per weight
    from_recipe = plan_placement("tiny", recipe, input_scales=False, **kw)
    from_config = plan_placement(Path(path) / "config.json", recipe, input_scales=False, **kw)
    assert from_headers.recipe is None and _weights(from_headers) == _weights(from_recipe) == _weights(from_config)
    assert [u.name for u in from_headers.units][-2:] == ["head", "mtp"]
    with_scales = plan_placement("tiny", recipe, **kw)
    quantized = sum(row["tensors"] for fmt, row in count_bytes(preset("tiny"), recipe)["by_format"].items()
                    if fmt in ("nvfp4", "fp8"))
    assert with_scales.weight_bytes - from_recipe.weight_bytes == 4 * quantized
    assert (quantized > 0) == (recipe == "ultra")
    if weights == "stored":   # the header sum is every data byte of the safetensors files
        reader = open_checkpoint(path)
        data = 0
        for name in reader.files:
            raw = (Path(path) / name).read_bytes()
            data += len(raw) - 8 - int.from_bytes(raw[:8], "little")
        assert from_headers.weight_bytes == data
        layer = next(u for u in from_headers.units if u.kind == "moe")
        assert any(t.endswith("weight_scale") for t in layer.tensors) == (recipe == "ultra")


def test_float32_mode_counts_bf16_twice():
    stored = plan_placement("ultra", "ultra", **NO_RESERVE)
    upcast = plan_placement("ultra", "ultra", weights="float32", **NO_RESERVE)
    bf16 = count_bytes(preset("ultra"), "ultra")["by_format"]["bf16"]["bytes"]
    assert upcast.weight_bytes == stored.weight_bytes + bf16              # every BF16 byte counted twice
    assert max(s.weight_bytes for s in upcast.stages) <= 49.2 * GB       # head + MTP, 45.8 GiB
    assert upcast.equal_count[-1].weight_bytes > 90 * GB and not upcast.equal_count_fits


def test_reserve_formulas():
    cfg = preset("ultra")
    run_ = RunShape(max_len=4096, batch=2, prefill_chunk=512, cache_dtype="bfloat16", draft_depth=2)
    kv, state, _ = unit_reserves(cfg, "attention", run_)
    assert kv == 2 * 2 * 4096 * 2 * 128 * 2 and state == 0
    _, state, _ = unit_reserves(cfg, "mamba", run_)
    assert state == 2 * (18432 * 4 + 256 * 64 * 128) * 4 * (1 + 3)      # + one copy per verified token
    mtp_kv, mtp_state, _ = unit_reserves(cfg, "mtp", run_)
    assert mtp_kv == kv and mtp_state == 0                                # "*E": one attention, no record
    assert activation_bytes(cfg, "head", run_) == ((2 * 512 * 8192 + 2 * 131072) * 4    # last-position logits
                                              + decode_tile_bytes(cfg, run_))      # + the LM head's decode tile
    tile = attention_tile(cfg, RunShape(2**20, 1, 8192, "float32", 0))
    assert tile == 1 and 64 * 2**20 * 4 > SCORE_TILE_BYTES        # at 1M keys one query row is the minimum tile
    assert attention_tile(cfg, RunShape(4096, 1, 8192, "float32", 0)) == SCORE_TILE_BYTES // (64 * 4096 * 4) == 64
    bigger = RunShape(4096, 2, 1024, "bfloat16", 2)
    assert all(activation_bytes(cfg, k, bigger) > activation_bytes(cfg, k, run_)
               for k in ("mamba", "attention", "moe", "mlp", "embedding", "head", "mtp"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(gpus=0), r"gpus \(--gpus\)"), (dict(gpus=True), r"gpus \(--gpus\)"),
    (dict(gpu_mem_gib=math.nan), "gpu_mem_gib"), (dict(gpu_mem_gib=math.inf), "gpu_mem_gib"),
    (dict(gpu_mem_gib=-1), "gpu_mem_gib"), (dict(gpu_mem_gib="80"), "gpu_mem_gib"),
    (dict(max_len=0), r"max_len \(--max-len\)"), (dict(batch=-1), r"batch \(--batch\)"),
    (dict(prefill_chunk=1.5), "prefill_chunk"), (dict(cache_dtype="fp16"), "cache_dtype"),
    (dict(weights="fp32"), r"weights \(--weights\)"), (dict(draft_depth=-1), "draft_depth"),
    (dict(recipe="mega"), "unknown recipe 'mega'"), (dict(margin_bytes=-1), "margin_bytes"),
])
def test_hostile_arguments_name_the_argument(kwargs, match):
    with pytest.raises(InputError, match=match):
        plan_placement("tiny", **kwargs)


def test_hostile_sources(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'giga'"):
        plan_placement("giga")
    with pytest.raises(InputError, match="source must be"):
        plan_placement(42)
    with pytest.raises(InputError, match="does not apply to a checkpoint"):
        plan_placement(Path(checkpoints["bf16"]), "ultra")
    with pytest.raises(ConfigError, match="not found"):
        plan_placement(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- partition

def _brute_force(resident, peak, parts, margin):
    """The smallest largest stage cost over every split into at most ``parts`` contiguous stages."""
    n, best = len(resident), None
    for cuts in range(min(parts, n)):
        for inner in itertools.combinations(range(1, n), cuts):
            bounds = (0, *inner, n)
            cost = max(stage_cost(resident, peak, i, j, margin) for i, j in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


units = st.lists(st.tuples(st.integers(0, 100), st.integers(0, 60)), min_size=1, max_size=8)


@given(units=units, parts=st.integers(1, 5), margin=st.integers(0, 20))
@example(units=[(5, 0), (5, 0), (5, 0), (1, 0)], parts=4, margin=0)
@example(units=[(1, 50), (1, 0), (1, 0), (1, 50)], parts=2, margin=3)
def test_min_max_partition_is_optimal_and_contiguous(units, parts, margin):
    resident, peak = [u[0] for u in units], [u[1] for u in units]
    ranges = min_max_partition(resident, peak, parts, margin)
    assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == len(units)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(i <= j for i, j in ranges)
    got = max(stage_cost(resident, peak, i, j, margin) for i, j in ranges)
    assert got == _brute_force(resident, peak, parts, margin)
    assert min_max_partition(resident, peak, parts, margin) == ranges    # deterministic


def test_pp_indices_is_vllms_split():
    assert [pp_indices(20, r, 4) for r in range(4)] == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert [b - a for a, b in (pp_indices(61, r, 4) for r in range(4))] == [15, 15, 16, 15]
    assert [b - a for a, b in (pp_indices(61, r, 2) for r in range(2))] == [31, 30]
    assert [b - a for a, b in (pp_indices(3, r, 5) for r in range(5))] == [0, 1, 1, 1, 0]
