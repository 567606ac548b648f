"""``CupyDevices``: the device interface of device_set.py over CuPy's devices, ``cupy.cuda.Device(k)``.

    devices = CupyDevices(8)                       # devices 0..7; CupyDevices(4, limit_bytes=80 * 2**30)
    with devices.use(3):                           # = with cupy.cuda.Device(3) (+ numba.cuda.gpus[3])
        cache = new_layer_state("attention", cfg, 1, np.float32, xp=devices.xp)
    h = devices.to(4, h)                           # a device-to-device copy, counted

- ``use(k)`` enters ``cupy.cuda.Device(k)``: CuPy allocates on the current device and launches kernels
  there (RawKernel caches its binary per device). With ``numba=True`` it also enters ``numba.cuda.gpus[k]``,
  the context the numba backend's kernels launch in (both use the device's primary context). Other
  per-device contexts hook in the same way: ``contexts`` takes more ``k -> context manager`` callables.
- ``to(k, x)`` copies under ``Device(k)``; a device array is made C-contiguous on its own device first,
  because CuPy cannot copy a non-contiguous array between devices (``h[:, -1:]`` is such a view).
- ``used(k)`` is the growth of device k's memory pool (``used_bytes``) since the CupyDevices was made;
  ``peak(k)`` is the largest ``used`` seen at this object's own calls (``to``, leaving ``use``, ``used``):
  CuPy's pool keeps no high-water mark of its own. ``limit_bytes`` sets each pool's ``set_limit``, to play a
  smaller GPU on a bigger one (an H100's 80 GiB on an H200); an allocation past it raises CuPy's
  OutOfMemoryError, which ``to`` reports as DeviceMemoryError.
- CuPy is imported when the object is made: BackendError if it is missing or there are fewer devices.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import BackendError, DeviceMemoryError, InputError
from .device_set import DeviceSet


class CupyDevices(DeviceSet):
    """Devices 0..n-1 of CuPy (default: all), optionally each capped at ``limit_bytes`` (int, or one per device)."""

    def __init__(self, n=None, limit_bytes=None, numba=False, contexts=()):
        try:
            import cupy
        except ImportError:
            raise BackendError("CupyDevices needs cupy (install the gpu-cuda12 or gpu-cuda13 extra)") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:   # no driver, or a broken one
            raise BackendError(f"CupyDevices: no CUDA device is available ({type(exc).__name__}: {exc})") from None
        n = count if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"CupyDevices: n must be a positive integer, got {n!r}")
        if n > count:
            raise BackendError(f"CupyDevices: {n} devices asked for, but CUDA reports {count}")
        limits = list(limit_bytes) if isinstance(limit_bytes, (list, tuple)) else [limit_bytes] * n
        if len(limits) != n:
            raise InputError(f"CupyDevices: limit_bytes has {len(limits)} entries for n={n} devices")
        self.cp, self.n, self.xp = cupy, n, cupy
        self.transfers = {}
        self._contexts = [lambda k: cupy.cuda.Device(k)]
        if numba:
            try:
                from numba import cuda as numba_cuda
            except ImportError:
                raise BackendError("CupyDevices(numba=True) needs numba-cuda (the gpu extras)") from None
            self._contexts.append(lambda k: numba_cuda.gpus[k])
        self._contexts += list(contexts)
        self._pool = cupy.get_default_memory_pool()
        self._limits, self._base, self._peak = [], [], [0] * n
        for k, limit in enumerate(limits):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
                raise InputError(f"CupyDevices: limit_bytes[{k}] must be an integer >= 0 or None, got {limit!r}")
            with cupy.cuda.Device(k):
                if limit is not None:
                    self._pool.set_limit(size=limit)
                self._limits.append(self._pool.get_limit() or None)
                self._base.append(self._pool.used_bytes())

    def __repr__(self):
        return f"CupyDevices({self.n}, limits={self._limits})"

    @contextlib.contextmanager
    def use(self, k):
        """Device k current for CuPy (allocations, kernel launches) and every registered context hook."""
        k = self.check(k)
        with contextlib.ExitStack() as stack:
            for enter in self._contexts:
                stack.enter_context(enter(k))
            try:
                yield k
            finally:
                self.used(k)

    def _array_device(self, x):
        return int(x.device.id) if isinstance(x, self.cp.ndarray) else None

    def _here(self, k, x, name):
        return x

    def _copy(self, k, x, src, name):
        cp = self.cp
        try:
            if src is None:
                data = np.ascontiguousarray(x)
                with cp.cuda.Device(k):
                    out = cp.asarray(data)
            else:
                with cp.cuda.Device(src):   # made contiguous where it lives: a cross-device copy needs it
                    x = cp.ascontiguousarray(x)
                with cp.cuda.Device(k):
                    out = cp.asarray(x)
        except cp.cuda.memory.OutOfMemoryError:
            nbytes = int(np.asarray(x).nbytes) if src is None else int(x.nbytes)
            raise DeviceMemoryError(f"device {k}: {name or 'to'} requests {nbytes:,} bytes with {self.used(k):,} in "
                                    f"use of its {self._limits[k] or 0:,}-byte pool limit") from None
        self.used(k)
        return out

    def _copy_to_host(self, x, src):
        with self.cp.cuda.Device(src):
            return self.cp.asnumpy(x)

    def used(self, k) -> int:
        """Bytes device k's memory pool has in use beyond what it had when this object was made."""
        k = self.check(k)
        with self.cp.cuda.Device(k):
            used = self._pool.used_bytes() - self._base[k]
        self._peak[k] = max(self._peak[k], used)
        return used

    def peak(self, k) -> int:
        self.used(k)
        return self._peak[self.check(k)]

    def limit(self, k):
        """Device k's pool limit in bytes, or None."""
        return self._limits[self.check(k)]

