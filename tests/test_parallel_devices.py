"""Devices for the pipeline runner (nemo_scratch/parallel/devices.py, cupy_devices.py): budgets, the ledger,
peaks and frees, results that stay on their device, cross-device refusal, counted transfers, packed weights,
and a whole random tiny model run on one virtual device, bit for bit. CupyDevices runs on the CUDA emulator
with three devices (tests/cuda_emu)."""

import contextlib
import gc
import sys
import types

import cuda_emu
import numpy as np
import pytest
from test_parallel_plan import checkpoints  # noqa: F401  (fixture: random tiny checkpoint, BF16 and "ultra")
from tolerances import assert_close

import nemo_scratch
from nemo_scratch.config import preset
from nemo_scratch.errors import BackendError, DeviceError, DeviceMemoryError, InputError
from nemo_scratch.model.cache import new_layer_state
from nemo_scratch.ops.formats import arrays_of
from nemo_scratch.model.model import Model
from nemo_scratch.model.weights import map_tree
from nemo_scratch.ops import norm, quant
from nemo_scratch.parallel import CupyDevices, DeviceArray, VirtualDevices
from nemo_scratch.parallel.devices import LedgerEntry

F32 = np.float32


def on(devices, k, *arrays):
    return [devices.to(k, np.asarray(a)) for a in arrays]


def test_budget_ledger_peak_and_free_on_garbage_collection():
    d = VirtualDevices(2, [1000, 4000])
    a = d.to(0, np.zeros(100, F32), name="a")
    assert (d.used(0), d.used(1)) == (400, 0) and d.ledger(0) == [LedgerEntry("a", 400)]
    b = a + F32(1)                                            # an op's result: charged to device 0
    assert isinstance(b, DeviceArray) and b.device == 0 and d.used(0) == 800
    assert [e.name for e in d.ledger(0)] == ["a", "numpy.add"]
    view = a[10:20]                                           # a view: no new memory
    assert d.used(0) == 800 and d.device_of(view) == 0
    del b
    gc.collect()
    assert d.used(0) == 400 and d.peak(0) == 800 and d.ledger(0) == [LedgerEntry("a", 400)]
    with pytest.raises(DeviceMemoryError, match="device 0: big requests 800 bytes with 400 in use of its 1,000"):
        d.to(0, np.zeros(200, F32), name="big")
    assert d.used(0) == 400                                   # the refused copy left nothing charged
    d.to(1, np.zeros(200, F32))                               # device 1 has its own budget
    d.reset_peak()
    assert d.peak(0) == 400 and d.used(1) == 0                # the unnamed copy above was freed at once


def test_results_stay_on_their_device():
    d = VirtualDevices(2)
    rng = np.random.default_rng(0)
    xh, yh = rng.standard_normal((3, 4), dtype=F32), rng.standard_normal((3, 4), dtype=F32)
    idxh = np.array([[0, 3], [1, 1], [2, 0]])
    x, y, idx = on(d, 1, xh, yh, idxh)
    before = d.used(1)
    cases = {
        "add": (lambda a, b, i: a + b), "matmul": (lambda a, b, i: a @ b.T), "exp": (lambda a, b, i: np.exp(a)),
        "sum": (lambda a, b, i: a.sum(axis=0)), "max": (lambda a, b, i: a.max()),
        "mean": (lambda a, b, i: np.mean(a, axis=-1, keepdims=True)),
        "concatenate": (lambda a, b, i: np.concatenate([a, b], axis=1)), "stack": (lambda a, b, i: np.stack([a, b])),
        "einsum": (lambda a, b, i: np.einsum("ij,kj->ik", a, b)),
        "take_along_axis": (lambda a, b, i: np.take_along_axis(a, i, axis=1)),
        "where": (lambda a, b, i: np.where(a > 0, a, F32(0))), "astype": (lambda a, b, i: a.astype(np.float64)),
        "fancy index": (lambda a, b, i: a[[0, 2]]), "argsort": (lambda a, b, i: np.argsort(a, axis=-1)),
        "nonzero": (lambda a, b, i: np.nonzero(a > 0)[1]), "unique": (lambda a, b, i: np.unique(i)),
    }
    for name, fn in cases.items():
        got, want = fn(x, y, idx), fn(xh, yh, idxh)
        assert isinstance(got, DeviceArray) and got.device == 1, name
        assert got.shape == np.shape(want) and got.dtype == np.asarray(want).dtype, name
        assert np.array_equal(d.to_host(got), want), name
        assert d.used(1) == before + got.nbytes or got.base is not None, name   # charged (views are not)
        del got
    x += y                                                    # in place: no new memory
    assert d.used(1) == before and np.array_equal(d.to_host(x), xh + yh)


