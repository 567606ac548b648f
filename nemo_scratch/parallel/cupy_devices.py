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

    def namespace(self, k):
        """CuPy with its creation functions allocating on device k, whatever device is current."""
        return _DeviceNamespace(self, self.check(k))

    def write(self, k, dest, r0, r1, rows):
        """dest[r0:r1] = rows (host): through a pinned staging buffer, two of them taking turns, so that the
        copy of one chunk overlaps the read of the next; a buffer is reused only once its copy has finished."""
        cp, k = self.cp, self.check(k)
        pinned = self._pinned(k, rows.nbytes)
        if pinned is None:   # no pinned memory (e.g. the CPU emulator): a plain synchronous copy
            return super().write(k, dest, r0, r1, rows)
        buffer, done = pinned
        done.synchronize()                       # this buffer's previous copy has left it
        staged = np.frombuffer(buffer, dtype=rows.dtype, count=rows.size).reshape(rows.shape)
        staged[...] = rows
        with cp.cuda.Device(k):
            target = dest[r0:r1] if dest.ndim else dest
            target.set(staged, stream=cp.cuda.get_current_stream())
            done.record()
        self._count("host", k, rows.nbytes)

    def _pinned(self, k, nbytes):
        """The next of two pinned buffers (at least nbytes) with the event of its last copy; None without
        pinned memory."""
        cp = self.cp
        try:
            import cupyx
        except ImportError:
            return None
        if not hasattr(cupyx, "empty_pinned"):
            return None
        buffers = self.__dict__.setdefault("_buffers", {})
        turn = self.__dict__.setdefault("_turn", {})
        pair = buffers.get(k)
        if pair is None or pair[0][0].nbytes < nbytes:
            for _, event in pair or ():
                event.synchronize()              # an old buffer may still be read by a copy: let it finish
            with cp.cuda.Device(k):
                pair = [(cupyx.empty_pinned((nbytes,), dtype=np.uint8), cp.cuda.Event()) for _ in range(2)]
                for _, event in pair:
                    event.record()
            buffers[k] = pair
        turn[k] = 1 - turn.get(k, 1)
        return pair[turn[k]]

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



class _DeviceNamespace:
    """``devices.namespace(k)``: CuPy, its creation functions run under ``cupy.cuda.Device(k)``."""

    CREATE = ("zeros", "empty", "ones", "full", "arange", "eye", "zeros_like", "empty_like", "ones_like",
              "full_like", "asarray", "array", "ascontiguousarray")

    def __init__(self, devices, k):
        self._devices, self._k = devices, k

    def __getattr__(self, name):
        attr = getattr(self._devices.cp, name)
        if name not in self.CREATE:
            return attr

        def on_device(*args, **kwargs):
            with self._devices.cp.cuda.Device(self._k):
                return attr(*args, **kwargs)

        return on_device
