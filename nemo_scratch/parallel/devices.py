"""Virtual devices: the device interface of device_set.py on NumPy, so the whole pipeline runs on a CPU.

    devices = VirtualDevices(3, budget_bytes=[2**30, 2**30, 2**29])
    h = devices.to(0, host_array, name="hidden")      # a DeviceArray on device 0, charged to its budget
    with devices.use(1):
        cache = new_layer_state("attention", cfg, 1, np.float32, xp=devices.xp)   # allocated on device 1
    model = Model(cfg, params_on_0, backend=devices.backend(0))                  # a model run on device 0

An array on device k is a ``DeviceArray``, an ndarray subclass tagged with k. Its memory is
charged to k when it is made (by ``to``, by ``xp.zeros``/``empty``/..., or as the result of an operation) and
released when NumPy frees it (a weakref finalizer on the buffer that owns it), so ``used``, ``peak`` and the
``ledger`` (what allocated how much) follow the real lifetime of every buffer; going over a device's budget
raises DeviceMemoryError. NumPy operations on device arrays (ufuncs and operators, matmul, reductions, the
array functions: concatenate, einsum, take_along_axis, where, stack, ...) give arrays on the operands' device.
Operands from two devices raise DeviceError naming both: a hop the runner did not plan never happens silently.

Host data, a choice: a device array's operands may include host scalars and host arrays of any size, because
the NumPy reference builds its constants on the host (``np.arange`` masks, ``np.zeros`` initial states and
accumulators, decode tables) and must run unchanged on one device; the result is on the device. What stays
strict: a host ndarray that is a view of device memory (``np.asarray(device_array)``) counts as on its
device wherever it meets a device array; ``out=`` may be on the operands' device or the host, never another
device; setting items from, or indexing with, another device's array raises.
``VirtualDevices(..., strict_host=True)`` refuses host arrays of one dimension or more (and a host ``out=``)
as CuPy does, host scalars and 0-d arrays still mixing in: for code that must run on CuPy as written.
Deviation from CuPy: ``np.ascontiguousarray``/``np.array`` of a device array, a host table indexed by device
codes, and operations whose operands are all plain ndarrays return host arrays (NumPy calls no hook for
them); ops/conv.py, ops/ssd.py and ops/quant.py do all three, so some of the reference's results are host
arrays, untracked, where CuPy's would stay on the device.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import DeviceError, DeviceMemoryError, InputError
from .device_set import HOST, DeviceSet

_OWNERS = {}   # id(owning buffer) -> (VirtualDevices, device): what memory belongs to which virtual device


@dataclass(frozen=True)
class LedgerEntry:
    name: str       # what made it: the ``to`` name, "numpy.matmul", "zeros", ...
    nbytes: int


def _owner(a):
    """The ndarray that owns a's memory (NumPy collapses view chains to it)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _items(obj):
    """Every leaf of nested lists/tuples/dicts (np.concatenate([a, b]), einsum operand lists, kwargs)."""
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _items(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _items(x)
    else:
        yield obj


def _plain(obj):
    """Device arrays -> plain ndarray views, through lists/tuples/dicts."""
    if isinstance(obj, DeviceArray):
        return obj.view(np.ndarray)
    if type(obj) in (list, tuple):
        return type(obj)(_plain(x) for x in obj)
    if type(obj) is dict:
        return {k: _plain(v) for k, v in obj.items()}
    return obj


class DeviceArray(np.ndarray):
    """A NumPy array on one virtual device (``.device``): operations on it stay on that device."""

    _devices = None   # the VirtualDevices it belongs to
    _device = None    # its device index

    @property
    def device(self) -> int:
        return self._device

    def __array_namespace__(self, api_version=None):
        """The array module ops use for this array (ops/common.py::get_xp): NumPy with allocations on its device."""
        return self._set.namespace(self._device)

    def __array_finalize__(self, obj):
        self._devices = getattr(obj, "_devices", None)
        self._device = getattr(obj, "_device", None)
        if self._devices is not None:   # a view (no new memory) or an ndarray method's result (astype, copy)
            self._devices._adopt(self, self._devices._naming)

    @property
    def _set(self):
        if self._devices is None:
            raise DeviceError("a DeviceArray made with .view(DeviceArray) belongs to no device; place arrays with "
                              "devices.to(k, x)")
        return self._devices

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        what = f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        devices, k = self._set, self._set._operand_device(what, inputs, out)
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return devices._wrap(result, k, what)

    def __array_function__(self, func, types, args, kwargs):
        what = f"numpy.{func.__name__}"
        devices, k = self._set, self._set._operand_device(what, (args, kwargs), kwargs.get("out"))
        return devices._wrap(func(*_plain(args), **_plain(kwargs)), k, what)

    def __getitem__(self, key):
        self._set._operand_device("indexing", (self, key), None)
        with self._devices._named("indexing"):
            return super().__getitem__(key)

    def __setitem__(self, key, value):
        self._set._operand_device("item assignment", (self, key, value), None)
        super().__setitem__(_plain(key), _plain(value))


class VirtualDevices(DeviceSet):
    """``n`` NumPy-backed devices with a byte budget each (an int for all, or one per device; None: no limit)."""

    def __init__(self, n, budget_bytes=None, strict_host=False):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"VirtualDevices: n must be a positive integer, got {n!r}")
        budgets = list(budget_bytes) if isinstance(budget_bytes, (list, tuple)) else [budget_bytes] * n
        if len(budgets) != n:
            raise InputError(f"VirtualDevices: budget_bytes has {len(budgets)} entries for n={n} devices")
        for k, b in enumerate(budgets):
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0):
                raise InputError(f"VirtualDevices: budget_bytes[{k}] must be an integer >= 0 or None, got {b!r}")
        self.n = n
        self.budgets = [None if b is None else int(b) for b in budgets]
        self.strict_host = bool(strict_host)
        self.transfers = {}
        self.constants = 0   # host constants an op made on a device through its namespace (see _Namespace.asarray)
        self.xp = _Namespace(self)
        self._used, self._peak = [0] * n, [0] * n
        self._live = [{} for _ in range(n)]    # per device: {id(owner): LedgerEntry}, in allocation order
        self._current = []
        self._naming = "ndarray method"

    def __repr__(self):
        return f"VirtualDevices({self.n}, budgets={self.budgets})"

    # ------------------------------------------------------------------ the interface
    @contextlib.contextmanager
    def use(self, k):
        """Make device k current for ``self.xp`` allocations inside the block (nests)."""
        self._current.append(self.check(k))
        try:
            yield k
        finally:
            self._current.pop()

    @property
    def current(self):
        return self._current[-1] if self._current else None

    def _array_device(self, x):
        if isinstance(x, DeviceArray) and x._devices is self:
            return x._device
        if isinstance(x, DeviceArray):
            raise DeviceError(f"the array belongs to another device set ({x._devices!r})")
        if isinstance(x, np.ndarray):   # a host view of device memory is on its device
            hit = _OWNERS.get(id(_owner(x)))
            if hit is not None and hit[0] is self:
                return hit[1]
        return None

    def _here(self, k, x, name):
        return x if isinstance(x, DeviceArray) else self._tag(x, k, name or "to")

    def _copy(self, k, x, src, name):
        data = np.array(_plain(x), copy=True, order="C")
        return self._wrap(data, k, name or f"to({src if src is not None else HOST}->{k})")

    def _copy_to_host(self, x, src):
        return np.array(_plain(x), copy=True)

    def used(self, k) -> int:
        return self._used[self.check(k)]

    def peak(self, k) -> int:
        return self._peak[self.check(k)]

    def reset_peak(self, k=None):
        for d in range(self.n) if k is None else [self.check(k)]:
            self._peak[d] = self._used[d]

    def ledger(self, k) -> list:
        """The live allocations of device k: [LedgerEntry(name, nbytes)], oldest first."""
        return list(self._live[self.check(k)].values())

    def namespace(self, k):
        """NumPy with its creation functions allocating on device k whatever device is current."""
        return _Namespace(self, self.check(k))

    def backend(self, k):
        """The NumPy reference backend on device k: ``asarray`` moves host data to k (counted), ``to_numpy``
        brings results back (counted), ``xp`` allocates on k. Hand it to model.Model to run a model there."""
        from ..backends.numpy_backend import NumpyBackend

        devices, k = self, self.check(k)

        class DeviceBackend(NumpyBackend):
            name = f"numpy on virtual device {k}"
            xp = devices.namespace(k)

            def _asarray(self, a):
                return devices.to(k, a)

            def to_numpy(self, a):
                return devices.to_host(a)

        return DeviceBackend()

    # ------------------------------------------------------------------ bookkeeping
    def _charge(self, owner, k, name):
        key = id(owner)
        if key in _OWNERS:
            return
        nbytes, budget = int(owner.nbytes), self.budgets[k]
        if budget is not None and self._used[k] + nbytes > budget:
            raise DeviceMemoryError(f"device {k}: {name} requests {nbytes:,} bytes with {self._used[k]:,} in use of "
                                    f"its {budget:,}-byte budget")
        self._used[k] += nbytes
        self._peak[k] = max(self._peak[k], self._used[k])
        self._live[k][key] = LedgerEntry(name, nbytes)
        _OWNERS[key] = (self, k)
        weakref.finalize(owner, self._release, key, k, nbytes)

    def _release(self, key, k, nbytes):
        self._used[k] -= nbytes
        self._live[k].pop(key, None)
        _OWNERS.pop(key, None)

    def _adopt(self, arr, name):
        """Charge arr's owning buffer to arr's device unless it is charged already (a view)."""
        self._charge(_owner(arr), arr._device, name)

    def _tag(self, a, k, name):
        out = a.view(DeviceArray)
        out._devices, out._device = self, k
        self._adopt(out, name)
        return out

    def _wrap(self, result, k, name):
        """An operation's result on device k: arrays tagged (numpy scalars as 0-d arrays), through tuples."""
        if isinstance(result, DeviceArray):
            return result
        if isinstance(result, np.ndarray):
            return self._tag(result, k, name)
        if isinstance(result, np.generic):
            return self._tag(np.asarray(result), k, name)
        if type(result) in (tuple, list):
            return type(result)(self._wrap(r, k, name) for r in result)
        return result

    @contextlib.contextmanager
    def _named(self, name):
        previous, self._naming = self._naming, name
        try:
            yield
        finally:
            self._naming = previous

    def _operand_device(self, what, operands, out):
        """The one device of the operands; DeviceError for two devices (or a host out=, strict host arrays)."""
        found, host = {}, None
        for a in _items(operands):
            if not isinstance(a, np.ndarray):
                continue
            if isinstance(a, DeviceArray) and a._devices is not self:
                raise DeviceError(f"{what}: an operand belongs to another device set ({a._devices!r})")
            k = self._array_device(a)
            if k is None:
                host = a if host is None or a.size > host.size else host
            else:
                found.setdefault(k, a)
        if len(found) > 1:
            (i, a), (j, b) = list(found.items())[:2]
            raise DeviceError(f"{what}: operands on device {i} ({a.dtype} {list(a.shape)}) and device {j} "
                              f"({b.dtype} {list(b.shape)}); move one with devices.to({i}, x) first")
        (k,) = found or (None,)
        for o in _items(out or ()):   # a host out= is the reference's host scratch (np.zeros accumulators)
            where = self._array_device(o) if isinstance(o, np.ndarray) else None
            if isinstance(o, np.ndarray) and where != k and (where is not None or self.strict_host):
                raise DeviceError(f"{what}: out= is on {self._where(where)} but the operands are on {self._where(k)}")
        if self.strict_host and host is not None and host.ndim > 0:
            raise DeviceError(f"{what}: a host array {host.dtype} {list(host.shape)} meets device {k}'s arrays "
                              "(strict_host: move it with devices.to first, as CuPy requires)")
        return k

    @staticmethod
    def _where(k):
        return "the host" if k is None else f"device {k}"


