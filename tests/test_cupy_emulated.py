"""The cupy backend's CUDA C kernels, run in CI without a GPU on the CPU CUDA emulator (tests/cuda_emu).

Every kernel entry point of nemo_scratch/backends/cupy (conv prefill + step, SSD scan + step, rms_norm,
gated_rms_norm, GQA attention + decode, route, moe_experts, mlp, linear, nvfp4_dequantize, nvfp4_matmul,
fp8_matmul) goes through its real launcher and its real .cu source, compiled by g++ against emu.h, and is
compared with the NumPy reference: within the tests/tolerances.py ``kernel_*`` keys, bit-exact for the NVFP4
dequantisation, the same expert selection for the router. Shapes are small but cross the warp (32), the
256-thread blocks, the attention/MoE/matmul tiles and the SSD chunk, with non-multiples; pinned ``@example``s
plus a few Hypothesis examples each (the ``ci`` profile). End to end: a random tiny checkpoint and its
"ultra"-quantized copy, loaded with backend="cupy", give the numpy backend's logits (prefill + one decode
step). The emulator's own checks are tested in tests/cuda_emu/test_emulator.py.

The emulated ``cupy`` exists only inside the module fixture (cuda_emu.installed()). Where a CUDA GPU and cupy
are present these tests skip: test_backend_cupy_{core,mamba}.py and test_backend_model.py run the same
kernels on the device. A missing g++ fails the fixture (EmulatorError), it never skips.
"""

import cuda_emu
import gpu_harness
import numpy as np
import pytest
from gpu_harness import arrays, crossing, maybe, run, seeds, ssd_inputs
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_backend_cupy_core import assert_bits_equal, assert_same_selection, distinct_experts, dyadic, expert_stack
from test_backend_model import checkpoint  # noqa: F401  (fixture: random tiny checkpoint, BF16 and "ultra")
from tolerances import assert_close

import nemo_scratch
from nemo_scratch.backends import get_backend
from nemo_scratch.ops import attention, conv, linear, moe, norm, quant, ssd

pytestmark = pytest.mark.cuda_emu
EXAMPLES = 10
FORMATS = st.sampled_from(["dense", "nvfp4", "fp8"])


@pytest.fixture(scope="module")
def be():
    """The cupy backend on the emulator, for this module only."""
    if gpu_harness.cupy_available():
        pytest.skip("a CUDA GPU and cupy are present: the gpu-marked cupy tests run these kernels on the device")
    cuda_emu.precompile_kernels()  # every .cu once per session (cached on disk by source hash), in parallel
    with cuda_emu.installed():
        yield get_backend("cupy")


def to_device(be, *arrays):
    """Host arrays -> the backend's device arrays; None stays None (an absent optional argument)."""
    return [None if a is None else be.asarray(a) for a in arrays]


# ---------------------------------------------------------------------------------------------------------
# Mamba path: conv1d, norms, SSD

@settings(max_examples=EXAMPLES)
@given(seed=seeds, b=st.integers(1, 2), t=st.integers(1, 6), c=crossing(1, 300, 32, 256), w=st.integers(1, 4),
       with_state=st.booleans(), with_bias=st.booleans(), activation=st.sampled_from(["silu", None]))
@example(seed=1, b=2, t=5, c=257, w=4, with_state=True, with_bias=True, activation="silu")
def test_causal_conv1d(be, seed, b, t, c, w, with_state, with_bias, activation):
    make = arrays(seed)
    x = make(b, t, c + 3)[:, :, 1:c + 1]  # a column slice, as the model's xBC slice: the launcher copies it
    weight, bias, state = make(c, w), maybe(with_bias, make(c)), maybe(with_state, make(b, c, w))
    y, new_state = run(be, be.causal_conv1d, x, weight, bias, state, activation=activation)
    y_ref, state_ref = conv.causal_conv1d(x, weight, bias, state, activation=activation)
    assert_close(y, y_ref, "kernel_conv1d", what="causal_conv1d y")
    assert new_state.dtype == state_ref.dtype and np.array_equal(new_state, state_ref)


