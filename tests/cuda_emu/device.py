"""The emulated device behind the fake ``cupy`` module: device arrays, RawModule kernels and their launch.

Device arrays are NumPy arrays of the subclass ``ndarray`` (its ``__module__`` is "cupy", so
nemo_scratch.ops.common.get_xp hands the reference ops the fake module, as it would the real one). Memory
from ``empty``/``zeros``/``asarray``/``ascontiguousarray`` sits in a buffer aligned to 256 bytes (cudaMalloc's
alignment) between two 256-byte guards; fresh memory and guards hold 0xFF bytes (NaN as float, -1 as int), so
an output element a kernel never writes shows up as NaN, a read past the end as NaN, and a write past the end
(or before the start) fails the launch. As with CuPy, NumPy functions and operators on device arrays give
device arrays, and mixing a host numpy array into them raises TypeError.

A kernel launch is checked as CuPy's ABI needs it: grid/block/shared-memory limits of an sm_90 device,
one argument per parameter, device arrays of the parameter's dtype and C-contiguous for pointers, numpy
scalars of exactly the parameter's type for scalars (CuPy passes a Python int as a 64-bit long long and a
Python float as a double), a 64-bit zero (``numpy.uint64(0)``) for a null pointer and never ``None`` (CuPy
passes None as 0xffffffff, cupy issue #9046).
"""

import ctypes
import functools
import importlib.machinery
import types
import weakref

import numpy as np

from .compiler import EmulatorError, build, parse_kernels

GUARD = 256                 # bytes before and after every allocation
FILL = 0xFF                 # fresh memory and guards
SM_COUNT = 132              # an H100 SXM (the decode split-K plan reads it)
SMEM_DEFAULT = 48 * 1024    # dynamic shared memory a kernel may use without the opt-in attribute
SMEM_OPTIN = 227 * 1024     # sm_90's opt-in maximum
_CTYPES = {"float32": ctypes.c_float, "float64": ctypes.c_double, "int32": ctypes.c_int32,
           "uint32": ctypes.c_uint32, "int64": ctypes.c_int64, "uint64": ctypes.c_uint64, "uint8": ctypes.c_uint8,
           "int8": ctypes.c_int8, "int16": ctypes.c_int16, "uint16": ctypes.c_uint16, "bool": ctypes.c_bool}
_GUARDED = {}               # id(owning buffer) -> (start, nbytes) of the array inside it


# ---------------------------------------------------------------------------------------------------------
# Device arrays

class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, ndarray) else a


def _items(args):
    """The arguments and the items of list/tuple arguments (np.concatenate([a, b]))."""
    for a in args:
        yield from (a if isinstance(a, (list, tuple)) else (a,))


def _refuse_host_arrays(what, args):
    for a in _items(args):
        if isinstance(a, np.ndarray) and not isinstance(a, ndarray):
            raise TypeError(f"{what}: a host numpy array {a.shape} {a.dtype} is mixed with device arrays; CuPy "
                            "refuses that (move it with cupy.asarray first)")


def _to_device(result):
    """Plain NumPy results -> device arrays (views, no copy), through tuples and lists."""
    if type(result) is np.ndarray:
        return result.view(ndarray)
    if type(result) in (tuple, list):
        return type(result)(_to_device(r) for r in result)
    return result


class ndarray(np.ndarray):
    """A device array (cupy.ndarray's stand-in): ``.data.ptr``, ``.get()``; NumPy calls give device arrays."""

    __module__ = "cupy"

    @property
    def data(self):
        return _Pointer(self.ctypes.data)

    def get(self):
        return asnumpy(self)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host_arrays(f"numpy.{ufunc.__name__}", inputs + (out or ()))
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*(_plain(a) for a in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, func, types_, args, kwargs):
        _refuse_host_arrays(f"numpy.{func.__name__}", (*args, *kwargs.values()))

        def plain(a):
            return type(a)(_plain(x) for x in a) if type(a) in (list, tuple) else _plain(a)

        return _to_device(func(*(plain(a) for a in args), **{k: plain(v) for k, v in kwargs.items()}))


