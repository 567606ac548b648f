"""The fake ``cupy`` module: RawModule kernels and their checked launch, ``cuda.Device``, ``cuda.runtime``; the
device arrays and their memory live in arrays.py.

A kernel launch is checked as CuPy's ABI needs it: grid/block/shared-memory limits of an sm_90 device,
one argument per parameter, device arrays of the parameter's dtype and C-contiguous for pointers, numpy
scalars of exactly the parameter's type for scalars (CuPy passes a Python int as a 64-bit long long and a
Python float as a double), a 64-bit zero (``numpy.uint64(0)``) for a null pointer and never ``None`` (CuPy
passes None as 0xffffffff, cupy issue #9046). With several devices (``make_module(devices=N)``), every
pointer argument must be on the current device: a kernel launched under the wrong ``cupy.cuda.Device`` is
the classic multi-GPU bug, and the launch fails naming both devices.
"""

import ctypes
import functools
import importlib.machinery
import types

import numpy as np

from .arrays import (FILL, GUARDED, MemoryPool, OutOfMemoryError, Runtime, asnumpy, ndarray, operand_device, owner,
                     to_device)
from .compiler import EmulatorError, build, parse_kernels

SM_COUNT = 132              # an H100 SXM (the decode split-K plan reads it)
SMEM_DEFAULT = 48 * 1024    # dynamic shared memory a kernel may use without the opt-in attribute
SMEM_OPTIN = 227 * 1024     # sm_90's opt-in maximum
_CTYPES = {"float32": ctypes.c_float, "float64": ctypes.c_double, "int32": ctypes.c_int32,
           "uint32": ctypes.c_uint32, "int64": ctypes.c_int64, "uint64": ctypes.c_uint64, "uint8": ctypes.c_uint8,
           "int8": ctypes.c_int8, "int16": ctypes.c_int16, "uint16": ctypes.c_uint16, "bool": ctypes.c_bool}


def _check_guards(kernel, name, a):
    """EmulatorError if the guards around device array ``a``'s buffer were written."""
    raw = owner(a)
    if id(raw) not in GUARDED:
        return  # memory NumPy allocated (an operator's result): no guards to check
    start, nbytes = GUARDED[id(raw)]
    if np.any(raw[:start] != FILL) or np.any(raw[start + nbytes:] != FILL):
        raise EmulatorError(f"kernel {kernel} wrote outside the buffer of argument {name!r} "
                            f"({a.dtype} {list(a.shape)}: {nbytes} bytes)")


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
            if a._rt is not None and a._dev != a._rt.current:
                raise EmulatorError(f"{where} is on device {a._dev} but the launch is on device {a._rt.current} "
                                    f"(the current device): enter cupy.cuda.Device({a._dev}) to launch there, or copy "
                                    f"the array with cupy.asarray under cupy.cuda.Device({a._rt.current})")
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
    """cupy.cuda.Device(k): a context manager making k current, ``.id``, ``.use()``, the attributes the launchers
    read. ``Device()`` is the current device. Each fake module has its own subclass bound to its Runtime."""

    _rt = None
    compute_capability = "90"

    def __init__(self, device=None):
        rt = self._rt
        device = rt.current if device is None else device
        if isinstance(device, bool) or not isinstance(device, (int, np.integer)) or not 0 <= device < rt.count:
            raise EmulatorError(f"cupy.cuda.Device({device!r}): the emulator has {rt.count} device(s), 0.."
                                f"{rt.count - 1} (more with cuda_emu.installed(devices=N))")
        self.id = int(device)

    def __enter__(self):
        self._rt.stack.append(self.id)
        return self

    def __exit__(self, *exc):
        self._rt.stack.pop()

    def use(self):
        """Make this device current until another use() or the end of the enclosing ``with`` block."""
        self._rt.stack[-1] = self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other._rt is self._rt and other.id == self.id

    def __hash__(self):
        return hash((id(self._rt), self.id))

    def __repr__(self):
        return f"<CUDA Device {self.id}>"

    @property
    def attributes(self):
        return {"MultiProcessorCount": SM_COUNT, "MaxSharedMemoryPerBlockOptin": SMEM_OPTIN,
                "MaxThreadsPerBlock": 1024, "WarpSize": 32}

    def synchronize(self):
        """Nothing to wait for: every emulated launch has finished when it returns."""


def _forwarder(rt):
    """Module __getattr__: every other name is NumPy's; functions give arrays on their operands' device (on
    the current device when they take none: cupy.arange)."""

    def forward(name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(np, name)
        if isinstance(attr, (type, np.ufunc)) or not callable(attr):
            return attr

        @functools.wraps(attr)
        def on_device(*args, **kwargs):
            _, k = operand_device(f"cupy.{name}", (*args, *kwargs.values()))
            return to_device(attr(*args, **kwargs), rt, rt.current if k is None else k)

        return on_device

    return forward


def make_module(devices=1):
    """A fresh ``cupy`` module object backed by this emulator, with ``devices`` devices (device 0 current)."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise EmulatorError(f"make_module(devices={devices!r}): expected a positive number of devices")
    rt = Runtime(devices, Device)
    mod = types.ModuleType("cupy", "CPU emulation of the CuPy subset nemo_scratch uses (tests/cuda_emu).")
    mod.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    for name, fn in rt.functions().items():
        setattr(mod, name, fn)
    mod.ndarray, mod.asnumpy, mod.RawModule = ndarray, asnumpy, RawModule
    pool = MemoryPool(rt)
    mod.get_default_memory_pool = lambda: pool
    runtime = types.SimpleNamespace(getDeviceCount=lambda: rt.count, deviceSynchronize=lambda: None,
                                    getDevice=lambda: rt.current, setDevice=lambda k: rt.Device(k).use())
    mod.cuda = types.SimpleNamespace(Device=rt.Device, runtime=runtime, MemoryPool=MemoryPool,
                                     memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
                                     get_device_id=lambda: rt.current)
    mod.__getattr__ = _forwarder(rt)
    mod.is_cuda_emulator = True
    mod.emulator_runtime = rt
    return mod