@settings(max_examples=EXAMPLES)
@given(seed=seeds, b=st.integers(1, 2), c=crossing(1, 300, 32, 256), w=st.integers(1, 4), with_bias=st.booleans(),
       in_place=st.booleans())
@example(seed=2, b=2, c=257, w=4, with_bias=False, in_place=True)
def test_causal_conv1d_step(be, seed, b, c, w, with_bias, in_place):
    make = arrays(seed)
    x, state, weight, bias = make(b, c), make(b, c, w), make(c, w), maybe(with_bias, make(c))
    y_ref, state_ref = conv.causal_conv1d_step(x, state, weight, bias)
    dev_state = be.asarray(state)
    y, new_state = be.causal_conv1d_step(*to_device(be, x), dev_state, *to_device(be, weight, bias),
                                         out_state=dev_state if in_place else None)
    assert (new_state is dev_state) == in_place
    assert_close(be.to_numpy(y), y_ref, "kernel_conv1d", what="causal_conv1d_step y")
    assert np.array_equal(be.to_numpy(new_state), state_ref)


@settings(max_examples=EXAMPLES)
@given(seed=seeds, rows=st.integers(1, 3), width=crossing(1, 300, 32, 256), lead=st.integers(0, 2))
@example(seed=3, rows=3, width=257, lead=2)
def test_rms_norm(be, seed, rows, width, lead):
    make = arrays(seed)
    x, weight = make(*(rows,) * lead, width, lo=-3.0, hi=3.0), make(width)
    assert_close(run(be, be.rms_norm, x, weight, 1e-5), norm.rms_norm(x, weight, 1e-5), "kernel_rms_norm")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, rows=st.integers(1, 3), groups=st.integers(1, 3), width=crossing(1, 100, 32))
@example(seed=4, rows=2, groups=2, width=33)
def test_gated_rms_norm(be, seed, rows, groups, width):
    make = arrays(seed)
    y, z = make(rows, groups * width, lo=-3.0, hi=3.0), make(rows, groups * width, lo=-4.0, hi=4.0)
    weight = make(groups * width)
    got = run(be, be.gated_rms_norm, y, z, weight, groups, 1e-5)
    assert_close(got, norm.gated_rms_norm(y, z, weight, groups, 1e-5), "kernel_gated_rms_norm")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, b=st.integers(1, 2), t=st.integers(1, 20), chunk=st.integers(1, 8), g=st.integers(1, 2),
       ratio=st.integers(1, 3), p=st.integers(1, 5), n=crossing(1, 40, 32), with_d=st.booleans(),
       with_state=st.booleans())
@example(seed=5, b=2, t=9, chunk=4, g=2, ratio=2, p=3, n=33, with_d=True, with_state=True)   # ragged last chunk
@example(seed=6, b=1, t=4, chunk=4, g=1, ratio=1, p=1, n=1, with_d=False, with_state=False)  # exactly one chunk
@example(seed=7, b=1, t=6, chunk=100, g=1, ratio=3, p=2, n=32, with_d=True, with_state=True)  # chunk > t
def test_ssd_scan(be, seed, b, t, chunk, g, ratio, p, n, with_d, with_state):
    make, h = arrays(seed), g * ratio
    x, dt, A, B, C = ssd_inputs(make, b, t, h, p, g, n)
    D, init = maybe(with_d, make(h)), maybe(with_state, make(b, h, p, n))
    y, final = run(be, be.ssd_scan, x, dt, A, B, C, chunk, D=D, initial_state=init)
    y_ref, final_ref = ssd.ssd_scan_chunked(x, dt, A, B, C, chunk, D=D, initial_state=init)
    assert_close(y, y_ref, "kernel_ssd", what=f"ssd_scan y (t={t}, chunk={chunk})")
    assert_close(final, final_ref, "kernel_ssd", what=f"ssd_scan final_state (t={t}, chunk={chunk})")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, b=st.integers(1, 2), g=st.integers(1, 2), ratio=st.integers(1, 3), p=st.integers(1, 5),
       n=crossing(1, 70, 32, 64), with_d=st.booleans(), in_place=st.booleans())
