"""The launcher of a sharded model: one spawned worker process per rank (per GPU under NCCL).

    model = LaunchedModel("ckpt/", tp=8, backend="cupy")       # what ``nemo-scratch generate --tp 8`` uses
    result = model.generate(ids, 64)                             # rank 0's GenerationResult

Each call starts R workers with multiprocessing's ``spawn`` (a fresh interpreter: never ``fork`` a process
that may hold a CUDA context), and each worker

1. joins the group: NCCL (GPU backends): rank 0 makes ``nccl.get_unique_id()``, the launcher hands it to the
   other ranks, and each builds ``NcclCommunicator(R, uid, rank)`` under ``cupy.cuda.Device(rank)``; or
   ProcessComm (the numpy backend, CPUs): the launcher itself relays every collective;
2. reads the checkpoint in "stored" mode (memory-mapped: a rank reads only the rows and columns it keeps),
   cuts its shard (shard.py) and moves only that to its device;
3. receives the token ids from rank 0 by broadcast (the launching process tokenizes, holds no weights and
   never touches CUDA; it hands the ids to rank 0 alone), runs the job, and rank 0 sends the result (and,
   while generating, each new token) back to the launcher.

Environment for NCCL: CuPy with its NCCL binding and the NCCL runtime from the nvidia-nccl-cu12 /
nvidia-nccl-cu13 wheel (the gpu-cuda12 / gpu-cuda13 extras), one visible GPU per rank, and no stale system
libnccl ahead of the wheel on the library path (``NcclComm.version`` reports the one loaded).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from .. import errors
from ..errors import BackendError, InputError, NemoScratchError
from .comm import NcclComm, ProcessComm, check_same, combine, nccl_module
from .shard import Layout, check_layout

COMMS = ("auto", "nccl", "process")


def comm_kind(comm, backend):
    """NCCL for the GPU backends, the launcher-relayed ProcessComm for numpy, unless ``comm`` says."""
    if comm not in COMMS:
        raise InputError(f"comm must be one of {COMMS}, got {comm!r}")
    if comm == "auto":
        return "process" if backend == "numpy" else "nccl"
    return comm


# ------------------------------------------------------------------------------------------ the worker

def share_ids(comm, ids):  # rank 0: [b,t] int64; other ranks: None -> [b,t] on every rank
    """Rank 0's token ids on every rank: the shape, then the ids (two broadcasts)."""
    shape = np.array(ids.shape if comm.rank == 0 else (0, 0), dtype=np.int64)
    shape = tuple(int(s) for s in comm.broadcast(shape, 0))
    mine = ids if comm.rank == 0 else np.zeros(shape, dtype=np.int64)
    return comm.broadcast(np.ascontiguousarray(mine, dtype=np.int64), 0)


def load_rank(path, layout, comm, backend="numpy", dtype="float32", dt_floor="config"):
    """This rank's RankModel, read from the checkpoint at ``path`` in stored (memory-mapped) form."""
    from ..checkpoint import load_tensors
    from ..model.weights import build_params
    from .tensor import RankModel

    cfg, tensors, info = load_tensors(path, dtype=dtype, weights="stored")
    params = build_params(cfg, tensors, dtype=np.dtype(info["dtype"]))
    return RankModel.from_params(cfg, params, layout, comm, backend=backend, dt_floor=dt_floor, info=info)


def _join(rank, size, conn, kind):
    if kind == "process":
        return ProcessComm(rank, size, conn)
    nccl = nccl_module()
    if rank == 0:
        uid = nccl.get_unique_id()
        conn.send(("uid", uid))
    else:
        _, uid = conn.recv()
    return NcclComm(rank, size, uid)


def _worker(rank, size, conn, spec):
    """One rank: join, load, run the job, report (spawned: everything arrives pickled in ``spec``)."""
    try:
        comm = _join(rank, size, conn, spec["comm"])
        model = load_rank(spec["path"], spec["layout"], comm, spec["backend"], spec["dtype"], spec["dt_floor"])
        ids = share_ids(comm, spec["ids"] if rank == 0 else None)
        comm.reset_counts()
        kwargs = dict(spec["kwargs"])
        if spec["job"] == "forward":
            out = model.forward(ids, **kwargs)
        else:
            if rank == 0 and spec["stream"]:
                kwargs["on_token"] = lambda new: conn.send(("token", new))
            out = model.generate(ids, **kwargs)
        info = {"counts": dict(comm.counts), "nbytes": dict(comm.nbytes)}
        if isinstance(comm, NcclComm):
            info["nccl_version"] = comm.version
        conn.send(("done", (out if rank == 0 else None, info)))
    except NemoScratchError as exc:
        conn.send(("error", (type(exc).__name__, str(exc))))
    except BaseException:                         # noqa: BLE001 - reported to the launcher, which raises
        conn.send(("error", ("crash", traceback.format_exc())))


# ------------------------------------------------------------------------------------------ the launcher