def test_two_devices_in_one_op_fail_naming_both():
    d = VirtualDevices(2)
    x0, = on(d, 0, np.ones((2, 3), F32))
    x1, i1 = on(d, 1, np.ones((2, 3), F32), np.array([0, 1]))
    attempts = [lambda: x0 + x1, lambda: np.concatenate([x0, x1]), lambda: np.matmul(x0, x1.T),
                lambda: x0[i1], lambda: x0.__setitem__(0, x1[0]), lambda: np.add(x0, x0, out=x1),
                lambda: np.asarray(x1) + x0]                   # a host view of device memory stays on its device
    for attempt in attempts:
        with pytest.raises(DeviceError, match="device 0.*device 1|device 1.*device 0"):
            attempt()
    other = VirtualDevices(1)
    with pytest.raises(DeviceError, match="another device set"):
        x0 + other.to(0, np.ones((2, 3), F32))
    with pytest.raises(DeviceError, match="belongs to no device"):
        np.ones(2).view(DeviceArray) + 1


def test_host_operands_policy():
    d = VirtualDevices(1)
    x, = on(d, 0, np.ones(3, F32))
    host = np.arange(3, dtype=F32)
    assert (x + F32(2)).device == 0 and (x * np.asarray(F32(2))).device == 0
    y = x + host                                               # the reference's host constants mix in
    assert isinstance(y, DeviceArray) and y.device == 0
    strict = VirtualDevices(1, strict_host=True)
    xs, = on(strict, 0, np.ones(3, F32))
    assert (xs * F32(3)).device == 0 and (xs + np.asarray(F32(1))).device == 0
    with pytest.raises(DeviceError, match="host array float32 \\[3\\]"):
        xs + host
    with pytest.raises(DeviceError, match="out= is on the host"):
        np.add(xs, F32(1), out=np.empty(3, F32))


def test_transfers_are_counted_per_source_and_destination():
    d = VirtualDevices(3)
    h = np.arange(24, dtype=F32).reshape(4, 6)
    x0 = d.to(0, h)
    assert d.transfers == {("host", 0): {"count": 1, "bytes": 96}}
    assert d.to(0, x0) is x0 and d.transfer_count() == 1      # already there: no copy
    x2 = d.to(2, x0[:, ::2])                                  # a strided view: copied contiguous
    assert x2.device == 2 and x2.flags.c_contiguous and np.array_equal(d.to_host(x2), h[:, ::2])
    assert d.transfers[(0, 2)] == {"count": 1, "bytes": 48} and d.transfers[(2, "host")]["count"] == 1
    assert d.to_host(h) is not None and d.transfer_count() == 3   # host data is not a transfer
    with d.use(1):
        z = d.xp.asarray(x2)                                  # xp.asarray of another device's array: a move
    assert z.device == 1 and d.transfers[(2, 1)]["count"] == 1


def test_to_moves_packed_weights_field_by_field():
    d = VirtualDevices(2)
    w = np.random.default_rng(1).standard_normal((16, 64)).astype(F32)
    packed, fp8 = quant.nvfp4_quantize(w), quant.fp8_quantize(w)
    on0 = d.to(0, packed)
    assert isinstance(on0, quant.NVFP4Weight) and d.device_of(on0) == 0 and on0.input_scale is None
    assert all(isinstance(getattr(on0, f), DeviceArray) for f in ("packed", "block_scale", "global_scale"))
    assert d.used(0) == packed.nbytes
    # the decode indexes host lookup tables with device codes, which NumPy gives no hook for (devices.py
    # Deviation): compare the values only
    got = quant.nvfp4_dequantize(on0.packed, on0.block_scale, on0.global_scale)
    want = quant.nvfp4_dequantize(packed.packed, packed.block_scale, packed.global_scale)
    assert np.array_equal(np.asarray(got), want) and (on0.packed & np.uint8(15)).device == 0
    on1 = d.to(1, d.to(0, fp8))
    assert isinstance(on1, quant.FP8Weight) and d.device_of(on1) == 1 and d.transfers[(0, 1)]["count"] == 2
    with pytest.raises(DeviceError, match="several devices"):
        d.device_of(quant.FP8Weight(on1.data, d.to(0, fp8.scale)))