@example(seed=8, b=2, g=2, ratio=3, p=5, n=65, with_d=True, in_place=True)  # 60 rows: a ragged 8-warp block
def test_ssd_step(be, seed, b, g, ratio, p, n, with_d, in_place):
    make, h = arrays(seed), g * ratio
    x, dt, A, B, C = ssd_inputs(make, b, 1, h, p, g, n)
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    D, state = maybe(with_d, make(h)), make(b, h, p, n, lo=-3.0, hi=3.0)
    y_ref, state_ref = ssd.ssd_step(x, dt, A, B, C, D, state)
    dev_state = be.asarray(state)
    y, new_state = be.ssd_step(*to_device(be, x, dt, A, B, C, D), dev_state,
                               out_state=dev_state if in_place else None)
    assert (new_state is dev_state) == in_place
    assert_close(be.to_numpy(y), y_ref, "kernel_ssd_step", what="ssd_step y")
    assert_close(be.to_numpy(new_state), state_ref, "kernel_ssd_step", what="ssd_step new_state")


# ---------------------------------------------------------------------------------------------------------
# Attention: 32-key tiles, blocks of 32 (query, head) rows, split-K decode over 132 emulated SMs

@settings(max_examples=EXAMPLES)
@given(seed=seeds, b=st.integers(1, 2), nkv=st.integers(1, 2), ratio=st.sampled_from([1, 2, 3, 8]),
       s=crossing(1, 70, 32, 64), t_full=st.booleans(), dh=crossing(1, 70, 32, 64), causal=st.booleans())
@example(seed=9, b=1, nkv=2, ratio=3, s=65, t_full=True, dh=33, causal=True)    # 2+ tiles and row blocks
@example(seed=10, b=1, nkv=1, ratio=2, s=33, t_full=False, dh=256, causal=True)  # dh limit: opt-in smem
def test_gqa_attention(be, seed, b, nkv, ratio, s, t_full, dh, causal):
    t = s if t_full else max(1, s // 3)
    make = arrays(seed)
    q, k, v = make(b, t, nkv * ratio, dh), make(b, s, nkv, dh), make(b, s, nkv, dh)
    out = run(be, be.gqa_attention, q, k, v, causal=causal)
    assert_close(out, attention.gqa_attention(q, k, v, causal=causal), "kernel_attention", what="gqa_attention")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, b=st.integers(1, 2), nkv=st.integers(1, 2), ratio=st.sampled_from([1, 2, 8]),
       s=crossing(1, 200, 32, 64), t=st.integers(1, 3), dh=crossing(1, 70, 32))
@example(seed=11, b=1, nkv=2, ratio=8, s=97, t=3, dh=40)  # 4 splits, the last one ragged
def test_gqa_decode(be, seed, b, nkv, ratio, s, t, dh):
    t = min(t, s)
    make = arrays(seed)
    q, k, v = make(b, t, nkv * ratio, dh), make(b, s, nkv, dh), make(b, s, nkv, dh)
    assert_close(run(be, be.gqa_decode, q, k, v), attention.gqa_decode(q, k, v), "kernel_attention",
                 what="gqa_decode")


# ---------------------------------------------------------------------------------------------------------
# MoE: router (4-token blocks), experts (16-row tiles, 8 columns a block), shared-expert MLP

@settings(max_examples=EXAMPLES)
@given(seed=seeds, t=crossing(1, 9, 4), d=crossing(1, 70, 32), n_group=st.sampled_from([1, 2, 4]),
       group_size=st.integers(1, 10), topk_group=st.integers(1, 4), k_frac=st.floats(0.0, 1.0),
       with_bias=st.booleans(), norm_topk=st.booleans())
