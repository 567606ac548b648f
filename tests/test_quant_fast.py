"""The fused CPU GEMV (ops/quant_numba.py, dispatched by ops/quant_fast.py) against quant.py's NumPy tiles.

- Every format (float32, BF16, FP8, NVFP4), m = 1..9 rows of x (the kernel runs up to GEMV_ROWS = 4, the
  tiles above), shapes crossing the kernel's 128-input lanes and 64-row tasks and the 16-input NVFP4 block,
  with non-multiples: within ("quant_matmul", float32) of the reference, shape and dtype first.
- One kernel for every format: a packed weight gives bitwise the y the float32 kernel gives on its decoded
  values, so "stored" and "float32" models give bitwise the same logits (checked on a BF16 checkpoint).
- More than GEMV_ROWS rows run the reference's tiles with Numba-decoded tiles: bitwise the reference's y.
- The rule: float64, non-contiguous weights, NEMO_SCRATCH_CPU_KERNELS=0 and a missing numba run the reference
  itself (bitwise its result); errors are the reference's.
"""

import contextlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_close

import nemo_scratch
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.checkpoint.safetensors_io import float32_to_bf16
from nemo_scratch.config import preset
from nemo_scratch.errors import DtypeError, ShapeError
from nemo_scratch.ops import quant, quant_fast
from nemo_scratch.oracle.strategies import crossing

numba_kernels = pytest.importorskip("nemo_scratch.ops.quant_numba", reason="the CPU kernels need numba (dev extra)")
LANES, TASK_ROWS = numba_kernels.LANES, numba_kernels.TASK_ROWS
FORMATS = ("float32", "bf16", "fp8", "nvfp4")


@contextlib.contextmanager
def counting():
    """Yields the list of the kernel launches' formats, one entry a launch (the real kernel still runs)."""
    count, real = [], numba_kernels.gemv

    def counted(*args):
        count.append(args[0])
        return real(*args)

    numba_kernels.gemv = counted
    try:
        yield count
    finally:
        numba_kernels.gemv = real


@pytest.fixture
def calls():
    with counting() as count:
        yield count


def weight(fmt, out, inn, seed, dense_dtype=np.float32):
    """(fast(x), reference(x), W decoded to float32 [out, inn]) for a random weight stored as ``fmt`` (a plain
    float weight in ``dense_dtype``)."""
    w = np.random.default_rng(seed).standard_normal((out, inn), dtype=np.float32)
    if fmt == "float32":
        w = w.astype(dense_dtype)
        return (lambda x: quant_fast.dense_matmul_fast(x, w)), (lambda x: quant.dense_matmul(x, w)), w
    if fmt == "bf16":
        bits = float32_to_bf16(w)
        return (lambda x: quant_fast.bf16_matmul_fast(x, bits)), (lambda x: quant.bf16_matmul(x, bits)), \
            quant.bf16_decode(bits)
    if fmt == "fp8":
        q = quant.fp8_quantize(w)
        return (lambda x: quant_fast.fp8_matmul_fast(x, q.data, q.scale)), \
            (lambda x: quant.fp8_matmul(x, q.data, q.scale)), quant.fp8_dequantize(q.data, q.scale)
    q = quant.nvfp4_quantize(w)
    args = (q.packed, q.block_scale, q.global_scale)
    return (lambda x: quant_fast.nvfp4_matmul_fast(x, *args)), (lambda x: quant.nvfp4_matmul(x, *args)), \
        quant.nvfp4_dequantize(*args)


def bits(a):
    return np.asarray(a).view(np.uint32)


@given(fmt=st.sampled_from(FORMATS), m=st.integers(1, 9), out=crossing(1, 140, TASK_ROWS),
       inn=crossing(1, 300, LANES, 16), lead=st.booleans(), seed=st.integers(0, 2**16))
