"""The numba backend's attention, MoE and NVFP4/FP8 kernels against the NumPy reference (issue 8).

Kernels: nemo_scratch/backends/numba_cuda/{attention,moe,quant}.py. Each property test runs twice
(gpu_harness.MODES): ``sim`` with tiny shapes on the CUDA simulator, ``gpu`` with realistic shapes on a device.
Shapes cross the kernels' own tile sizes (read from the kernel modules, so they follow any change) with
non-multiples: attention key tiles, rows a block and decode splits; router token blocks and d chunks; the
matmul tile, the GEMV row limit and the 16-element NVFP4 block; several head ratios; top-k up to the number of
experts. Decodes are bit-exact (np.array_equal on bit patterns), router selection identical (same experts,
same order); values within the ``kernel_*`` keys of tests/tolerances.py.

The simulator runs Python, so it cannot catch numba typing errors (or float64 creeping into a kernel):
test_kernels_compile_for_sm90 compiles every kernel to PTX for sm_90 without a GPU, in a subprocess.
"""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from gpu_harness import EXAMPLES, MODES, arrays, crossing, numba_backend, run, seeds
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.backends.numba_cuda import attention as attn_k
from nemo_scratch.backends.numba_cuda import moe as moe_k
from nemo_scratch.backends.numba_cuda import quant as quant_k
from nemo_scratch.errors import DtypeError, InputError, ShapeError
from nemo_scratch.ops import attention, moe, quant



def sizes(mode, sim, gpu):
    """crossing(lo, hi, *boundaries) for the mode: ``sim`` / ``gpu`` are (lo, hi, boundaries...) tuples."""
    return crossing(*(sim if mode == "sim" else gpu))


def pack(fmt, w):
    """A float32 weight [..., out, in] as the checkpoint would hold it: dense, NVFP4 or FP8."""
    return {"dense": lambda a: a, "nvfp4": quant.nvfp4_quantize, "fp8": quant.fp8_quantize}[fmt](w)


# ---------------------------------------------------------------------------------------------------------
# Decode (the one device function for E2M1 / E4M3) and NVFP4 dequantisation: bit-exact

def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("mode", MODES)
def test_decode_every_code_bit_exact(mode):
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
        quant_k.e2m1_decode_numba(be.asarray(codes))  # codes above 15 are not E2M1


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, lead=st.integers(0, 2))
def test_nvfp4_dequantize_bit_exact(mode, data, seed, lead):
    rows = data.draw(sizes(mode, (1, 5), (1, 300, 256)))
    blocks = data.draw(sizes(mode, (1, 3), (1, 200, 128)))
    stack = data.draw(st.lists(st.integers(1, 3), min_size=lead, max_size=lead))
    rng, be = np.random.default_rng(seed), numba_backend()
    # every byte value: all nibble pairs, every E4M3 scale code (NaN 0x7F/0xFF and subnormals included)
    packed = rng.integers(0, 256, (*stack, rows, 8 * blocks), dtype=np.uint8)
    block_scale = rng.integers(0, 256, (*stack, rows, blocks), dtype=np.uint8)
    global_scale = rng.uniform(1e-4, 2.0, size=stack).astype(np.float32)
    got = run(be, be.nvfp4_dequantize, packed, block_scale, global_scale)
    ref = quant.nvfp4_dequantize(packed, block_scale, global_scale)
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(bits(got[~np.isnan(ref)]), bits(ref[~np.isnan(ref)]))


# ---------------------------------------------------------------------------------------------------------
# Fused W4A16 / W8A16 matmuls (GEMV for a few rows, tiled GEMM otherwise), and linear/mlp routing to them