def _allocate(shape, dtype):
    """A device array filled with 0xFF bytes, 256-byte aligned, between two guards (see the module docstring)."""
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.full(nbytes + 2 * GUARD + 256, FILL, dtype=np.uint8)
    start = (-raw.ctypes.data) % 256 + GUARD
    _GUARDED[id(raw)] = (start, nbytes)
    weakref.finalize(raw, _GUARDED.pop, id(raw), None)
    return raw[start:start + nbytes].view(dtype).reshape(shape).view(ndarray)


def _owner(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _check_guards(kernel, name, a):
    """EmulatorError if the guards around device array ``a``'s buffer were written."""
    raw = _owner(a)
    if id(raw) not in _GUARDED:
        return  # memory NumPy allocated (an operator's result): no guards to check
    start, nbytes = _GUARDED[id(raw)]
    if np.any(raw[:start] != FILL) or np.any(raw[start + nbytes:] != FILL):
        raise EmulatorError(f"kernel {kernel} wrote outside the buffer of argument {name!r} "
                            f"({a.dtype} {list(a.shape)}: {nbytes} bytes)")


def empty(shape, dtype=float):
    return _allocate(shape, dtype)


def zeros(shape, dtype=float):
    out = _allocate(shape, dtype)
    out[...] = 0
    return out


def empty_like(a, dtype=None):
    return _allocate(a.shape, dtype or a.dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, dtype or a.dtype)


def array(a, dtype=None):
    """A copy on the device (host to device for a numpy array)."""
    src = _plain(a) if isinstance(a, ndarray) else np.asarray(a, dtype=dtype)
    out = _allocate(src.shape, dtype or src.dtype)
    out.view(np.ndarray)[...] = src
    return out


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return array(np.ascontiguousarray(_plain(a)), dtype)


def asnumpy(a):
    """Device to host: a plain numpy copy."""
    return np.array(_plain(a), copy=True)


# ---------------------------------------------------------------------------------------------------------
# Kernels

def _dims(what, dims):
    """CuPy's Function.__call__: a tuple of 1 to 3 ints (TypeError otherwise), padded with 1s; a dimension
    below 1 launches as 1 (CuPy's max(1, d)), so a launcher must skip empty launches itself."""
    if type(dims) is not tuple:
        raise TypeError(f"{what} has type {type(dims).__name__}, expected tuple (CuPy's Function.__call__ "
                        f"declares tuple {what})")
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise EmulatorError(f"{what} {dims!r}: expected 1 to 3 integers")
    return tuple(max(1, int(d)) for d in dims) + (1,) * (3 - len(dims))


class RawModule:
    """cupy.RawModule(code=..., options=...): the source compiled by g++ against emu.h (compiler.py)."""

    def __init__(self, code=None, options=(), **kwargs):
        if code is None or kwargs:
            raise EmulatorError(f"RawModule: only code= and options= are emulated (got {sorted(kwargs)})")
        self.kernels = parse_kernels(code)
        self._lib = ctypes.CDLL(str(build(code, tuple(options))))
        self._lib.emu_launch.restype = ctypes.c_int
        self._lib.emu_launch.argtypes = ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_uint] * 6
                                         + [ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_ulonglong])

    def get_function(self, name):
        if name not in self.kernels:
            raise EmulatorError(f'RawModule.get_function({name!r}): no extern "C" __global__ kernel of that name '
                                f"(CUDA: named symbol not found); the source has {sorted(self.kernels)}")
        return Function(self._lib, name, self.kernels[name])