def launch(spec, size, on_token=None):
    """Run ``spec`` on ``size`` spawned ranks; -> (rank 0's result, [per-rank info]). Errors are re-raised
    here as the nemo_scratch.errors class a rank raised."""
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(size)]
    # the ids go to rank 0 alone, which broadcasts them
    procs = [ctx.Process(target=_worker, args=(r, size, child, dict(spec, ids=spec["ids"] if r == 0 else None)),
                         name=f"nemo-scratch-rank-{r}", daemon=True) for r, (_, child) in enumerate(pipes)]
    for p in procs:
        p.start()
    conns = [parent for parent, _ in pipes]
    for _, child in pipes:
        child.close()
    try:
        return _serve(conns, procs, on_token)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=30)


def _serve(conns, procs, on_token):
    size = len(conns)
    result, infos, pending = None, [None] * size, {}
    live = {conns[r]: r for r in range(size)}
    while live:
        for conn in wait(list(live) + [p.sentinel for p in procs if p.is_alive()], timeout=5.0):
            r = live.get(conn)
            if r is None:                               # a process ended: its last words are read below
                continue
            try:
                tag, *body = conn.recv()
            except EOFError:
                raise BackendError(f"rank {r} exited (code {procs[r].exitcode}) without reporting") from None
            if tag == "uid":                            # NCCL: rank 0's unique id for every other rank
                for other in conns[1:]:
                    other.send(("uid", body[0]))
            elif tag == "token":
                if on_token:
                    on_token(body[0])
            elif tag == "collective":                   # ProcessComm: wait for every rank, then combine
                pending[r] = body
                if len(pending) == size:
                    calls = [pending[k] for k in range(size)]
                    check_same([(k, tuple(x.shape), str(x.dtype)) for k, x, _ in calls], "ProcessComm")
                    out = combine(calls[0][0], [x for _, x, _ in calls], calls[0][2])
                    for c in conns:
                        c.send(("result", out))
                    pending.clear()
            elif tag == "done":
                out, infos[r] = body[0]
                result = out if r == 0 else result
                del live[conn]
            else:                                       # "error": (class name, message)
                name, message = body[0]
                cls = getattr(errors, name, None)
                if isinstance(cls, type) and issubclass(cls, NemoScratchError):
                    raise cls(message)
                raise BackendError(f"rank {r} failed: {message.strip().splitlines()[-1]}\n{message}")
        for r, p in enumerate(procs):
            if conns[r] in live and not p.is_alive() and not conns[r].poll():
                raise BackendError(f"rank {r} exited (code {p.exitcode}) without reporting")
    return result, infos


class LaunchedModel:
    """The Model API (forward, generate, tokenizer, path, cfg) over R spawned ranks, one run per call."""

    def __init__(self, path=None, tp=None, ep=None, backend="numpy", dtype="float32", dt_floor="config", comm="auto",
                 assign="contiguous"):
        from .. import DEFAULT_CHECKPOINT
        from ..config import NemotronConfig
        from ..model.tokenizer import load_tokenizer

        self.path = Path(DEFAULT_CHECKPOINT if path is None else path)
        self.cfg = NemotronConfig.from_json(self.path)
        layout = Layout.of(1 if tp is None else tp, 1 if ep is None else ep, assign)
        self.layout = check_layout(self.cfg, layout)                # refuse before spawning anything
        self.backend, self.dtype, self.dt_floor = backend, dtype, dt_floor
        self.comm = comm_kind(comm, backend)
        self.tokenizer = load_tokenizer(self.path, self.cfg)
        self.last_run = None        # per-rank collectives and bytes of the last call (+ NCCL version)

    def _run(self, job, ids, kwargs, on_token=None):
        ids = np.asarray(ids, dtype=np.int64)
        spec = {"job": job, "path": str(self.path), "layout": self.layout, "comm": self.comm,
                "backend": self.backend, "dtype": self.dtype, "dt_floor": self.dt_floor,
                "ids": ids if ids.ndim == 2 else ids[None, :], "kwargs": kwargs, "stream": on_token is not None}
        start = time.perf_counter()
        out, infos = launch(spec, self.layout.ranks, on_token)
        self.last_run = {"seconds": time.perf_counter() - start, "ranks": infos}
        return out

    def forward(self, ids, last_only=False, prefill_chunk=None):  # [b,t] -> [b,t,v] (rank 0's logits)
        return self._run("forward", ids, {"last_only": last_only, "prefill_chunk": prefill_chunk})

    __call__ = forward

    def generate(self, ids, max_new_tokens, on_token=None, **kwargs):
        """Model.generate's arguments; rank 0's GenerationResult (its timings exclude spawning and loading)."""
        return self._run("generate", ids, {"max_new_tokens": max_new_tokens, **kwargs}, on_token)

    def __repr__(self):
        return f"LaunchedModel({self.path}, {self.layout.label}, backend={self.backend}, comm={self.comm})"
