"""The pipeline runner with the CuPy backend on 3 emulated CUDA devices (tests/cuda_emu, CPU, CI).

A random tiny checkpoint (BF16, and its `quantize --recipe ultra` copy) is planned over 3 devices, streamed
onto them by parallel/loader.py with ``CupyDevices`` and run by the cupy backend's CUDA C kernels, each layer
launching on its own device. Its logits equal the NumPy reference within the `kernel_model` tolerance
(prefill and cached decode), every weight sits on its planned device, and a weight placed on the wrong
device makes the launch fail naming both devices (the classic multi-GPU bug) instead of a silent copy.
"""

import cuda_emu
import gpu_harness
import numpy as np
import pytest
from tolerances import assert_close

import nemo_scratch
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import DeviceError
from nemo_scratch.model.weights import map_tree
from nemo_scratch.ops.formats import arrays_of
from nemo_scratch.parallel import plan_placement
from nemo_scratch.parallel.loader import load_placed
from nemo_scratch.parallel.pipeline import unit_params

pytestmark = pytest.mark.cuda_emu


class Quiet:
    n = 0

    def update(self, nbytes):
        self.n += nbytes

    def close(self):
        pass


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("emulated")
    make_random_checkpoint(root / "bf16", preset("tiny", max_position_embeddings=32), seed=9)
    quantize_checkpoint(root / "bf16", root / "ultra", "ultra")
    return root


@pytest.fixture(scope="module")
def emulator():
    if gpu_harness.cupy_available():
        pytest.skip("a CUDA GPU and cupy are present: the gpu-marked tests run the kernels on the device")
    cuda_emu.precompile_kernels()
    with cuda_emu.installed(devices=3):
        yield


def placed(path):
    from nemo_scratch.parallel import CupyDevices

    options = dict(max_len=32, prefill_chunk=16, weights="float32", margin_bytes=0)
    roomy = plan_placement(path, gpus=3, gpu_mem_gib=1, **options)
    plan = plan_placement(path, gpus=3, gpu_mem_gib=1.02 * max(s.total_bytes for s in roomy.stages) / 2**30,
                          **options)
    return plan, load_placed(path, plan, CupyDevices(3), backend="cupy", progress=Quiet())


@pytest.mark.parametrize("recipe", ["bf16", "ultra"])
def test_cupy_pipeline_on_three_devices_matches_numpy(emulator, checkpoints, recipe):
    plan, model = placed(checkpoints / recipe)
    assert len([s for s in plan.stages if s.units]) == 3
    host = nemo_scratch.load(checkpoints / recipe, weights="float32")
    for unit in plan.units:
        leaves = []
        map_tree(unit_params(model.params, unit.name), lambda a: leaves.extend(arrays_of(a)))
        assert all(int(a.device.id) == plan.device_of(unit.name) for a in leaves), unit.name
    ids = [[3, 141, 59, 26, 53, 58, 97, 93]]
    cache, host_cache = model.new_cache(), host.new_cache()
    assert_close(model.forward(ids, cache), host.forward(ids, host_cache), "kernel_model", what="prefill")
    assert_close(model.forward([[23]], cache), host.forward([[23]], host_cache), "kernel_model", what="decode")
    hops = sum(1 for a, b in zip(plan.units, plan.units[1:]) if plan.device_of(a.name) != plan.device_of(b.name)
               and b.name != "mtp")
    import cupy

    assert sum(n["count"] for (src, dst), n in cupy.emulator_runtime.copies.items() if src != dst) >= hops


def test_a_misplaced_weight_fails_the_launch_naming_both_devices(emulator, checkpoints):
    plan, model = placed(checkpoints / "bf16")
    i = next(i for i, bt in enumerate(model.cfg.layers_block_type) if bt == "attention")
    home = plan.device_of(f"layer {i}")
    other = (home + 1) % 3
    # the block's norm weight: read by the rms_norm kernel of its layer's device
    model.params["layers"][i]["norm"] = model.devices.to(other, model.params["layers"][i]["norm"])
    with pytest.raises(DeviceError, match=rf"on device {other} but the kernel launches on device {home}"):
        model.forward([[1, 2, 3]])


def test_kernels_refuse_an_operand_from_another_device(emulator):
    import cupy

    be = nemo_scratch.backends.get_backend("cupy")
    with cupy.cuda.Device(1):
        x = cupy.asarray(np.ones((2, 8), np.float32))
    with cupy.cuda.Device(0):
        w = cupy.asarray(np.ones(8, np.float32))
        with pytest.raises(DeviceError, match="on device 1 but the kernel launches on device 0"):
            be.rms_norm(x, w, 1e-5)