@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, fmt=st.sampled_from(["nvfp4", "fp8"]), lead=st.integers(1, 2))
def test_quant_matmul_matches_reference(mode, data, seed, fmt, lead):
    tile, gemv, outs = quant_k.TILE, quant_k.GEMV_ROWS, quant_k.GEMV_OUTS
    m = data.draw(sizes(mode, (1, 2 * tile + 1, gemv, tile), (1, 70, gemv, tile, 32)))
    n_out = data.draw(sizes(mode, (1, 2 * outs + 1, tile, outs), (1, 600, tile, outs, 128, 256)))
    n_in = 16 * data.draw(sizes(mode, (1, 2), (1, 160, 8, 64)))
    make, be = arrays(seed), numba_backend()
    w = pack(fmt, make(n_out, n_in))
    x = make(*((1,) * (lead - 1)), m, n_in) / np.float32(np.sqrt(n_in))  # outputs O(1)
    if fmt == "nvfp4":
        got = run(be, be.nvfp4_matmul, x, w.packed, w.block_scale, w.global_scale)
        ref = quant.nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale)
    else:
        got = run(be, be.fp8_matmul, x, w.data, w.scale)
        ref = quant.fp8_matmul(x, w.data, w.scale)
    assert_close(got, ref, "kernel_quant_matmul", what=f"{fmt}_matmul m={m}")
    # linear() sends a packed weight to the same kernels
    assert_close(run(be, be.linear, x, w), ref, "kernel_quant_matmul", what=f"linear({fmt})")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["dense", "nvfp4", "fp8"])
def test_mlp_with_packed_weights(mode, fmt):
    make, be = arrays(7), numba_backend()
    d, f = (16, 32) if mode == "sim" else (2688, 1856)
    x = make(5, 1, d)
    up, down = pack(fmt, make(f, d) / np.float32(np.sqrt(d))), pack(fmt, make(d, f) / np.float32(np.sqrt(f)))
    assert_close(run(be, be.mlp, x, up, down), moe.mlp(x, up, down), "kernel_quant_matmul", what=f"mlp({fmt})")


# ---------------------------------------------------------------------------------------------------------
# GQA attention: prefill (tiled online softmax) and decode (split-K)

@st.composite
def attention_shapes(draw, mode, decode):
    """(b, t, s, q, kv, dh): t <= s, q = kv * ratio; s and t*ratio cross the key tile, the block rows and
    (decode) the split length."""
    tk, rows, split = attn_k.TILE_K, attn_k.ROWS, attn_k.SPLIT_KEYS
    b = draw(st.integers(1, 2))
    kv = draw(st.integers(1, 2 if mode == "sim" else 4))
    ratio = draw(st.integers(1, 3 if mode == "sim" else 8))
    dh = draw(sizes(mode, (1, 4), (1, 300, 32, 64, 128, 256)))  # GPU: > 192 shrinks the key tile
    if decode:
        s = draw(sizes(mode, (1, 3 * split + 1, tk, split), (1, 1100, tk, split, 512)))
        t = draw(st.integers(1, min(s, 3)))
    else:
        s = draw(sizes(mode, (1, 3 * tk + 1, tk), (1, 300, tk, 128)))
        t = draw(st.one_of(st.just(s), st.integers(1, s)))
        t = min(t, rows + 1) if mode == "sim" else t
    return b, t, s, kv * ratio, kv, dh


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=2 * EXAMPLES)  # cheap on the simulator: twice the examples
@given(data=st.data(), seed=seeds, causal=st.booleans())
def test_gqa_attention_matches_reference(mode, data, seed, causal):
    b, t, s, nq, nkv, dh = data.draw(attention_shapes(mode, decode=False))
    make, be = arrays(seed), numba_backend()
    q, k, v = make(b, t, nq, dh, lo=-2, hi=2), make(b, s, nkv, dh, lo=-2, hi=2), make(b, s, nkv, dh)
    got = run(be, be.gqa_attention, q, k, v, causal=causal)
    assert_close(got, attention.gqa_attention(q, k, v, causal=causal), "kernel_attention",
                 what=f"gqa_attention t={t} s={s} q={nq} kv={nkv}")


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=2 * EXAMPLES)  # cheap on the simulator: twice the examples
@given(data=st.data(), seed=seeds)
def test_gqa_decode_matches_reference(mode, data, seed):
    b, t, s, nq, nkv, dh = data.draw(attention_shapes(mode, decode=True))
    make, be = arrays(seed), numba_backend()
    q, k, v = make(b, t, nq, dh, lo=-2, hi=2), make(b, s, nkv, dh, lo=-2, hi=2), make(b, s, nkv, dh)
    assert_close(run(be, be.gqa_decode, q, k, v), attention.gqa_decode(q, k, v), "kernel_attention",
                 what=f"gqa_decode t={t} s={s} splits={-(-s // attn_k.SPLIT_KEYS)}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tile_k", [1, 3])