@example(seed=12, t=5, d=33, n_group=1, group_size=40, topk_group=1, k_frac=1.0, with_bias=True, norm_topk=True)
@example(seed=13, t=9, d=40, n_group=4, group_size=3, topk_group=2, k_frac=0.5, with_bias=False, norm_topk=False)
def test_route(be, seed, t, d, n_group, group_size, topk_group, k_frac, with_bias, norm_topk):
    e, topk_group = n_group * group_size, min(topk_group, n_group)
    top_k = max(1, round(k_frac * topk_group * group_size))
    rng = np.random.default_rng(seed)
    x, gate = dyadic(rng, (t, d), 8, 1 / 8), dyadic(rng, (e, d), 8, 1 / 64)
    bias = dyadic(rng, (e,), 8, 1 / 128) if with_bias else None
    args = (top_k, n_group, topk_group, norm_topk, 2.5)
    idx, w = run(be, be.route, x, gate, bias, *args)
    idx_ref, w_ref = moe.route(x, gate, bias, *args)
    assert_same_selection(idx, idx_ref, x, gate, bias)
    same = np.all(idx == idx_ref, axis=1)
    assert_close(w[same], w_ref[same], "kernel_router", what="router weights")


def test_route_ties_go_to_the_lower_index(be):
    """x = 0: every score is sigmoid(0), so the selection is by expert index (groups likewise): exact."""
    x, gate = np.zeros((5, 16), np.float32), arrays(0)(12, 16)
    for args in [(4, 1, 1), (5, 4, 2)]:
        idx, w = run(be, be.route, x, gate, None, *args)
        idx_ref, w_ref = moe.route(x, gate, None, *args)
        assert np.array_equal(idx, idx_ref) and np.array_equal(idx[0], np.arange(args[0]))
        assert_close(w, w_ref, "kernel_router")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, t=crossing(1, 20, 16), e=st.integers(1, 5), k_frac=st.floats(0.0, 1.0), l16=st.integers(1, 3),
       f16=st.integers(1, 3), up_fmt=FORMATS, down_fmt=FORMATS)
@example(seed=14, t=17, e=3, k_frac=0.6, l16=2, f16=3, up_fmt="nvfp4", down_fmt="fp8")
@example(seed=15, t=16, e=4, k_frac=1.0, l16=1, f16=2, up_fmt="dense", down_fmt="nvfp4")
def test_moe_experts(be, seed, t, e, k_frac, l16, f16, up_fmt, down_fmt):
    k, l, f = max(1, round(k_frac * e)), 16 * l16, 16 * f16   # widths of whole NVFP4 blocks for every format
    make, rng = arrays(seed), np.random.default_rng(seed)
    x, weights = make(t, l), make(t, k, lo=0.0, hi=1.0)
    up = expert_stack(up_fmt, make(e, f, l) * np.float32(1.5 / np.sqrt(l)))
    down = expert_stack(down_fmt, make(e, l, f) * np.float32(1.5 / np.sqrt(f)))
    idx = distinct_experts(rng, t, e, k)
    out = run(be, be.moe_experts, x, idx, weights, up, down)
    assert_close(out, moe.moe_experts(x, idx, weights, up, down), "kernel_moe", what="moe_experts")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, t=crossing(1, 9, 4), d16=st.integers(1, 3), f16=st.integers(1, 3), up_fmt=FORMATS,
       down_fmt=FORMATS)
@example(seed=16, t=5, d16=2, f16=3, up_fmt="fp8", down_fmt="nvfp4")
def test_mlp(be, seed, t, d16, f16, up_fmt, down_fmt):
    d, f, make = 16 * d16, 16 * f16, arrays(seed)
    x = make(2, t, d)
    up = expert_stack(up_fmt, make(f, d) * np.float32(1.5 / np.sqrt(d)))
    down = expert_stack(down_fmt, make(d, f) * np.float32(1.5 / np.sqrt(f)))
    assert_close(run(be, be.mlp, x, up, down), moe.mlp(x, up, down), "kernel_moe", what="mlp")


# ---------------------------------------------------------------------------------------------------------
# NVFP4 / FP8: dequantisation (bit-exact), fused matmuls (row blocks 1 / 4 / 16, 8 columns a block)

