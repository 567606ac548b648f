"""Devices for a pipeline-placed model: every array belongs to one device, and only ``to`` moves data.

One small interface, two implementations (the streaming loader and the pipeline runner are written against it):

    devices.n                       number of devices
    with devices.use(k): ...        device k is current: ``devices.xp`` allocates there (caches: pass
                                    ``xp=devices.xp`` to model/cache.new_layer_state); on CUDA kernels launch there
    devices.to(k, x, name=None)     x (an array, or a packed NVFP4Weight / FP8Weight) on device k; a copy unless
                                    it is there already; counted in ``devices.transfers``
    devices.to_host(x)              a NumPy copy of device data (counted, destination "host")
    devices.device_of(x)            the device index of x, or None for host data
    devices.used(k), devices.peak(k)   bytes
    devices.transfers               {(src, dst): {"count": int, "bytes": int}}, src/dst a device index or "host"

``VirtualDevices`` (devices.py) backs each device with NumPy, so the whole runner runs on a CPU;
``CupyDevices`` (cupy_devices.py) maps device k to ``cupy.cuda.Device(k)``.

This module holds what both share (``DeviceSet``); each implements ``_array_device``, ``_here`` and the two
copies, and its own ``use``, ``used`` and ``peak``.
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from ..ops.formats import arrays_of, is_packed, map_arrays

HOST = "host"


class DeviceSet:
    """What VirtualDevices and CupyDevices share: device indices, packed weights field by field, the counts."""

    n: int
    transfers: dict

    def check(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.n:
            raise DeviceError(f"device {k!r} does not exist: this {type(self).__name__} has devices 0..{self.n - 1}")
        return int(k)

    def device_of(self, x):
        """The device index of x (an array or a packed weight), None for host data."""
        if is_packed(x):
            found = {self._array_device(v) for v in arrays_of(x)}
            if len(found) > 1:
                raise DeviceError(f"a {type(x).__name__} has fields on several devices: {sorted(found, key=str)}")
            return found.pop() if found else None
        return self._array_device(x)

    def to(self, k, x, name=None):
        """x on device k (stored weights and expert banks array by array); no copy when it is there already;
        counted."""
        k = self.check(k)
        if is_packed(x):
            return map_arrays(x, lambda a: self.to(k, a, name))
        src = self._array_device(x)
        if src == k:
            return self._here(k, x, name)
        out = self._copy(k, x, src, name)
        self._count(HOST if src is None else src, k, out.nbytes)
        return out

    def to_host(self, x):
        """A host NumPy copy of device data (host data comes back as it is, uncounted)."""
        if is_packed(x):
            return map_arrays(x, self.to_host)
        src = self._array_device(x)
        if src is None:
            return np.asarray(x)
        out = self._copy_to_host(x, src)
        self._count(src, HOST, out.nbytes)
        return out

    def write(self, k, dest, r0, r1, rows):
        """dest[r0:r1] = rows: host rows (a staged chunk of a file) into an array on device k, counted."""
        k = self.check(k)
        if dest.ndim:
            dest[r0:r1] = rows
        else:
            dest[...] = rows
        self._count(HOST, k, rows.nbytes)

    def transfer_count(self) -> int:
        return sum(t["count"] for t in self.transfers.values())

    def _count(self, src, dst, nbytes):
        row = self.transfers.setdefault((src, dst), {"count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += int(nbytes)
