"""The emulated devices' memory: device arrays, the devices and the current device, a memory pool per device.

Device arrays are NumPy arrays of the subclass ``ndarray`` (its ``__module__`` is "cupy", so
nemo_scratch.ops.common.get_xp hands the reference ops the fake module, as it would the real one). Memory
from ``empty``/``zeros``/``asarray``/``ascontiguousarray`` sits in a buffer aligned to 256 bytes (cudaMalloc's
alignment) between two 256-byte guards; fresh memory and guards hold 0xFF bytes (NaN as float, -1 as int), so
an output element a kernel never writes shows up as NaN, a read past the end as NaN, and a write past the end
(or before the start) fails the launch. As with CuPy, NumPy functions and operators on device arrays give
device arrays, and mixing a host numpy array into them raises TypeError.

Several devices (``Runtime(devices=N)``, one per fake module): every array belongs to the device that was
current when it was made (``cupy.cuda.Device(k)`` as a context manager; ``ndarray.device.id``), and NumPy
results belong to their operands' device. ``cupy.asarray(x)`` of another device's array copies it to the
current device, refusing a non-contiguous one as CuPy's cross-device copy does, and records the copy in
``Runtime.copies[(src, dst)]`` (the fake module's ``emulator_runtime``): the cupy backend's launchers
``asarray`` their inputs, so an array on the wrong device is copied, as CuPy would, and a test sees the hop
there. NumPy operations that mix
two devices' arrays, or that run on device i's arrays while device j is current, raise EmulatorError: where
CuPy would turn on peer access and read across the interconnect, the emulator stops, so that a test catches
every hop the code did not plan. Each device has a memory pool (``cupy.get_default_memory_pool()``, acting on
the current device as CuPy's does): ``used_bytes`` counts the live arrays of the device, allocations and
operation results alike, and ``set_limit(size=...)`` makes an allocation past it raise
``cupy.cuda.memory.OutOfMemoryError``.
"""

import weakref

import numpy as np

from .compiler import EmulatorError

GUARD = 256                 # bytes before and after every allocation
FILL = 0xFF                 # fresh memory and guards
GUARDED = {}                # id(owning buffer) -> (start, nbytes) of the array inside it


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


def plain(a):
    return a.view(np.ndarray) if isinstance(a, ndarray) else a