def test_nvfp4_dequantize_bit_exact_over_all_codes(be):
    """Every packed byte (two E2M1 codes) under every E4M3 scale code, NaN scales included, two tensors."""
    packed = np.tile(np.arange(256, dtype=np.uint8), (2, 256, 1))                 # [2, 256, 256]: in = 512
    block_scale = np.tile(np.arange(256, dtype=np.uint8)[:, None], (2, 1, 32))    # row r: scale code r
    global_scale = np.array([1.0, 0.0371], dtype=np.float32)
    got = run(be, be.nvfp4_dequantize, packed, block_scale, global_scale)
    assert_bits_equal(got, quant.nvfp4_dequantize(packed, block_scale, global_scale), "nvfp4_dequantize")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, out=crossing(1, 40, 8, 32), in16=crossing(1, 40, 32), lead=st.sampled_from([(), (3,)]))
@example(seed=17, out=33, in16=33, lead=(3,))
def test_nvfp4_dequantize(be, seed, out, in16, lead):
    w = quant.nvfp4_quantize(arrays(seed)(*lead, out, 16 * in16, lo=-3.0, hi=3.0))
    got = run(be, be.nvfp4_dequantize, w.packed, w.block_scale, w.global_scale)
    assert_bits_equal(got, quant.nvfp4_dequantize(w.packed, w.block_scale, w.global_scale), "nvfp4_dequantize")


MATMUL_ROWS = st.one_of(st.just(1), crossing(1, 40, 4, 16, 32))   # m = 1 (GEMV), <= 4, <= 16, chunks of 16


@settings(max_examples=EXAMPLES)
@given(seed=seeds, m=MATMUL_ROWS, out=crossing(1, 40, 8, 32), in16=crossing(1, 40, 32), x_3d=st.booleans())
@example(seed=18, m=17, out=9, in16=33, x_3d=False)   # 2 row blocks of 16; a warp's second 32 x 16 step
@example(seed=19, m=3, out=8, in16=1, x_3d=True)
def test_nvfp4_matmul(be, seed, m, out, in16, x_3d):
    make = arrays(seed)
    w = quant.nvfp4_quantize(make(out, 16 * in16))
    x = make(2, m, 16 * in16) if x_3d else make(m, 16 * in16)
    got = run(be, be.nvfp4_matmul, x, w.packed, w.block_scale, w.global_scale)
    assert_close(got, quant.nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale), "kernel_quant_matmul",
                 what="nvfp4_matmul")


@settings(max_examples=EXAMPLES)
@given(seed=seeds, m=MATMUL_ROWS, out=crossing(1, 40, 8, 32), inn=crossing(1, 600, 16, 512))
@example(seed=20, m=5, out=17, inn=530)   # a partial last 16-wide step and a second warp step
def test_fp8_matmul(be, seed, m, out, inn):
    make = arrays(seed)
    w = quant.fp8_quantize(make(out, inn))
    x = make(m, inn)
    assert_close(run(be, be.fp8_matmul, x, w.data, w.scale), quant.fp8_matmul(x, w.data, w.scale),
                 "kernel_quant_matmul", what="fp8_matmul")


@pytest.mark.parametrize("fmt", ["dense", "nvfp4", "fp8"])
def test_linear(be, fmt):
    """linear() with each weight format: packed ones on the fused kernels, dense on the reference (xp = cupy)."""
    make = arrays(21)
    w, x = expert_stack(fmt, make(24, 48)), make(2, 3, 48)
    assert_close(run(be, be.linear, x, w), linear.linear(x, w), "kernel_quant_matmul", what=f"linear ({fmt})")


# ---------------------------------------------------------------------------------------------------------
# End to end

def test_model_matches_numpy(be, checkpoint):  # noqa: F811
    """A random tiny checkpoint (BF16, and "ultra": NVFP4 experts, FP8 Mamba/shared) through every kernel."""
    ref, got = nemo_scratch.load(checkpoint), nemo_scratch.load(checkpoint, backend="cupy")
    assert got.backend is be
    ids = np.array([[3, 1, 4]])
    assert_close(got.forward(ids), ref.forward(ids), "kernel_model", np.float32, what="cupy (emulated) prefill")
    c_ref, c_got = ref.new_cache(1), got.new_cache(1)
    ref.forward(ids, c_ref)
    got.forward(ids, c_got)
    assert_close(got.forward([[2]], c_got), ref.forward([[2]], c_ref), "kernel_model", np.float32,
                 what="cupy (emulated) decode step")