def test_attention_shrunk_key_tiles(mode, tile_k, monkeypatch):
    """A large head dim gets fewer keys a tile (shared memory): forced here with a smaller budget."""
    b, t, s, nq, nkv, dh = (1, 5, 7, 4, 2, 3) if mode == "sim" else (2, 40, 300, 16, 2, 256)
    monkeypatch.setattr(attn_k, "SMEM_BYTES", 2 * 4 * dh * tile_k)
    assert attn_k._tile_keys(dh) == tile_k
    make, be = arrays(tile_k), numba_backend()
    q, k, v = make(b, t, nq, dh), make(b, s, nkv, dh), make(b, s, nkv, dh)
    assert_close(run(be, be.gqa_attention, q, k, v), attention.gqa_attention(q, k, v), "kernel_attention")
    assert_close(run(be, be.gqa_decode, q[:, -2:], k, v), attention.gqa_decode(q[:, -2:], k, v),
                 "kernel_attention")


# ---------------------------------------------------------------------------------------------------------
# Router: selection identical, weights within kernel_router

@st.composite
def router_args(draw, mode):
    """(t, d, e, top_k, n_group, topk_group): top_k often the largest allowed (all experts of kept groups)."""
    t = draw(sizes(mode, (1, 2 * moe_k.TOKENS + 1, moe_k.TOKENS), (1, 40, moe_k.TOKENS)))
    d = draw(sizes(mode, (1, 2 * moe_k.D_CHUNK + 1, moe_k.D_CHUNK), (1, 3000, moe_k.D_CHUNK, 2688)))
    n_group = draw(st.sampled_from([1, 1, 2, 4] if mode == "sim" else [1, 1, 4, 8]))
    per_group = draw(st.integers(1, 4) if mode == "sim" else crossing(1, 160, 32, 64, 128))
    topk_group = draw(st.integers(1, n_group))
    k_max = topk_group * per_group
    top_k = draw(st.one_of(st.just(k_max), st.integers(max(1, k_max - 2), k_max), st.integers(1, k_max)))
    return t, d, n_group * per_group, top_k, n_group, topk_group


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=2 * EXAMPLES)  # cheap on the simulator: twice the examples
@given(data=st.data(), seed=seeds, with_bias=st.booleans(), norm=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5]))
def test_route_matches_reference(mode, data, seed, with_bias, norm, scaling):
    t, d, e, top_k, n_group, topk_group = data.draw(router_args(mode))
    make, be = arrays(seed), numba_backend()
    x, gate = make(t, d), make(e, d) / np.float32(np.sqrt(max(d, 1)))
    bias = make(e, lo=-0.5, hi=0.5) if with_bias else None
    args = (top_k, n_group, topk_group, norm, scaling)
    idx, w = run(be, be.route, x, gate, bias, *args)
    idx_ref, w_ref = moe.route(x, gate, bias, *args)
    assert idx.dtype == np.int64 and idx.shape == idx_ref.shape
    assert np.array_equal(idx, idx_ref), f"selection differs:\n{idx}\nreference:\n{idx_ref}"
    assert_close(w, w_ref, "kernel_router", what="route weights")