def test_use_allocates_caches_on_the_current_device():
    d, cfg = VirtualDevices(2), preset("tiny")
    with d.use(1):
        cache = new_layer_state("mamba", cfg, 2, F32, xp=d.xp)
        ramp = d.xp.arange(5)
        with d.use(0):
            assert d.xp.zeros(3).device == 0
    assert cache.conv.device == 1 and cache.ssm.device == 1 and ramp.device == 1
    assert cache.ssm.shape == (2, 4, 8, 8) and not cache.ssm.any()
    assert [e.name for e in d.ledger(1)] == ["zeros", "zeros", "arange"]
    assert d.namespace(0).ones((2, 2)).device == 0 and d.current is None
    with pytest.raises(DeviceError, match="no current device"):
        d.xp.zeros(3)


@pytest.mark.parametrize("n, budget, match", [
    (0, None, "n must be a positive integer"), (True, None, "n must be"), (2, [1], "2 devices"),
    (1, -5, r"budget_bytes\[0\]"), (1, 1.5, r"budget_bytes\[0\]")])
def test_hostile_construction(n, budget, match):
    with pytest.raises(InputError, match=match):
        VirtualDevices(n, budget)


def test_hostile_device_indices():
    d = VirtualDevices(2)
    for k in (2, -1, True, "0", 1.0):
        with pytest.raises(DeviceError, match="does not exist"):
            d.to(k, np.ones(2))
    with pytest.raises(DeviceError, match="does not exist"):
        d.used(5)


# ---------------------------------------------------------------------------------------------- a whole model

def _leaves(tree):
    out = []
    map_tree(tree, lambda a: out.extend(arrays_of(a)))
    return out


@pytest.mark.parametrize("recipe", ["bf16", "ultra"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_tiny_model_on_one_virtual_device_is_bit_identical(checkpoints, recipe, dtype):
    host = nemo_scratch.load(checkpoints[recipe], dtype=dtype)
    leaves = _leaves(host.params)
    weight_bytes = sum(int(np.asarray(a).nbytes) for a in leaves)
    budget = weight_bytes + 4 * 2**20
    d = VirtualDevices(1, budget)
    params = map_tree(host.params, lambda a: d.to(0, a))
    assert d.used(0) == weight_bytes and d.transfers[("host", 0)]["count"] == len(leaves)
    assert all(isinstance(a, DeviceArray) and a.device == 0 for a in _leaves(params))
    model = Model(host.cfg, params, backend=d.backend(0), info=host.info)
    assert d.transfer_count() == len(leaves)                  # the Model kept the placed arrays as they are
    ids = [[5, 17, 3, 250, 9, 1, 77, 42, 8, 8, 31]]
    want, got = host.forward(ids), model.forward(ids)
    assert got.shape == want.shape == (1, 11, 256) and got.dtype == want.dtype == np.dtype(dtype)
    assert type(got) is np.ndarray and np.array_equal(got, want)
    assert d.transfers[("host", 0)]["count"] == len(leaves) + 1 and d.transfers[(0, "host")]["count"] == 1
    cache, host_cache = model.new_cache(), host.new_cache()
    steps = [np.array_equal(model.forward(ids, cache), host.forward(ids, host_cache))]
    for tok in (4, 99, 200):
        steps.append(np.array_equal(model.forward([[tok]], cache), host.forward([[tok]], host_cache)))
    assert all(steps) and cache.layers[0].ssm.device == 0 and cache.layers[1].k.device == 0
    spec = model.generate([3, 1, 4, 1, 5], 6, mtp=True, draft_depth=2)
    assert np.array_equal(spec.ids, host.generate([3, 1, 4, 1, 5], 6).ids)
    assert d.peak(0) <= budget


# ---------------------------------------------------------------------------------------------- CupyDevices

@pytest.fixture
def emulated():
    """CupyDevices over three emulated CUDA devices."""
    with cuda_emu.installed(devices=3) as cp:
        yield CupyDevices(), cp


def test_cupy_devices_on_three_emulated_devices(emulated):
    cd, cp = emulated
    assert cd.n == 3 and cd.xp is cp
    h = np.arange(24, dtype=F32).reshape(4, 6)
    x0 = cd.to(0, h)
    x2 = cd.to(2, x0[:, 1:])                                  # made contiguous on device 0, then copied
    assert cd.device_of(x0) == 0 and cd.device_of(x2) == 2 and cd.device_of(h) is None
    assert np.array_equal(cd.to_host(x2), h[:, 1:]) and cd.to(2, x2) is x2
    assert cd.transfers == {("host", 0): {"count": 1, "bytes": 96}, (0, 2): {"count": 1, "bytes": 80},
                            (2, "host"): {"count": 1, "bytes": 80}}
    assert cp.emulator_runtime.copies == {(0, 2): {"count": 1, "bytes": 80}}   # the only device-to-device copy
    assert (cd.used(0), cd.used(1), cd.used(2)) == (96, 0, 80)
    with cd.use(1):
        assert cp.cuda.Device().id == 1
        z = cd.xp.zeros((2, 2), dtype=F32)
    assert z.device.id == 1 and cd.used(1) == 16
    del x2, z
    gc.collect()
    assert cd.used(2) == 0 and cd.peak(2) == 80 and cd.used(1) == 0
    with cd.use(0), pytest.raises(cuda_emu.EmulatorError, match="device 0 and device 2"):
        x0[:, 1:] + cd.to(2, h)[:, 1:]
    packed = cd.to(1, quant.nvfp4_quantize(h.repeat(8, axis=1)))
    assert cd.device_of(packed) == 1 and packed.global_scale.device.id == 1


def test_cupy_devices_pool_limits_and_missing_devices():
    with cuda_emu.installed(devices=3):
        cd = CupyDevices(3, limit_bytes=[None, 1024, None])
        assert cd.limit(1) == 1024 and cd.limit(0) is None
        cd.to(1, np.zeros(200, F32))
        with pytest.raises(DeviceMemoryError, match="device 1: to requests 1,200 bytes .* 1,024-byte pool limit"):
            cd.to(1, np.zeros(300, F32))
        cd.to(0, np.zeros(300, F32))                           # device 0 has no limit
        with pytest.raises(BackendError, match="4 devices asked for, but CUDA reports 3"):
            CupyDevices(4)
        with pytest.raises(DeviceError, match="does not exist"):
            cd.to(3, np.zeros(1))


def test_cupy_devices_without_cupy_or_without_a_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)                 # import cupy raises ImportError
    with pytest.raises(BackendError, match="needs cupy"):
        CupyDevices()

    def no_driver():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    broken = types.ModuleType("cupy")
    broken.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver))
    monkeypatch.setitem(sys.modules, "cupy", broken)
    with pytest.raises(BackendError, match="no CUDA device is available .*cudaErrorNoDevice"):
        CupyDevices()


