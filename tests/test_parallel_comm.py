"""The collectives (nemo_scratch/parallel/comm.py), the spawn launcher (parallel/launch.py, the CLI's --tp/--ep)
and the modelled per-token cost (parallel/tensor_cost.py) with the figures the docs print.

NcclComm runs here over a stand-in for ``cupy`` and ``cupy.cuda.nccl`` that moves bytes between raw pointers
as NCCL would (ranks are threads), so its pointer, count, dtype and layout handling is checked on CPUs; the
real library is exercised by tests/test_parallel_gpu.py on a GPU."""

import contextlib
import ctypes
import io
import json
import re
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from tolerances import assert_close

import nemo_scratch
from nemo_scratch import cli
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import BackendError, InputError, PlanError
from nemo_scratch.parallel.comm import Comm, LocalComm, NcclComm, PeerFailed, run_ranks
from nemo_scratch.parallel.launch import LaunchedModel
from nemo_scratch.parallel.shard import Layout
from nemo_scratch.parallel.tensor import RankModel
from nemo_scratch.parallel.tensor_cost import expected_max_experts, format_modelled, modelled_decode

ROOT = Path(__file__).resolve().parent.parent
PROMPT = np.array([[5, 77, 3, 201, 18]])


def test_local_collectives_combine_in_rank_order_and_count():
    comms = LocalComm.group(3)

    def body(c):
        x = np.full((2, 2), c.rank + 1.0) / 3.0
        s = c.all_reduce(x)
        g0 = c.all_gather(np.full((1, 2), c.rank), axis=0)
        g1 = c.all_gather(np.full((2, 1), c.rank), axis=-1)
        b = c.broadcast(np.array([7 * c.rank]), root=2)
        return s, g0, g1, b

    outs = run_ranks(comms, body)
    s, g0, g1, b = outs[0]
    assert s.shape == (2, 2) and s.dtype == np.float64
    np.testing.assert_array_equal(s, (np.full((2, 2), 1 / 3) + 2 / 3) + 3 / 3)   # rank order, every rank
    assert all(np.array_equal(o[0], s) for o in outs)
    np.testing.assert_array_equal(g0, [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(g1, [[0, 1, 2], [0, 1, 2]])
    assert b.tolist() == [14] and all(o[3].tolist() == [14] for o in outs)
    assert comms[1].counts == {"all_reduce": 1, "all_gather": 2, "broadcast": 1}
    assert comms[1].nbytes["all_reduce"] == 32


def test_local_failures_reach_the_caller_without_hanging():
    comms = LocalComm.group(2)

    def body(c):
        if c.rank == 1:
            raise InputError("rank 1 refuses")
        return c.all_reduce(np.ones(3))

    with pytest.raises(InputError, match="rank 1 refuses"):
        run_ranks(comms, body)
    comms = LocalComm.group(2)
    mismatched = (lambda c: c.all_reduce(np.ones(3)) if c.rank == 0 else c.all_gather(np.ones(3)))
    with pytest.raises(InputError, match=r"rank 1 called all_gather on \(3,\) float64 while rank 0 called all_reduce"):
        run_ranks(comms, mismatched)
    with pytest.raises(InputError, match="size must be a positive integer"):
        LocalComm.group(0)
    with pytest.raises(InputError, match="broadcast root 2 is not a rank"):
        LocalComm.group(1)[0].broadcast(np.ones(1), root=2)
    assert issubclass(PeerFailed, BackendError)


# ------------------------------------------------------------------------------------------ NCCL's interface

class _Dev(np.ndarray):
    """A stand-in device array: ``.data.ptr`` is its address, as on a CuPy array."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def fake_cupy():
    dev = (lambda a: np.asarray(a).view(_Dev))
    return types.SimpleNamespace(
        asarray=dev, ascontiguousarray=lambda a: dev(np.ascontiguousarray(a)), concatenate=np.concatenate,
        empty_like=lambda a: dev(np.empty_like(a)), empty=lambda s, dtype: dev(np.empty(s, dtype)),
        asnumpy=lambda a: np.array(a), cuda=types.SimpleNamespace(
            Device=lambda k: types.SimpleNamespace(id=k, use=lambda: None),
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
            get_current_stream=lambda: types.SimpleNamespace(ptr=0)))


def fake_nccl(size):
    """NcclCommunicator over threads: reads ``count`` elements at each send pointer, writes the result at recv."""
    codes = {"float32": 7, "float64": 8, "float16": 6, "int32": 2, "int64": 4, "uint8": 1}
    dtypes = {v: np.dtype(k) for k, v in codes.items()}
    barrier, slots = threading.Barrier(size, timeout=60), [None] * size

    def read(ptr, count, dt):
        return np.frombuffer(ctypes.string_at(ptr, count * dtypes[dt].itemsize), dtype=dtypes[dt]).copy()

    class Communicator:
        def __init__(self, n, uid, rank):
            assert (n, uid) == (size, b"uid")
            self.rank = rank

        def _exchange(self, send, count, dt):
            slots[self.rank] = read(send, count, dt)
            barrier.wait()
            parts = list(slots)
            barrier.wait()
            return parts

        def allReduce(self, send, recv, count, dt, op, stream):
            parts = self._exchange(send, count, dt)
            out = parts[0].copy()
            for part in parts[1:]:
                out += part
            ctypes.memmove(recv, out.ctypes.data, out.nbytes)

        def allGather(self, send, recv, count, dt, stream):
            out = np.concatenate(self._exchange(send, count, dt))
            ctypes.memmove(recv, out.ctypes.data, out.nbytes)

        def broadcast(self, send, recv, count, dt, root, stream):
            out = self._exchange(send, count, dt)[root]
            ctypes.memmove(recv, out.ctypes.data, out.nbytes)

    return types.SimpleNamespace(NcclCommunicator=Communicator, NCCL_SUM=0, get_version=lambda: 22703,
                                 **{f"NCCL_{k.upper()}": v for k, v in codes.items()})


def run_threads(fn, size):
    """[fn(r) for r in range(size)], each rank in a thread (the stand-in's collectives wait for all)."""
    out = [None] * size
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r))) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def nccl_group(size):
    nccl, cupy = fake_nccl(size), fake_cupy()
    return [NcclComm(r, size, b"uid", cupy=cupy, nccl=nccl) for r in range(size)]


