"""Tensor and expert parallelism, part 2: the collectives, behind one small interface.

Every rank runs the same code and calls, in the same order,

    comm.all_reduce(x)            # [...] -> [...]     the sum over the ranks
    comm.all_gather(x, axis)      # [..., n, ...] -> [..., R n, ...]   rank order along ``axis``
    comm.broadcast(x, root=0)     # [...] -> [...]     root's x on every rank (x gives shape and dtype)

with ``comm.rank`` and ``comm.size``. Each endpoint counts its collectives (``counts``: calls per kind) and
the bytes it contributed (``nbytes``), so tests can hold the documented count per token to account.

- ``LocalComm``: R ranks inside one process, one thread each (``run_ranks``), for CPU tests. A collective
  waits until every rank has contributed, then each rank combines the R contributions in rank order, so the
  result is bitwise the same on every rank and the rank code is exactly the code that runs under NCCL.
- ``ProcessComm``: one spawned process per rank; the launching process relays the collectives
  (parallel/launch.py). It exercises the launcher on CPUs.
- ``NcclComm``: one process per GPU over ``cupy.cuda.nccl`` (the NCCL of the nvidia-nccl-cu12/cu13 wheel
  that CuPy loads). Device arrays go straight to NCCL; host (NumPy) arrays are staged through the device.
"""

from __future__ import annotations

import abc
import threading
from collections import Counter

import numpy as np

from ..errors import BackendError, InputError
from ..ops.common import get_xp

KINDS = ("all_reduce", "all_gather", "broadcast")
BARRIER_TIMEOUT_S = 600.0      # a LocalComm rank waits this long for the others before it gives up


class Comm(abc.ABC):
    """The interface and the counters; a subclass implements ``_collective(kind, x, arg)`` (one without it
    cannot be made: abc refuses to instantiate it)."""

    rank: int
    size: int

    def __init__(self, rank, size):
        self.rank, self.size = rank, size
        self.counts, self.nbytes = Counter(), Counter()

    def reset_counts(self):
        self.counts.clear()
        self.nbytes.clear()

    def _count(self, kind, x):
        self.counts[kind] += 1
        self.nbytes[kind] += int(x.nbytes)

    def all_reduce(self, x):  # [...] -> [...]
        """sum_r x_r, the same on every rank."""
        self._count("all_reduce", x)
        return self._collective("all_reduce", x, None)

    def all_gather(self, x, axis=-1):  # [..., n, ...] -> [..., size * n, ...]
        """concatenate([x_0, ..., x_{R-1}], axis): every rank's x, in rank order."""
        self._count("all_gather", x)
        return self._collective("all_gather", x, axis % x.ndim)

    def broadcast(self, x, root=0):  # [...] -> [...]
        """x of rank ``root`` on every rank (the others pass an array of the same shape and dtype)."""
        if not 0 <= root < self.size:
            raise InputError(f"broadcast root {root} is not a rank of this communicator (size {self.size})")
        self._count("broadcast", x)
        return self._collective("broadcast", x, root)

    @abc.abstractmethod
    def _collective(self, kind, x, arg):  # -> the result of collective ``kind`` (KINDS) of this rank's x
        """Every rank's x combined as ``combine(kind, parts, arg)`` defines; ``arg`` is the gather axis or the
        broadcast root."""


def combine(kind, parts, arg):  # the R contributions (rank order) -> the result
    """What a collective computes from every rank's array: the one definition all implementations share."""
    if kind == "all_reduce":
        out = parts[0].copy()
        for p in parts[1:]:
            out += p
        return out
    if kind == "all_gather":
        return get_xp(parts[0]).concatenate(parts, axis=arg)
    return parts[arg].copy()


def check_same(kind_shapes, where):
    """InputError when the ranks did not call the same collective on arrays of one shape and dtype."""
    first = kind_shapes[0]
    for r, other in enumerate(kind_shapes):
        if other != first:
            raise InputError(f"{where}: rank {r} called {other[0]} on {other[1]} {other[2]} while rank 0 called "
                             f"{first[0]} on {first[1]} {first[2]}: every rank must run the same collectives")


# ------------------------------------------------------------------------------------------ in one process

class PeerFailed(BackendError):
    """Raised in a rank whose collective was broken off because another rank failed."""


class _Hub:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=BARRIER_TIMEOUT_S)
        self.slots = [None] * size


class LocalComm(Comm):
    """One endpoint of R simulated ranks; make them with ``LocalComm.group(R)`` and run them with run_ranks."""

    def __init__(self, rank, hub):
        super().__init__(rank, hub.size)
        self.hub = hub

    @classmethod
    def group(cls, size):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise InputError(f"LocalComm.group: size must be a positive integer number of ranks, got {size!r}")
        hub = _Hub(int(size))
        return [cls(r, hub) for r in range(size)]

    def _collective(self, kind, x, arg):
        hub = self.hub
        hub.slots[self.rank] = (kind, x)
        try:
            hub.barrier.wait()                       # every rank has contributed
            parts = list(hub.slots)
            check_same([(k, tuple(p.shape), str(p.dtype)) for k, p in parts], "LocalComm")
            out = combine(kind, [p for _, p in parts], arg)
            hub.barrier.wait()                       # every rank has read: the slots may be reused
        except threading.BrokenBarrierError:
            raise PeerFailed(f"LocalComm rank {self.rank}: another rank failed (or waited more than "
                             f"{BARRIER_TIMEOUT_S:.0f} s) during {kind}") from None
        except BaseException:
            hub.barrier.abort()
            raise
        return out