def owner(a):
    """The ndarray that owns a's memory (NumPy collapses view chains to it)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _items(args):
    """The arguments and the items of list/tuple arguments (np.concatenate([a, b]))."""
    for a in args:
        yield from (a if isinstance(a, (list, tuple)) else (a,))


def _refuse_host_arrays(what, args):
    for a in _items(args):
        if isinstance(a, np.ndarray) and not isinstance(a, ndarray):
            raise TypeError(f"{what}: a host numpy array {a.shape} {a.dtype} is mixed with device arrays; CuPy "
                            "refuses that (move it with cupy.asarray first)")


def operand_device(what, args):
    """(runtime, device) of the device arrays among ``args``; EmulatorError for two devices, or for a device
    that is not the current one. (None, None) when there is no device array."""
    found = {}
    for a in _items(args):
        if isinstance(a, ndarray) and a._rt is not None:
            found.setdefault(a._dev, a)
    if not found:
        return None, None
    rt = next(iter(found.values()))._rt
    if len(found) > 1:
        i, j = sorted(found)[:2]
        raise EmulatorError(f"{what}: operands on device {i} and device {j}; CuPy would try peer access, the "
                            "emulator refuses (copy one with cupy.asarray under the other's cupy.cuda.Device)")
    (k,) = found
    if k != rt.current:
        raise EmulatorError(f"{what}: operands on device {k} but the current device is {rt.current}; CuPy would run "
                            f"it on device {rt.current} through peer access, the emulator refuses (enter "
                            f"cupy.cuda.Device({k}) first)")
    return rt, k


def to_device(result, rt=None, device=None):
    """Plain NumPy results -> device arrays of ``device`` (views, no copy, charged to its pool), through tuples
    and lists."""
    if type(result) is np.ndarray:
        out = result.view(ndarray)
        if rt is not None:
            rt.charge(owner(result), device, owner(result).nbytes)
            out._rt, out._dev = rt, device
        return out
    if type(result) in (tuple, list):
        return type(result)(to_device(r, rt, device) for r in result)
    return result


class ndarray(np.ndarray):
    """A device array (cupy.ndarray's stand-in): ``.data.ptr``, ``.get()``, ``.device``; NumPy calls give device
    arrays of the same device."""

    __module__ = "cupy"
    _rt = None      # the Runtime it belongs to
    _dev = 0        # its device

    def __array_finalize__(self, obj):
        self._rt, self._dev = getattr(obj, "_rt", None), getattr(obj, "_dev", 0)
        if self._rt is not None:   # a view (its buffer is charged already) or a method's result (astype, copy)
            self._rt.charge(owner(self), self._dev, owner(self).nbytes)

    @property
    def data(self):
        return _Pointer(self.ctypes.data)

    @property
    def device(self):
        return self._rt.Device(self._dev)

    def get(self):
        return asnumpy(self)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        what = f"numpy.{ufunc.__name__}"
        _refuse_host_arrays(what, inputs + (out or ()))
        rt, k = operand_device(what, inputs + (out or ()))
        if out is not None:
            kwargs["out"] = tuple(plain(o) for o in out)
        result = getattr(ufunc, method)(*(plain(a) for a in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return to_device(result, rt, k)

    def __array_function__(self, func, types_, args, kwargs):
        what = f"numpy.{func.__name__}"
        _refuse_host_arrays(what, (*args, *kwargs.values()))
        rt, k = operand_device(what, (*args, *kwargs.values()))

        def unwrap(a):
            return type(a)(plain(x) for x in a) if type(a) in (list, tuple) else plain(a)

        return to_device(func(*(unwrap(a) for a in args), **{n: unwrap(v) for n, v in kwargs.items()}), rt, k)


def asnumpy(a):
    """Device to host: a plain numpy copy (whatever device is current, as CuPy's)."""
    return np.array(plain(a), copy=True)


class OutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError: an allocation past the pool's limit."""

    def __init__(self, size, total, limit):
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes, limit set "
                         f"to: {limit:,} bytes).")


class Runtime:
    """One emulated machine: ``devices`` devices, the current-device stack, a memory pool per device, and the
    allocating functions of the fake module (``functions()``)."""

    def __init__(self, devices, device_class):
        self.count = devices
        self.stack = [0]
        self.used = [0] * devices
        self.limit = [0] * devices          # 0: no limit (CuPy's default)
        self.owners = {}                    # id(owning buffer) -> (device, nbytes)
        self.copies = {}                    # (src, dst) -> {"count", "bytes"}: every device-to-device copy
        self.Device = type("Device", (device_class,), {"_rt": self})

    @property
    def current(self):
        return self.stack[-1]

    def charge(self, buffer, device, nbytes):
        """Count ``buffer`` against ``device``'s pool once; it is released when NumPy frees the buffer."""
        key = id(buffer)
        if key in self.owners:
            return
        if self.limit[device] and self.used[device] + nbytes > self.limit[device]:
            raise OutOfMemoryError(nbytes, self.used[device], self.limit[device])
        self.used[device] += nbytes
        self.owners[key] = (device, nbytes)
        weakref.finalize(buffer, self._release, key)

    def _release(self, key):
        device, nbytes = self.owners.pop(key)
        self.used[device] -= nbytes

    def allocate(self, shape, dtype):
        """A device array on the current device, filled with 0xFF bytes, 256-byte aligned, between two guards."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.full(nbytes + 2 * GUARD + 256, FILL, dtype=np.uint8)
        self.charge(raw, self.current, nbytes)   # the pool counts what was asked for, not the guards
        start = (-raw.ctypes.data) % 256 + GUARD
        GUARDED[id(raw)] = (start, nbytes)
        weakref.finalize(raw, GUARDED.pop, id(raw), None)
        return to_device(raw[start:start + nbytes].view(dtype).reshape(shape), self, self.current)

    def functions(self):
        """empty, zeros, empty_like, zeros_like, array, asarray, ascontiguousarray of this runtime."""
        rt = self

        def empty(shape, dtype=float):
            return rt.allocate(shape, dtype)

        def zeros(shape, dtype=float):
            out = rt.allocate(shape, dtype)
            out.view(np.ndarray)[...] = 0
            return out

        def empty_like(a, dtype=None):
            return rt.allocate(a.shape, dtype or a.dtype)

        def zeros_like(a, dtype=None):
            return zeros(a.shape, dtype or a.dtype)

        def array(a, dtype=None):
            """A copy on the current device: host to device, or another device's (C-contiguous) array."""
            if isinstance(a, ndarray) and a._dev != rt.current and not a.flags.c_contiguous:
                raise NotImplementedError("CuPy cannot copy non-contiguous array between devices.")
            src = plain(a) if isinstance(a, ndarray) else np.asarray(a, dtype=dtype)
            out = rt.allocate(src.shape, dtype or src.dtype)
            out.view(np.ndarray)[...] = src
            if isinstance(a, ndarray) and a._rt is rt and a._dev != rt.current:
                row = rt.copies.setdefault((a._dev, rt.current), {"count": 0, "bytes": 0})
                row["count"] += 1
                row["bytes"] += int(out.nbytes)
            return out

        def asarray(a, dtype=None):
            if isinstance(a, ndarray) and a._dev == rt.current and (dtype is None or np.dtype(dtype) == a.dtype):
                return a
            return array(a, dtype)

        def ascontiguousarray(a, dtype=None):
            if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
                return a
            if isinstance(a, ndarray):   # the copy kernel would run on the current device
                operand_device("cupy.ascontiguousarray", (a,))
            return array(np.ascontiguousarray(plain(a)), dtype)

        return {"empty": empty, "zeros": zeros, "empty_like": empty_like, "zeros_like": zeros_like, "array": array,
                "asarray": asarray, "ascontiguousarray": ascontiguousarray}


class MemoryPool:
    """cupy.get_default_memory_pool(): each method acts on the current device's pool. The emulator caches no
    freed blocks, so total_bytes() equals used_bytes()."""

    def __init__(self, rt):
        self._rt = rt

    def used_bytes(self):
        return self._rt.used[self._rt.current]

    def total_bytes(self):
        return self.used_bytes()

    def free_all_blocks(self):
        """Nothing is cached: a freed array returns its memory at once."""

    def set_limit(self, size=None, fraction=None):
        if fraction is not None:
            raise EmulatorError("MemoryPool.set_limit(fraction=...): the emulated devices have no total memory; "
                                "pass size= in bytes")
        self._rt.limit[self._rt.current] = int(size or 0)

    def get_limit(self):
        return self._rt.limit[self._rt.current]
