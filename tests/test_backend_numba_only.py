"""What only the numba backend has: its one device decode of E2M1/E4M3 codes, the shrunk key tiles of its
attention kernel, head dims past cupy's limit of 256, the PTX it compiles to, and the shape table's
boundaries checked against its launch sizes.

Kernels: nemo_scratch/backends/numba_cuda/{quant,attention,moe,runtime}.py. Each test runs twice
(gpu_harness.MODES): ``sim`` with tiny shapes on the CUDA simulator, ``gpu`` with realistic shapes on a device.
The simulator runs Python, so it cannot catch numba typing errors (or float64 creeping into a kernel):
test_kernels_compile_for_sm90 compiles every kernel to PTX for sm_90 without a GPU, in a subprocess. The
behaviour the numba backend shares with cupy is tested in tests/test_backend_{core,quant,mamba,contract}.py.
"""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from gpu_harness import MODES, SIMULATOR, arrays, boundaries, numba_backend, run
from tolerances import assert_close

from nemo_scratch.backends.numba_cuda import attention as attn_k
from nemo_scratch.backends.numba_cuda import moe as moe_k
from nemo_scratch.backends.numba_cuda import quant as quant_k
from nemo_scratch.backends.numba_cuda import runtime
from nemo_scratch.errors import InputError
from nemo_scratch.ops import attention, quant


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("mode", MODES)
def test_decode_every_code_bit_exact(mode):
    """The device decode every numba kernel calls, over all 256 E4M3 codes and the 16 E2M1 codes."""
    be = numba_backend()
    codes = np.arange(256, dtype=np.uint8)
    e4m3 = run(be, quant_k.e4m3_decode_numba, codes)
    ref = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)  # the independent oracle
    nan = np.isin(codes, [0x7F, 0xFF])
    assert e4m3.dtype == np.float32 and np.all(np.isnan(e4m3[nan])) and not np.any(np.isnan(e4m3[~nan]))
    assert np.array_equal(bits(e4m3[~nan]), bits(ref[~nan]))  # signed zeros and all 7 subnormals included
    assert np.array_equal(bits(e4m3[~nan]), bits(quant.e4m3_decode(codes)[~nan]))
    e2m1 = run(be, quant_k.e2m1_decode_numba, codes[:16].reshape(4, 4))
    assert e2m1.shape == (4, 4)
    assert np.array_equal(bits(e2m1.reshape(-1)), bits(quant.e2m1_decode(codes[:16])))
    with pytest.raises(InputError):
        be.e2m1_decode(be.asarray(codes))  # codes above 15 are not E2M1 (the bound op checks first)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tile_k", [1, 3])
def test_attention_shrunk_key_tiles(mode, tile_k, monkeypatch):
    """A large head dim gets fewer keys a tile (shared memory): forced here with a smaller budget."""
    b, t, s, nq, nkv, dh = (1, 5, 7, 4, 2, 3) if mode == "sim" else (2, 40, 300, 16, 2, 256)
    monkeypatch.setattr(attn_k, "SMEM_LIMIT_BYTES", 2 * 4 * dh * tile_k)
    assert attn_k._tile_keys(dh) == tile_k
    make, be = arrays(tile_k), numba_backend()
    q, k, v = make(b, t, nq, dh), make(b, s, nkv, dh), make(b, s, nkv, dh)
    assert_close(run(be, be.gqa_attention, q, k, v), attention.gqa_attention(q, k, v), "kernel_attention")
    assert_close(run(be, be.gqa_decode, q[:, -2:], k, v), attention.gqa_decode(q[:, -2:], k, v),
                 "kernel_attention")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dh", [257, 300])
def test_attention_head_dims_past_256(mode, dh):
    """numba's attention takes any head dim (the key tile shrinks to fit shared memory; cupy stops at 256)."""
    b, t, s, nq, nkv = (1, 3, 5, 2, 1) if mode == "sim" else (2, 40, 300, 16, 2)
    make, be = arrays(dh), numba_backend()
    q, k, v = make(b, t, nq, dh, lo=-2, hi=2), make(b, s, nkv, dh, lo=-2, hi=2), make(b, s, nkv, dh)
    assert_close(run(be, be.gqa_attention, q, k, v), attention.gqa_attention(q, k, v), "kernel_attention",
                 what=f"gqa_attention dh={dh}")
    assert_close(run(be, be.gqa_decode, q, k, v), attention.gqa_decode(q, k, v), "kernel_attention",
                 what=f"gqa_decode dh={dh}")