def test_nccl_comm_calls_and_layout():
    comms = nccl_group(2)
    assert comms[0].version == 22703

    def body(c):
        x = np.arange(6, dtype=np.float32).reshape(2, 3) * (c.rank + 1)
        return (c.all_reduce(x), c.all_gather(x, axis=-1), c.all_gather(x[None], axis=0),
                c.broadcast(np.array([c.rank + 5], dtype=np.int64), root=1))

    s, g, g0, b = run_threads(lambda r: body(comms[r]), 2)[1]
    assert s.dtype == np.float32 and isinstance(s, np.ndarray)
    np.testing.assert_array_equal(s, np.arange(6).reshape(2, 3) * 3)
    np.testing.assert_array_equal(g, np.concatenate([np.arange(6).reshape(2, 3), 2 * np.arange(6).reshape(2, 3)], 1))
    assert g0.shape == (2, 2, 3) and b.tolist() == [6]
    with pytest.raises(InputError, match="NCCL collective on dtype complex128"):
        comms[0].all_reduce(np.ones(2, dtype=np.complex128))
    with pytest.raises(BackendError, match="NCCL rank 2 of 4 needs GPU 2, but 2 GPU"):
        NcclComm(2, 4, b"uid", cupy=fake_cupy(), nccl=fake_nccl(4))


def test_the_rank_code_runs_unchanged_over_the_nccl_interface(tmp_path):
    cfg = preset("tiny")
    path = make_random_checkpoint(tmp_path / "tiny", cfg, seed=5)
    ref = nemo_scratch.load(path, dtype="float64", weights="stored")
    comms = nccl_group(2)
    from nemo_scratch.parallel.launch import load_rank

    ranks = [load_rank(path, Layout.of(tp=2, ep=2), c, dtype="float64") for c in comms]   # no collective yet
    assert all(isinstance(m, RankModel) for m in ranks)
    outs = run_threads(lambda r: (ranks[r].forward(PROMPT), ranks[r].generate(PROMPT[0], 4).ids), 2)
    assert_close(outs[0][0], ref.forward(PROMPT), "sharded_model", what="TP2+EP2 over the NCCL interface")
    np.testing.assert_array_equal(outs[1][1], ref.generate(PROMPT[0], 4).ids)