def run_ranks(comms, fn):
    """[fn(comm) for each rank], each rank in its own thread; the first real failure is raised here."""
    results, errors = [None] * len(comms), [None] * len(comms)

    def body(c):
        try:
            results[c.rank] = fn(c)
        except BaseException as exc:        # noqa: BLE001 - handed to the caller below
            errors[c.rank] = exc
            c.hub.barrier.abort()

    threads = [threading.Thread(target=body, args=(c,), name=f"rank-{c.rank}") for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [e for e in errors if e is not None]
    real = [e for e in failed if not isinstance(e, PeerFailed)]
    if failed:
        raise (real or failed)[0]
    return results


# ------------------------------------------------------------------------------------------ over processes

class ProcessComm(Comm):
    """One rank of a spawned group whose launching process relays collectives (parallel/launch.py): the rank
    sends ("collective", kind, x, arg) over its pipe and receives the combined result."""

    def __init__(self, rank, size, conn):
        super().__init__(rank, size)
        self.conn = conn

    def _collective(self, kind, x, arg):
        self.conn.send(("collective", kind, np.ascontiguousarray(x), arg))
        tag, value = self.conn.recv()
        if tag != "result":
            raise BackendError(f"ProcessComm rank {self.rank}: the launcher stopped the run ({value})")
        return value


# ------------------------------------------------------------------------------------------ NCCL

def nccl_module():
    """``cupy.cuda.nccl`` (BackendError naming the package when cupy or its NCCL binding is missing)."""
    try:
        from cupy.cuda import nccl          # import cupy alone does not expose cupy.cuda.nccl
    except ImportError as exc:
        raise BackendError(f"NCCL needs cupy with its NCCL binding ({exc}); install the gpu-cuda12 or "
                           "gpu-cuda13 extra, which brings nvidia-nccl-cu12 / nvidia-nccl-cu13") from None
    if not getattr(nccl, "available", True):
        raise BackendError("cupy.cuda.nccl is not available: CuPy found no NCCL library (install "
                           "nvidia-nccl-cu12 or nvidia-nccl-cu13, the wheel CuPy loads)")
    return nccl


def nccl_dtype(nccl, dtype):
    table = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64, "float16": nccl.NCCL_FLOAT16,
             "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64, "uint8": nccl.NCCL_UINT8}
    name = np.dtype(dtype).name
    if name not in table:
        raise InputError(f"NCCL collective on dtype {name}: expected one of {sorted(table)}")
    return table[name]


class NcclComm(Comm):
    """Rank ``rank`` of ``size``, one GPU per process: ``NcclCommunicator(size, uid, rank)`` under
    ``cupy.cuda.Device(device)``, collectives on the current (legacy default) stream. ``uid`` is what rank 0's
    ``nccl.get_unique_id()`` returned, handed to every rank by the launcher."""

    def __init__(self, rank, size, uid, device=None, cupy=None, nccl=None):
        super().__init__(rank, size)
        if cupy is None:
            import cupy
        self.cp, self.nccl = cupy, nccl or nccl_module()
        device = rank if device is None else device
        visible = cupy.cuda.runtime.getDeviceCount()
        if device >= visible:
            raise BackendError(f"NCCL rank {rank} of {size} needs GPU {device}, but {visible} GPU(s) are visible: "
                               "one GPU per rank (NCCL refuses two ranks on one device)")
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self.communicator = self.nccl.NcclCommunicator(size, uid, rank)

    @property
    def version(self) -> int:
        """NCCL's version code, e.g. 22703 for 2.27.3 (log it: a stale system NCCL can shadow the wheel)."""
        return int(self.nccl.get_version())

    def _collective(self, kind, x, arg):
        cp, c = self.cp, self.communicator
        host = isinstance(x, np.ndarray)
        send = cp.ascontiguousarray(cp.asarray(x))               # host arrays are staged through the device
        dt, n = nccl_dtype(self.nccl, send.dtype), send.size
        stream = cp.cuda.get_current_stream().ptr
        if kind == "all_reduce":
            out = cp.empty_like(send)
            c.allReduce(send.data.ptr, out.data.ptr, n, dt, self.nccl.NCCL_SUM, stream)
        elif kind == "broadcast":
            out = cp.empty_like(send)
            c.broadcast(send.data.ptr, out.data.ptr, n, dt, arg, stream)
        else:
            recv = cp.empty((self.size, *send.shape), dtype=send.dtype)   # NCCL lays the ranks out one by one
            c.allGather(send.data.ptr, recv.data.ptr, n, dt, stream)
            out = cp.concatenate(list(recv), axis=arg)
        return cp.asnumpy(out) if host else out

    def close(self):
        self.communicator.destroy()