@pytest.mark.parametrize("mode", MODES)
def test_route_ties_follow_the_reference(mode):
    """Exact ties (duplicated gate rows and biases; a zero input) go to the lower expert and group index."""
    make, be = arrays(3), numba_backend()
    e, d = 16, 12
    gate = np.repeat(make(e // 2, d), 2, axis=0)                 # experts 2i and 2i+1 score the same
    bias = np.repeat(make(e // 2, lo=-0.1, hi=0.1), 2)
    x = np.concatenate([make(3, d), np.zeros((2, d), np.float32)])  # zero rows: every expert ties
    for n_group, topk_group, top_k in ((1, 1, 5), (4, 2, 7), (8, 3, 6), (2, 2, 16)):
        args = (top_k, n_group, topk_group, True, 1.0)
        idx, w = run(be, be.route, x, gate, bias, *args)
        idx_ref, w_ref = moe.route(x, gate, bias, *args)
        assert np.array_equal(idx, idx_ref), f"n_group={n_group}: {idx} vs {idx_ref}"
        assert_close(w, w_ref, "kernel_router")


# ---------------------------------------------------------------------------------------------------------
# Routed experts: dispatch + grouped GEMMs + combine, dense or packed expert stacks

@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, fmt=st.sampled_from(["dense", "nvfp4", "fp8"]))
def test_moe_experts_matches_reference(mode, data, seed, fmt):
    tile = quant_k.TILE
    t = data.draw(sizes(mode, (1, 2 * tile + 1, tile), (1, 300, tile, 128)))
    e = data.draw(sizes(mode, (1, 6), (1, 64, 32)))
    k = data.draw(st.one_of(st.just(e), st.integers(max(1, e - 1), e), st.integers(1, e)))
    # NVFP4 needs in % 16 == 0: l for up [e,f,l], f for down [e,l,f]
    if fmt == "nvfp4":
        l, f = (16 * data.draw(sizes(mode, (1, 2), (1, 20, 8, 16))) for _ in range(2))
    else:
        l, f = (data.draw(sizes(mode, (1, 2 * tile + 1, tile), (1, 300, tile, 256))) for _ in range(2))
    rng, make, be = np.random.default_rng(seed), arrays(seed), numba_backend()
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int64)  # k distinct experts a token
    weights = make(t, k, lo=0.0, hi=1.0)
    x = make(t, l)
    up = pack(fmt, make(e, f, l) / np.float32(np.sqrt(l)))
    down = pack(fmt, make(e, l, f) / np.float32(np.sqrt(f)))
    got = run(be, be.moe_experts, x, idx, weights, up, down)
    assert_close(got, moe.moe_experts(x, idx, weights, up, down), "kernel_moe",
                 what=f"moe_experts({fmt}) t={t} e={e} k={k}")


# ---------------------------------------------------------------------------------------------------------
# Contract details: the backend binds the kernels, float64 runs the reference, errors, empty inputs

@pytest.mark.parametrize("mode", MODES)
def test_backend_binds_the_kernels(mode):
    """Without this, every comparison above could pass against the reference itself."""
    be = numba_backend()
    for op, module in (("gqa_attention", attn_k), ("gqa_decode", attn_k), ("route", moe_k), ("mlp", moe_k),
                       ("moe_experts", moe_k), ("linear", quant_k), ("nvfp4_dequantize", quant_k),
                       ("nvfp4_matmul", quant_k), ("fp8_matmul", quant_k)):
        assert getattr(be, op) is getattr(module, f"{op}_numba"), op


@pytest.mark.parametrize("mode", MODES)
def test_float64_runs_the_reference(mode):
    make, be = arrays(11), numba_backend()
    f64 = lambda *shape: make(*shape).astype(np.float64)  # noqa: E731
    q, k, v = f64(1, 3, 4, 8), f64(1, 5, 2, 8), f64(1, 5, 2, 8)
    assert np.array_equal(run(be, be.gqa_attention, q, k, v), attention.gqa_attention(q, k, v))
    assert np.array_equal(run(be, be.gqa_decode, q, k, v), attention.gqa_decode(q, k, v))
    x, gate = f64(3, 8), f64(6, 8)
    idx, w = run(be, be.route, x, gate, None, 2)
    idx_ref, w_ref = moe.route(x, gate, None, 2)
    assert np.array_equal(idx, idx_ref) and np.array_equal(w, w_ref) and w.dtype == np.float64
    idx, w = np.array([[0, 2], [1, 0], [2, 1]]), f64(3, 2)
    up, down, xs = f64(3, 5, 4), f64(3, 4, 5), f64(3, 4)
    assert np.array_equal(run(be, be.moe_experts, xs, idx, w, up, down), moe.moe_experts(xs, idx, w, up, down))
    wq = quant.nvfp4_quantize(make(4, 16))
    xq = f64(2, 16)
    assert np.array_equal(run(be, be.linear, xq, wq), quant.nvfp4_matmul(xq, wq.packed, wq.block_scale,
                                                                         wq.global_scale))


@pytest.mark.parametrize("mode", MODES)
def test_bad_arguments_raise_package_errors(mode):
    make, be = arrays(5), numba_backend()
    with pytest.raises(ShapeError, match="t <= s"):
        be.gqa_attention(make(1, 4, 2, 8), make(1, 3, 2, 8), make(1, 3, 2, 8))
    with pytest.raises(ShapeError, match="divide"):
        be.gqa_decode(make(1, 1, 3, 8), make(1, 3, 2, 8), make(1, 3, 2, 8))
    with pytest.raises(ShapeError, match="k has shape"):
        be.gqa_attention(make(2, 1, 2, 8), make(1, 3, 2, 8), make(1, 3, 2, 8))
    with pytest.raises(InputError, match="top_k"):
        be.route(make(2, 8), make(6, 8), None, 7)
    with pytest.raises(InputError, match="expert ids"):
        be.moe_experts(make(2, 4), np.array([[0, 3], [1, 2]]), make(2, 2), make(3, 5, 4), make(3, 4, 5))
    with pytest.raises(InputError, match="twice"):
        be.moe_experts(make(2, 4), np.array([[0, 0], [1, 2]]), make(2, 2), make(3, 5, 4), make(3, 4, 5))
    with pytest.raises(ShapeError, match="idx"):
        be.moe_experts(make(2, 4), np.array([[0, 1]]), make(1, 2), make(3, 5, 4), make(3, 4, 5))
    with pytest.raises(DtypeError, match="block_scale"):
        be.nvfp4_dequantize(np.zeros((2, 8), np.uint8), np.zeros((2, 1), np.float32), np.float32(1.0))
    with pytest.raises(ShapeError):
        be.nvfp4_matmul(make(3, 32), np.zeros((2, 8), np.uint8), np.zeros((2, 1), np.uint8), np.float32(1.0))
    with pytest.raises(DtypeError, match="mix"):
        be.gqa_attention(make(1, 1, 2, 8), make(1, 3, 2, 8).astype(np.float64), make(1, 3, 2, 8))


@pytest.mark.parametrize("mode", MODES)
def test_empty_inputs(mode):
    make, be = arrays(2), numba_backend()
    out = run(be, be.moe_experts, make(0, 4), np.zeros((0, 2), np.int64), make(0, 2), make(3, 5, 4),
              make(3, 4, 5))
    assert out.shape == (0, 4) and out.dtype == np.float32
    idx, w = run(be, be.route, make(0, 8), make(6, 8), None, 2)
    assert idx.shape == (0, 2) and idx.dtype == np.int64 and w.shape == (0, 2)
    w = quant.nvfp4_quantize(make(5, 32))
    assert run(be, be.linear, make(0, 32), w).shape == (0, 5)


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
        (qk.nvfp4_dequantize_v1_naive, (A(u8, 3), A(u8, 3), A(f32, 1), A(f32, 3))),
        *[(qk.matmul_v1_smem_tile(fmt), (A(f32, 2), A(i64, 1), A(i64, 1), A(i64, 1), *w, A(f32, 2), A(i64, 1), i64))
          for fmt, w in W.items()],
        *[(qk.matmul_v2_warp_per_column(fmt), (A(f32, 2), *w, A(f32, 2))) for fmt, w in W.items()],
        *[(at.gqa_attention_v1_thread_per_row(cap), (A(f32, 4),) * 5 + (A(f32, 5), i64, i64, b1, b1, f32)) for cap in (4, 128)],
        (at.gqa_split_merge_v1_thread_per_output, (A(f32, 4), A(f32, 4), A(f32, 5), A(f32, 4))),
        (mo.route_v1_block, (A(f32, 2), A(f32, 2), A(f32, 1), A(i64, 2), A(f32, 2), i64, i64, i64, i64, b1, f32)),
        (mo.moe_count_v1, (A(i64, 1), A(i32, 1))),
        (mo.moe_offsets_v1, (A(i32, 1), A(i64, 1))),
        (mo.moe_scatter_v1_atomics, (A(i64, 1), i64, A(i64, 1), A(i32, 1), A(i64, 1), A(i64, 1))),
        (mo.moe_combine_v1, (A(f32, 2), A(f32, 2), A(f32, 2))),
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