class _Namespace:
    """``devices.xp``: NumPy, with the creation functions allocating on the current device (``use(k)``), or
    on a fixed one (``devices.namespace(k)``)."""

    CREATE = ("zeros", "empty", "ones", "full", "arange", "eye")
    LIKE = ("zeros_like", "empty_like", "ones_like", "full_like")

    def __init__(self, devices, device=None):
        self._devices, self._device = devices, device

    def _here(self, what):
        k = self._devices.current if self._device is None else self._device
        if k is None:
            raise DeviceError(f"devices.xp.{what}: no current device; allocate inside `with devices.use(k):`")
        return k

    def asarray(self, a, dtype=None):
        """Device data as it is (or a copy from another device, counted as a transfer); host data becomes a
        device constant, counted in ``devices.constants`` rather than as a transfer: an op's lookup table or
        mask (what CuPy uploads the same way), not data the runner moves."""
        k = self._here("asarray")
        if self._devices._array_device(a) is None and not isinstance(a, DeviceArray):
            host = np.asarray(a)
            self._devices.constants += 1
            out = self._devices._tag(np.array(host, copy=True, order="C"), k, "asarray")
        else:
            out = self._devices.to(k, a)
        return out if dtype is None or out.dtype == np.dtype(dtype) else out.astype(dtype)

    array = asarray

    def ascontiguousarray(self, a, dtype=None):
        out = self.asarray(a, dtype)
        if out.flags.c_contiguous:
            return out
        with self._devices._named("ascontiguousarray"):
            return out.copy(order="C")

    def __getattr__(self, name):
        attr = getattr(np, name)
        if name in self.CREATE or name in self.LIKE:
            def on_device(*args, **kwargs):
                k = self._here(name)
                if name in self.LIKE:   # the shape and dtype of a device array, the memory of the current one
                    args = (_plain(args[0]), *args[1:])
                return self._devices._wrap(attr(*args, **kwargs), k, name)

            return on_device
        return attr