def test_shape_table_crosses_the_numba_launch_sizes():
    """gpu_harness.DIMS names the numba kernels' tile sizes of this process (simulator or GPU) as boundaries,
    so the shared tests cross them: a change of a tile size must come with a change of the table."""
    mode = "sim" if SIMULATOR else "gpu"
    block = runtime.SIM_THREADS if SIMULATOR else runtime.GPU_THREADS
    reduce = runtime.SIM_THREADS if SIMULATOR else runtime.GPU_REDUCE_THREADS
    expected = [("channels", block), ("width", reduce), ("keys", attn_k.TILE_K), ("decode_keys", attn_k.TILE_K),
                ("decode_keys", attn_k.SPLIT_KEYS), ("queries", attn_k.ROWS),
                ("tokens", moe_k.TOKENS), ("router_width", moe_k.D_CHUNK), ("moe_tokens", quant_k.TILE),
                ("moe_width", quant_k.TILE), ("matmul_rows", quant_k.TILE), ("matmul_rows", quant_k.GEMV_ROWS),
                ("matmul_out", quant_k.GEMV_OUTS)]
    missing = [(name, size) for name, size in expected if size not in boundaries(mode, name)]
    assert not missing, f"gpu_harness.DIMS ({mode}) does not cross these numba launch sizes: {missing}"


# ---------------------------------------------------------------------------------------------------------
# Every kernel compiles for sm_90 with float32 arithmetic only (no GPU needed: numba -> NVVM -> PTX)

COMPILE_SCRIPT = textwrap.dedent("""
    import re, sys, types as pytypes
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, types
    try:
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()
    except Exception as exc:
        print(f"NO_NVVM {type(exc).__name__}: {exc}")
        sys.exit(3)
    # device functions called by a kernel compile for "the current device"; there may be none: name sm_90
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
    from nemo_scratch.backends.numba_cuda import attention as at, moe as mo, quant as qk

    f32, u8, i32, i64, b1 = types.float32, types.uint8, types.int32, types.int64, types.boolean
    A = lambda dt, nd: types.Array(dt, nd, "C")
    W = {"dense": (A(f32, 3), A(u8, 3), A(f32, 1)), "nvfp4": (A(u8, 3), A(u8, 3), A(f32, 1)),
         "fp8": (A(u8, 3), A(u8, 3), A(f32, 1))}
    kernels = [
        (qk.minifloat_decode_v1_thread_per_code, (A(u8, 1), A(f32, 1), b1)),
        (qk.nvfp4_dequantize_v1_thread_per_byte, (A(u8, 3), A(u8, 3), A(f32, 1), A(f32, 3))),
        *[(qk.matmul_v1_smem_tile(fmt), (A(f32, 2), A(i64, 1), A(i64, 1), A(i64, 1), *w, A(f32, 2), A(i64, 1), i64))
          for fmt, w in W.items()],
        *[(qk.matmul_v2_warp_per_column(fmt), (A(f32, 2), *w, A(f32, 2))) for fmt, w in W.items()],
        *[(at.gqa_attention_v1_thread_per_row(cap), (A(f32, 4),) * 5 + (A(f32, 5), i64, i64, b1, b1, f32)) for cap in (4, 128)],
        (at.gqa_split_merge_v1_thread_per_output, (A(f32, 4), A(f32, 4), A(f32, 5), A(f32, 4))),
        (mo.route_v1_rank_select, (A(f32, 2), A(f32, 2), A(f32, 1), A(i64, 2), A(f32, 2), i64, i64, i64, i64, b1, f32)),
        (mo.moe_count_v1_atomics, (A(i64, 1), A(i32, 1))),
        (mo.moe_offsets_v1_one_thread, (A(i32, 1), A(i64, 1))),
        (mo.moe_scatter_v1_atomics, (A(i64, 1), i64, A(i64, 1), A(i32, 1), A(i64, 1), A(i64, 1))),
        (mo.moe_combine_v1_thread_per_output, (A(f32, 2), A(f32, 2), A(f32, 2))),
    ]
    for kernel, sig in kernels:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), fastmath=False)
        f64 = [line.strip() for line in ptx.splitlines() if re.search(r"\\.f64\\b", line)]
        assert not f64, f"{kernel.py_func.__qualname__}: float64 instructions in the PTX: {f64[:3]}"
    print("compiled", len(kernels))
""")


def test_kernels_compile_for_sm90():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode == 3 and proc.stdout.startswith("NO_NVVM"):
        pytest.skip(f"no CUDA toolkit NVVM to compile numba kernels with ({proc.stdout.strip()})")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 16" in proc.stdout