class Function:
    """One kernel: ``kernel(grid, block, args, shared_mem=0)`` runs it on the emulator, synchronously."""

    def __init__(self, lib, name, params):
        self._lib, self.name, self.params = lib, name, params
        self._body = ctypes.cast(getattr(lib, f"emu_body_{name}"), ctypes.c_void_p)
        self._max_smem = SMEM_DEFAULT

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._max_smem

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        if not 0 <= value <= SMEM_OPTIN:
            raise EmulatorError(f"{self.name}: max_dynamic_shared_size_bytes={value}, an sm_90 block may opt in "
                                f"to at most {SMEM_OPTIN} bytes")
        self._max_smem = int(value)

    def _argument(self, p, a):
        """The ctypes value CuPy would pass for argument ``a`` of parameter ``p``; EmulatorError if wrong."""
        where = f"kernel {self.name}, argument {p.name!r} ({p.ctype}{'*' if p.pointer else ''})"
        if p.pointer:
            if a is None:
                raise EmulatorError(f"{where} is None: CuPy passes None as 0xffffffff, not a null pointer "
                                    "(cupy issue #9046); pass numpy.uint64(0)")
            if type(a) in (np.uint64, np.int64) and a == 0:
                return ctypes.c_void_p(0)
            if not isinstance(a, ndarray):
                raise EmulatorError(f"{where} got {type(a).__name__}: expected a device array (a host array "
                                    "must be moved with cupy.asarray)")
            if a.dtype != np.dtype(p.dtype) or not a.flags.c_contiguous:
                raise EmulatorError(f"{where} got a {'' if a.flags.c_contiguous else 'non-contiguous '}{a.dtype} "
                                    f"array: the kernel reads it as contiguous {p.dtype}")
            return ctypes.c_void_p(a.ctypes.data)
        if type(a) is not np.dtype(p.dtype).type:
            raise EmulatorError(f"{where} got {type(a).__name__} {a!r}: pass numpy.{p.dtype} (CuPy passes a Python "
                                "int as a 64-bit long long and a Python float as a double)")
        return _CTYPES[p.dtype](a.item())

    def __call__(self, grid, block, args, shared_mem=0):
        grid, block = _dims("grid", grid), _dims("block", block)
        if grid[0] >= 2**31 or max(grid[1:]) > 65535:
            raise EmulatorError(f"{self.name}: grid {grid} exceeds (2^31 - 1, 65535, 65535)")
        if block[0] > 1024 or block[1] > 1024 or block[2] > 64 or np.prod(block) > 1024:
            raise EmulatorError(f"{self.name}: block {block} exceeds 1024 threads (or 1024 x 1024 x 64)")
        if not 0 <= shared_mem <= self._max_smem:
            raise EmulatorError(f"{self.name}: shared_mem={shared_mem} bytes exceeds the kernel's limit of "
                                f"{self._max_smem} (raise max_dynamic_shared_size_bytes first)")
        if len(args) != len(self.params):
            raise EmulatorError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters "
                                f"({', '.join(p.name for p in self.params)})")
        values = [self._argument(p, a) for p, a in zip(self.params, args)]
        pointers = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        error = ctypes.create_string_buffer(2048)
        if self._lib.emu_launch(self._body, pointers, *grid, *block, int(shared_mem), error, len(error)):
            raise EmulatorError(f"kernel {self.name} grid {grid} block {block}: {error.value.decode()}")
        for p, a in zip(self.params, args):
            if isinstance(a, ndarray):
                _check_guards(self.name, p.name, a)


# ---------------------------------------------------------------------------------------------------------
# The module

class Device:
    """cupy.cuda.Device(0): the attributes the launchers read."""

    id = 0
    compute_capability = "90"

    def __init__(self, device=0):
        if device != 0:
            raise EmulatorError(f"cupy.cuda.Device({device}): the emulator has device 0 only")

    @property
    def attributes(self):
        return {"MultiProcessorCount": SM_COUNT, "MaxSharedMemoryPerBlockOptin": SMEM_OPTIN,
                "MaxThreadsPerBlock": 1024, "WarpSize": 32}

    def synchronize(self):
        """Nothing to wait for: every emulated launch has finished when it returns."""


def _forward(name):
    """Module __getattr__: every other name is NumPy's, functions returning device arrays."""
    if name.startswith("__"):
        raise AttributeError(name)
    attr = getattr(np, name)
    if isinstance(attr, (type, np.ufunc)) or not callable(attr):
        return attr

    @functools.wraps(attr)
    def on_device(*args, **kwargs):
        return _to_device(attr(*args, **kwargs))

    return on_device


def make_module():
    """A fresh ``cupy`` module object backed by this emulator."""
    mod = types.ModuleType("cupy", "CPU emulation of the CuPy subset nemo_scratch uses (tests/cuda_emu).")
    mod.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    for name in ("ndarray", "empty", "zeros", "empty_like", "zeros_like", "array", "asarray", "ascontiguousarray",
                 "asnumpy", "RawModule"):
        setattr(mod, name, globals()[name])
    mod.cuda = types.SimpleNamespace(
        Device=Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, deviceSynchronize=lambda: None))
    mod.__getattr__ = _forward
    mod.is_cuda_emulator = True
    return mod
