"""The pipeline runner (parallel/pipeline.py) and the streaming loader (parallel/loader.py) on virtual devices.

A random `small` checkpoint (4 shards, with an MTP head) and its `quantize --recipe ultra` copy are placed on
VirtualDevices whose budgets force 3-4 stages. The placed model must equal the single-device load() bit for
bit (float32 and float64; forward, prefill + cached decode, MTP speculative decoding), keep every weight and
cache array on its planned device, move only the hidden state across stage boundaries, stay within its
budgets with exactly the planned weight bytes per device, refuse a misplaced weight naming both devices, and
load through host staging bounded by the chunk size.
"""

import numpy as np
import pytest

import nemo_scratch
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import CheckpointError, DeviceError
from nemo_scratch.model.cache import KVCache, MambaState
from nemo_scratch.model.weights import map_tree
from nemo_scratch.ops.formats import arrays_of
from nemo_scratch.parallel import VirtualDevices, plan_placement
from nemo_scratch.parallel.loader import load_placed
from nemo_scratch.parallel.pipeline import unit_params

MIB = 2**20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cfg = preset("small", num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", max_position_embeddings=64)
    make_random_checkpoint(root / "bf16", cfg, seed=5, shards=4)
    quantize_checkpoint(root / "bf16", root / "ultra", "ultra")
    return {"bf16": root / "bf16", "ultra": root / "ultra"}


class Recorder:
    def __init__(self):
        self.n, self.closed = 0, False

    def update(self, nbytes):
        self.n += nbytes

    def close(self):
        self.closed = True


def placed(path, weights="stored", dtype="float32", gpus=4, chunk_bytes=4 * MIB, progress=None):
    """A plan whose per-device budget is 2% above what the best 4-device split needs (so no fewer stages fit
    the whole model), and the model it loads."""
    options = dict(max_len=64, prefill_chunk=32, weights=weights, margin_bytes=0, draft_depth=2, dtype=dtype,
                   cache_dtype=dtype)
    roomy = plan_placement(path, gpus=gpus, gpu_mem_gib=64, **options)
    budget_gib = 1.02 * max(s.total_bytes for s in roomy.stages) / 2**30
    plan = plan_placement(path, gpus=gpus, gpu_mem_gib=budget_gib, **options)
    devices = VirtualDevices(gpus, plan.budget_bytes)
    model = load_placed(path, plan, devices, dtype=dtype, chunk_bytes=chunk_bytes, progress=progress or Recorder())
    return plan, devices, model


@pytest.mark.parametrize("recipe", ["bf16", "ultra"])
@pytest.mark.parametrize("weights, dtype", [("stored", "float32"), ("float32", "float32"), ("stored", "float64")])
def test_placed_equals_one_device_bit_for_bit(checkpoints, recipe, weights, dtype):
    plan, devices, model = placed(checkpoints[recipe], weights, dtype)
    used = [s for s in plan.stages if s.units]
    assert 3 <= len(used) <= 4, [s.units for s in plan.stages]
    host = nemo_scratch.load(checkpoints[recipe], weights=weights, dtype=dtype)
    ids = np.random.default_rng(1).integers(0, host.cfg.vocab_size, size=(1, 19))
    want = host.forward(ids)
    got = model.forward(ids)
    assert got.dtype == want.dtype == np.dtype(dtype) and np.array_equal(got, want)
    # prefill + 8 cached decode steps, the cache on the devices
    cache, host_cache = model.new_cache(), host.new_cache()
    assert np.array_equal(model.forward(ids, cache), host.forward(ids, host_cache))
    for tok in np.random.default_rng(2).integers(0, host.cfg.vocab_size, size=8):
        assert np.array_equal(model.forward([[tok]], cache), host.forward([[tok]], host_cache))
    if weights == "stored" and dtype == "float32":
        prompt = list(ids[0, :7])
        plain = host.generate(prompt, 10).ids
        np.testing.assert_array_equal(model.generate(prompt, 10, mtp=True, draft_depth=2).ids, plain)
        np.testing.assert_array_equal(model.generate(prompt, 10, prefill_chunk=3).ids, plain)


def test_every_array_sits_on_its_planned_device_and_bytes_match_the_plan(checkpoints):
    recorder = Recorder()
    plan, devices, model = placed(checkpoints["ultra"], progress=recorder)
    for unit in plan.units:
        k = plan.device_of(unit.name)
        leaves = []
        map_tree(unit_params(model.params, unit.name), lambda a: leaves.extend(arrays_of(a)))
        assert leaves and all(devices.device_of(a) == k for a in leaves), unit.name
    planned = {s.device: sum(u.weight_bytes for u in s.units) for s in plan.stages}
    for k in range(devices.n):
        assert devices.used(k) == planned[k], k                 # exactly the weights, nothing staged
        assert devices.peak(k) <= plan.budget_bytes
    assert recorder.n == plan.weight_bytes and recorder.closed   # the progress total is the planned bytes
    cache = model.new_cache()
    for i, state in enumerate(cache.layers):
        arrays = [] if state is None else [state.conv, state.ssm] if isinstance(state, MambaState) else [state.k, state.v]
        assert all(devices.device_of(a) == plan.device_of(f"layer {i}") for a in arrays)
        if isinstance(state, KVCache):
            assert state.capacity == plan.run.max_len            # preallocated as planned
    model.forward([[1, 2, 3, 4]], cache)
    for k in range(devices.n):
        assert devices.peak(k) <= plan.budget_bytes


def test_only_the_hidden_state_crosses_a_stage_boundary(checkpoints):
    plan, devices, model = placed(checkpoints["bf16"])
    boundaries = sum(1 for a, b in zip(plan.units, plan.units[1:])
                     if plan.device_of(a.name) != plan.device_of(b.name) and b.name != "mtp")
    devices.transfers.clear()
    model.forward([[5, 6, 7, 8, 9]])
    d2d = {key: row["count"] for key, row in devices.transfers.items() if "host" not in key}
    assert sum(d2d.values()) == boundaries and boundaries >= 2
    # the host sends the ids once and gets the logits once
    assert devices.transfers[("host", plan.device_of("embedding"))]["count"] == 1
    assert devices.transfers[(plan.device_of("head"), "host")]["count"] == 1


def test_a_misplaced_weight_names_both_devices(checkpoints):
    plan, devices, model = placed(checkpoints["bf16"])
    i = next(i for i, bt in enumerate(model.cfg.layers_block_type) if bt == "mamba")
    home = plan.device_of(f"layer {i}")
    other = (home + 1) % devices.n
    model.params["layers"][i]["in_proj"] = devices.to(other, model.params["layers"][i]["in_proj"])
    with pytest.raises(DeviceError, match=rf"device {min(home, other)}.*device {max(home, other)}"):
        model.forward([[1, 2, 3]])


def test_streaming_keeps_host_staging_within_two_chunks(checkpoints):
    chunk = 1 * MIB
    plan, devices, model = placed(checkpoints["bf16"], weights="float32", chunk_bytes=chunk)
    stats = model.info["loader"]
    assert plan.weight_bytes > 20 * chunk                         # a checkpoint much larger than the chunk
    assert 0 < stats["host_peak_bytes"] <= 2 * chunk
    assert sum(stats["placed_bytes"].values()) == plan.weight_bytes


def test_a_corrupt_shard_is_the_one_line_error_of_a_plain_load(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["bf16"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError) as plain:
        nemo_scratch.load(bad)
    plan = plan_placement(checkpoints["bf16"], gpus=2, gpu_mem_gib=1, max_len=64, margin_bytes=0)
    with pytest.raises(CheckpointError) as streamed:
        load_placed(bad, plan, VirtualDevices(2, plan.budget_bytes), progress=Recorder())
    assert str(streamed.value) == str(plain.value) and shard.name in str(streamed.value)