# ------------------------------------------------------------------------------------------ the launcher

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("launch") / "tiny", preset("tiny"), seed=6)


def test_launcher_spawns_ranks_and_streams_rank_zeros_tokens(tiny_ckpt):
    model = LaunchedModel(tiny_ckpt, tp=2, dtype="float64")
    ref = nemo_scratch.load(tiny_ckpt, dtype="float64")
    assert model.comm == "process" and model.layout.label == "TP2"
    assert_close(model.forward(PROMPT), ref.forward(PROMPT), "sharded_model", what="launched TP2")
    ranks = model.last_run["ranks"]
    assert len(ranks) == 2 and ranks[0]["counts"] == ranks[1]["counts"] == {"all_reduce": 7, "all_gather": 1}
    seen = []
    res = model.generate(PROMPT[0], 6, mtp=True, draft_depth=2, on_token=seen.extend)
    np.testing.assert_array_equal(res.ids, ref.generate(PROMPT[0], 6).ids)
    assert seen == res.ids[0].tolist()
    with pytest.raises(InputError, match=r"token id 999 is outside the vocabulary \[0, 256\)"):
        model.forward([[1, 999]])                 # raised in the workers, re-raised here as the same class


def test_cli_tp_and_ep(tiny_ckpt):
    def run(*extra):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["generate", "--checkpoint", str(tiny_ckpt), "--ids", "1,5,9", "--max-new-tokens", "5",
                             "--json", *extra])
        return code, out.getvalue(), err.getvalue()

    code, plain, _ = run()
    code_tp, parallel, _ = run("--tp", "2", "--ep", "2")
    assert (code, code_tp) == (0, 0) and json.loads(parallel)["ids"] == json.loads(plain)["ids"]
    code, _, err = run("--tp", "3")
    assert code == 2 and err.strip() == "error: config field 'mamba_num_heads' = 4 cannot be split over R = 3 " \
                                        "ranks: R must divide it"
    code, _, err = run("--tp", "0")
    assert code == 2 and "tp must be a positive integer" in err


# ------------------------------------------------------------------------------------------ the modelled cost

def test_expected_max_experts_is_exact():
    from itertools import combinations

    for n, k, r in ((8, 3, 4), (8, 2, 2), (6, 4, 3)):
        per = n // r
        draws = [max(sum(1 for x in c if x // per == g) for g in range(r)) for c in combinations(range(n), k)]
        assert expected_max_experts(n, k, r) == pytest.approx(np.mean(draws), abs=1e-12)
    assert expected_max_experts(512, 22, 8) == pytest.approx(5.2365, abs=1e-4)


def test_modelled_ultra_figures_are_the_documented_ones():
    cfg = preset("ultra")
    for doc in ("docs/parallel.md", "docs/benchmarks.md"):
        text = (ROOT / doc).read_text()
        for label, layout in (("TP8", Layout.of(tp=8)), ("TP8+EP8", Layout.of(8, 8))):
            report = modelled_decode(cfg, "ultra", layout)
            block = re.search(rf"<!-- modelled {re.escape(label)} -->\n(.*?)\n<!-- end -->", text, re.S)
            assert block, f"{doc}: no modelled {label} table"
            assert format_modelled(report) in block.group(1), f"{doc}: the {label} rows differ from modelled_decode"
            assert f"{report['collectives']['all_reduce']} all-reduces" in block.group(1)
    with pytest.raises(PlanError, match="'mamba_num_heads' = 256 cannot be split over R = 3"):
        modelled_decode(cfg, "ultra", Layout.of(tp=3))


def test_a_communicator_without_its_collective_cannot_be_made():
    class Half(Comm):      # counts, but never says how ranks combine
        pass

    with pytest.raises(TypeError, match="_collective"):
        Half(0, 1)