def test_cupy_devices_context_hooks():
    entered = []

    @contextlib.contextmanager
    def record(k):
        entered.append(k)
        yield

    with cuda_emu.installed(devices=2):
        cd = CupyDevices(contexts=[record], numba=True)   # numba: the simulator's one device, gpus[0]
        with cd.use(0):
            from numba import cuda

            assert cuda.get_current_device() is not None
        assert entered == [0]


@pytest.mark.cuda_emu
def test_a_misplaced_array_is_refused_naming_both_devices():
    """The cupy backend's rms_norm on arrays placed on device 1. Under use(1) it equals the reference and no
    copy happens beyond CupyDevices' own. Under use(0) the launcher refuses the operands, naming both devices,
    rather than copying them behind the caller's back (a weight placed on the wrong device is a bug to see, not
    a hidden hop); a raw kernel given device 1's pointers under device 0 is refused by the emulator too."""
    from nemo_scratch.backends.cupy.loader import get_kernel, i32, i64

    x = np.random.default_rng(2).standard_normal((3, 40)).astype(F32)
    w = (1 + 0.1 * np.random.default_rng(3).standard_normal(40)).astype(F32)
    with cuda_emu.installed(devices=2) as cp:
        be, cd = nemo_scratch.backends.get_backend("cupy"), CupyDevices()
        xd, wd = cd.to(1, x), cd.to(1, w)
        with cd.use(1):
            y = cd.to_host(be.rms_norm(xd, wd, 1e-5))
        assert cp.emulator_runtime.copies == {}
        with cd.use(0):
            with pytest.raises(DeviceError, match="on device 1 but the kernel launches on device 0"):
                be.rms_norm(xd, wd, 1e-5)
            out = cp.empty(x.shape, dtype=F32)
            with pytest.raises(cuda_emu.EmulatorError, match="on device 1 but the launch is on device 0"):
                get_kernel("norm.cu", "rms_norm_v1_block_per_group")((3,), (64,), (xd, wd, out, i64(3), i32(40), F32(1e-5)))
        assert cp.emulator_runtime.copies == {} and (1, 0) not in cd.transfers
    assert_close(y, norm.rms_norm(x, w, 1e-5), "kernel_rms_norm", what="rms_norm on emulated device 1")