@example(fmt="bf16", m=1, out=65, inn=129, lead=False, seed=0)      # one row past a task and a lane chunk
@example(fmt="nvfp4", m=8, out=64, inn=272, lead=True, seed=1)      # a ragged last chunk of 16 inputs
@example(fmt="fp8", m=9, out=3, inn=128, lead=False, seed=2)        # 9 rows: the tiles
def test_kernel_matches_the_reference_and_the_float32_kernel(fmt, m, out, inn, lead, seed):
    if fmt == "nvfp4":
        inn = 16 * -(-inn // 16)
    fast, reference, decoded = weight(fmt, out, inn, seed)
    x = np.random.default_rng(seed + 1).standard_normal((1, m, inn) if lead else (m, inn), dtype=np.float32)
    with counting() as calls:
        y = fast(x)
    assert y.shape == (*x.shape[:-1], out) and y.dtype == np.float32
    assert_close(y, reference(x), "quant_matmul", np.float32, what=f"{fmt} m={m} [{out} x {inn}]")
    assert len(calls) == (1 if m <= quant_fast.GEMV_ROWS else 0)
    if m <= quant_fast.GEMV_ROWS:
        # the same kernel on the decoded float32 weight: bitwise the same y (the same products, the same sums)
        assert np.array_equal(bits(y), bits(quant_fast.dense_matmul_fast(x, decoded)))
    else:
        # the reference's tiles and BLAS calls on Numba-decoded tiles (the same values): its y, bit for bit
        assert np.array_equal(bits(y), bits(reference(x)))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_non_finite_weights_land_where_the_reference_puts_them(calls):
    w = np.random.default_rng(0).standard_normal((70, 200), dtype=np.float32)
    w[3, 5], w[10, 150], w[69, 199] = np.inf, -np.inf, np.nan
    w[20, 0], w[20, 1] = np.inf, -np.inf                                # inf - inf: NaN in any order
    b = float32_to_bf16(w)
    x = np.random.default_rng(1).standard_normal((2, 200), dtype=np.float32)
    y = quant_fast.bf16_matmul_fast(x, b)
    assert calls and not np.isfinite(y[:, [3, 10, 20, 69]]).any() and np.isnan(y[:, 69]).all()
    assert_close(y, quant.bf16_matmul(x, b), "quant_matmul", np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float64_more_rows_and_the_switch_run_the_reference_itself(calls, monkeypatch, fmt):
    rng = np.random.default_rng(4)
    for x in (rng.standard_normal((2, 64)), rng.standard_normal((9, 64)).astype(np.float32)):
        fast, reference, _ = weight(fmt, 40, 64, 3, dense_dtype=x.dtype)
        assert np.array_equal(fast(x), reference(x)) and fast(x).dtype == x.dtype
    assert not calls
    x = rng.standard_normal((1, 64)).astype(np.float32)
    monkeypatch.setattr(quant_fast, "ENABLED", False)                   # NEMO_SCRATCH_CPU_KERNELS=0
    assert np.array_equal(fast(x), reference(x))
    monkeypatch.setattr(quant_fast, "ENABLED", True)
    monkeypatch.setattr(quant_fast, "_KERNEL", [None])                  # numba missing
    assert np.array_equal(fast(x), reference(x)) and not calls


def test_memory_mapped_weights_run_the_kernel_and_strided_ones_the_reference(calls, tmp_path):
    w = float32_to_bf16(np.random.default_rng(5).standard_normal((130, 260), dtype=np.float32))
    w.tofile(tmp_path / "w.bin")
    mapped = np.memmap(tmp_path / "w.bin", dtype=np.uint16, mode="r", shape=w.shape)
    x = np.random.default_rng(6).standard_normal((1, 260), dtype=np.float32)
    assert np.array_equal(quant_fast.bf16_matmul_fast(x, mapped), quant_fast.bf16_matmul_fast(x, w))
    assert len(calls) == 2
    strided = w[:, ::2]                                                 # not C-contiguous: the tiles
    assert np.array_equal(quant_fast.bf16_matmul_fast(x[:, :130], strided), quant.bf16_matmul(x[:, :130], strided))
    assert len(calls) == 2


def test_errors_are_the_references():
    b = float32_to_bf16(np.ones((4, 32), np.float32))
    for fast, ref in ((quant_fast.bf16_matmul_fast, quant.bf16_matmul), (quant_fast.dense_matmul_fast,
                                                                         quant.dense_matmul)):
        w = b if fast is quant_fast.bf16_matmul_fast else np.ones((4, 32), np.float32)
        for x, error in ((np.ones((1, 31), np.float32), ShapeError), (np.ones((1, 32), np.int64), DtypeError)):
            with pytest.raises(error) as want:
                ref(x, w)
            with pytest.raises(error, match=re.escape(str(want.value))):
                fast(x, w)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A BF16 checkpoint whose widths cross the kernel's lanes (d = 512, in_proj 2 x 1024 + ...)."""
    cfg = preset("small", hybrid_override_pattern="M*E", num_nextn_predict_layers=0)
    return make_random_checkpoint(tmp_path_factory.mktemp("gemv") / "small", cfg, seed=3)


def test_stored_and_float32_models_give_bitwise_the_same_logits(calls, bf16_checkpoint):
    stored = nemo_scratch.load(bf16_checkpoint, weights="stored")
    upcast = nemo_scratch.load(bf16_checkpoint, weights="float32")
    ids = np.random.default_rng(7).integers(0, stored.cfg.vocab_size, size=(1, 20))
    caches = stored.new_cache(1), upcast.new_cache(1)
    for part in (ids[:, :3], ids[:, 3:17]):                            # 3 rows: the kernel; 14: the tiles
        a, b = stored.forward(part, caches[0]), upcast.forward(part, caches[1])
        assert a.dtype == b.dtype == np.float32 and np.array_equal(bits(a), bits(b))
    for tok in ids[0, 17:]:                                            # batch-1 decode steps: the kernel
        a, b = stored.forward([[tok]], caches[0]), upcast.forward([[tok]], caches[1])
        assert np.array_equal(bits(a), bits(b))
    assert {numba_kernels.BF16, numba_kernels.DENSE} <= set(calls)     # both modes ran the kernel


def test_without_numba_the_bundled_model_runs_on_the_tiles():
    code = ("import sys; sys.modules['numba'] = None\n"
            "import nemo_scratch\nfrom nemo_scratch.ops import quant_fast\n"
            "out = nemo_scratch.load().generate([1, 2, 3], 4)\n"
            "assert quant_fast.kernel_module() is None and len(out.ids[0]) == 4, out.ids\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_thread_pools_default_to_sleeping_when_idle_and_keep_a_users_setting():
    # docs/backends.md "CPU: the numpy backend's decode kernels": OpenBLAS's and OpenMP's idle threads would
    # otherwise spin on the cores the other pool needs
    code = ("import os\nimport nemo_scratch\nfrom nemo_scratch.ops import quant_fast\nquant_fast.kernel_module()\n"
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], os.environ['OMP_WAIT_POLICY'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY")}
    for preset_env, want in (({}, "4 PASSIVE"), ({"OPENBLAS_THREAD_TIMEOUT": "12", "OMP_WAIT_POLICY": "ACTIVE"},
                                                  "12 ACTIVE")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**env, **preset_env})
        assert proc.returncode == 0 and proc.stdout.split() == want.split(), proc.stderr[-2000:]
