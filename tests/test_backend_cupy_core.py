"""The cupy backend's issue-8 kernels (kernels_cuda/{attention,moe,quant}.cu) against the NumPy reference.

On a CUDA GPU with cupy (marker ``gpu``): Hypothesis property tests over shapes that cross the kernels' tiles
(32-key attention tiles, 32-row attention blocks, 4-token router blocks, 16-row expert tiles, 8-column
matmul blocks, the 16-element NVFP4 block and the 32 x 16 inputs a warp reads per step) with non-multiples,
several GQA ratios and expert counts with top-k close to the expert count; pinned tie and boundary cases; one
call at Nemotron 3 Ultra's shapes per kernel (64 q / 2 kv heads x 128, 512 experts top-22 over d = 8192,
experts 5120 x latent 2048). NVFP4 dequantisation is compared bit for bit; router selection exactly (same
experts, same order; only candidates within float32 rounding of each other may swap); everything else within tests/tolerances.py ``kernel_*`` keys.

Without a GPU the ``gpu`` tests skip with the reason "no CUDA GPU"; the argument checks of the launchers
(which run before cupy is imported) and the split-K plan are tested everywhere.
"""

import gpu_harness  # noqa: F401  (first: turns the numba simulator on before anything imports numba)
import numpy as np
import pytest
from gpu_harness import arrays, crossing, requires_cupy, run, seeds
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.backends import get_backend
from nemo_scratch.backends.cupy import attention as attention_cupy
from nemo_scratch.backends.cupy import moe as moe_cupy
from nemo_scratch.backends.cupy import quant as quant_cupy
from nemo_scratch.errors import DtypeError, InputError, ShapeError
from nemo_scratch.ops import attention, linear, moe, quant
from nemo_scratch.ops.quant import NVFP4Weight

EXAMPLES = 25
gpu = [pytest.mark.gpu, requires_cupy]


def backend():
    return get_backend("cupy")



def assert_bits_equal(got, ref, what):
    """Bit-exact float32 comparison (-0.0 included); NaN must sit at the same places."""
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32, what
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN positions differ"
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32)), f"{what}: bits differ"


def random_nvfp4(rng, *shape):  # [..., out, in] -> NVFP4Weight with W of rms ~ 1.5 / sqrt(in)
    """A valid NVFP4 weight drawn code by code (quantizing an Ultra-sized float32 stack on the CPU is slow):
    random E2M1 codes, block scales 1 + m/8 (E4M3 exponent field 7), a global scale for an O(1) output."""
    *lead, out, inn = shape
    packed = rng.integers(0, 256, size=(*lead, out, inn // 2), dtype=np.uint8)
    block_scale = rng.integers(0x38, 0x40, size=(*lead, out, inn // 16), dtype=np.uint8)
    global_scale = np.full(tuple(lead), 1.5 / np.sqrt(inn) / 4, dtype=np.float32)
    return NVFP4Weight(packed, block_scale, global_scale)


def distinct_experts(rng, t, e, k):  # -> idx [t, k] int64, k distinct experts a token (as route() gives)
    return np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int64).reshape(t, k)


# ---------------------------------------------------------------------------------------------------------
# GQA attention: tiles of 32 keys, blocks of 32 (query, head) rows

HEAD_RATIOS = st.sampled_from([1, 2, 3, 8, 32])  # q heads per kv head (32: Ultra, 64 q / 2 kv)


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, ratio=HEAD_RATIOS, causal=st.booleans())
def test_gqa_attention_matches_reference(mode, data, seed, ratio, causal):
    b = data.draw(st.integers(1, 2))
    nkv = data.draw(st.integers(1, 2))
    s = data.draw(crossing(1, 200, 32, 64))
    t = data.draw(st.one_of(st.just(s), crossing(1, s, 32)))
    dh = data.draw(st.one_of(st.sampled_from([128, 256]), crossing(1, 160, 32, 64)))
    make, be = arrays(seed), backend()
    q, k, v = make(b, t, nkv * ratio, dh), make(b, s, nkv, dh), make(b, s, nkv, dh)
    out = run(be, be.gqa_attention, q, k, v, causal=causal)
    assert_close(out, attention.gqa_attention(q, k, v, causal=causal), "kernel_attention", what="gqa_attention")


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, ratio=HEAD_RATIOS)
def test_gqa_decode_matches_reference(mode, data, seed, ratio):
    b = data.draw(st.integers(1, 3))
    nkv = data.draw(st.integers(1, 3))
    s = data.draw(crossing(1, 3000, 32, 256, 1024))
    t = data.draw(st.integers(1, min(4, s)))
    dh = data.draw(st.one_of(st.just(128), crossing(1, 160, 32)))
    make, be = arrays(seed), backend()
    q, k, v = make(b, t, nkv * ratio, dh), make(b, s, nkv, dh), make(b, s, nkv, dh)
    out = run(be, be.gqa_decode, q, k, v)
    assert_close(out, attention.gqa_decode(q, k, v), "kernel_attention", what="gqa_decode")


@pytest.mark.gpu
@requires_cupy
@pytest.mark.parametrize("s", [1, 4096, 4097])
def test_gqa_decode_ultra_shape(s):
    """One decode token against an Ultra attention layer's cache: 64 q heads over 2 kv heads x 128."""
    make, be = arrays(s), backend()
    q, k, v = make(1, 1, 64, 128), make(1, s, 2, 128), make(1, s, 2, 128)
    ref = attention.gqa_attention(q, k, v)
    assert_close(run(be, be.gqa_decode, q, k, v), ref, "kernel_attention", what="gqa_decode (Ultra)")
    assert_close(run(be, be.gqa_attention, q, k, v), ref, "kernel_attention", what="gqa_attention t=1 (Ultra)")


@pytest.mark.gpu
@requires_cupy
def test_gqa_attention_ultra_prefill_shape():
    make, be = arrays(7), backend()
    q, k, v = make(1, 300, 64, 128), make(1, 300, 2, 128), make(1, 300, 2, 128)
    assert_close(run(be, be.gqa_attention, q, k, v), attention.gqa_attention(q, k, v), "kernel_attention",
                 what="gqa_attention prefill (Ultra heads)")


@pytest.mark.gpu
@requires_cupy
def test_gqa_attention_is_causal():
    """Changing the keys/values after a query's position leaves its output unchanged, bit for bit."""
    make, be = arrays(3), backend()
    q, k, v = make(1, 70, 4, 64), make(1, 70, 2, 64), make(1, 70, 2, 64)
    k2, v2 = k.copy(), v.copy()
    k2[:, 40:], v2[:, 40:] = make(1, 30, 2, 64), make(1, 30, 2, 64)
    out, out2 = run(be, be.gqa_attention, q, k, v), run(be, be.gqa_attention, q, k2, v2)
    assert np.array_equal(out[:, :40], out2[:, :40])
    assert not np.array_equal(out[:, 40:], out2[:, 40:])


# ---------------------------------------------------------------------------------------------------------
# Router: blocks of 4 tokens, one warp per expert for the logits, one per token for the selection

@st.composite
def router_config(draw):
    """(e, n_group, topk_group, top_k) with n_group | e and top_k up to every expert of the kept groups."""
    n_group = draw(st.sampled_from([1, 1, 2, 4, 8]))
    e = n_group * draw(st.integers(1 if n_group > 1 else 2, 24))
    topk_group = draw(st.integers(1, n_group))
    allowed = topk_group * (e // n_group)
    top_k = draw(st.one_of(st.just(allowed), st.integers(1, allowed)))
    return e, n_group, topk_group, top_k


def dyadic(rng, shape, steps, scale):  # -> float32 multiples of scale in [-steps*scale, steps*scale]
    """Values on a coarse binary grid: dot products of them are exact in float32 in any summation order, so
    the kernel and the reference see bit-identical router logits."""
    return (rng.integers(-steps, steps + 1, size=shape) * scale).astype(np.float32)


def assert_same_selection(idx, idx_ref, x, gate, bias, margin=1e-6):
    """Same experts in the same order, token by token. Where they differ, every differing pair must be a
    near-tie: biased scores within ``margin`` (the kernel's expf and NumPy's exp may round sigmoid one ulp
    apart, so candidates that close may be ranked either way; exact ties are tested separately)."""
    assert idx.shape == idx_ref.shape and idx.dtype == np.int64
    logits = x.astype(np.float64) @ gate.T.astype(np.float64)
    choice = 1 / (1 + np.exp(-logits)) + (0 if bias is None else bias.astype(np.float64))
    for tok in np.nonzero(np.any(idx != idx_ref, axis=1))[0]:
        got, ref = choice[tok, idx[tok]], choice[tok, idx_ref[tok]]
        assert np.all(np.abs(got - ref) < margin), (
            f"router selection differs at token {tok}: {idx[tok].tolist()} vs reference {idx_ref[tok].tolist()}")


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, config=router_config(), with_bias=st.booleans(), norm=st.booleans(),
       scale=st.sampled_from([1.0, 2.5, 5.0]))
def test_route_matches_reference(mode, data, seed, config, with_bias, norm, scale):
    e, n_group, topk_group, top_k = config
    t = data.draw(crossing(1, 40, 4))
    d = data.draw(crossing(1, 300, 32))
    rng, be = np.random.default_rng(seed), backend()
    x, gate = dyadic(rng, (t, d), 8, 1 / 8), dyadic(rng, (e, d), 8, 1 / 64)
    bias = dyadic(rng, (e,), 8, 1 / 128) if with_bias else None
    args = (top_k, n_group, topk_group, norm, scale)
    idx, w = run(be, be.route, x, gate, bias, *args)
    idx_ref, w_ref = moe.route(x, gate, bias, *args)
    assert_same_selection(idx, idx_ref, x, gate, bias)
    same = np.all(idx == idx_ref, axis=1)  # weights are comparable where the same experts were picked
    assert_close(w[same], w_ref[same], "kernel_router", what="router weights")


@pytest.mark.gpu
@requires_cupy
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4)])
def test_route_ultra_shape(n_group, topk_group):
    """Ultra's router: d = 8192, 512 experts, top-22, routed_scaling_factor 5 (and the 8/4 grouping variant)."""
    rng, be = np.random.default_rng(11), backend()
    x, gate = dyadic(rng, (9, 8192), 8, 1 / 8), dyadic(rng, (512, 8192), 2, 1 / 64)
    bias = dyadic(rng, (512,), 8, 1 / 256)
    args = (22, n_group, topk_group, True, 5.0)
    idx, w = run(be, be.route, x, gate, bias, *args)
    idx_ref, w_ref = moe.route(x, gate, bias, *args)
    assert_same_selection(idx, idx_ref, x, gate, bias)
    same = np.all(idx == idx_ref, axis=1)
    assert_close(w[same], w_ref[same], "kernel_router", what="router weights (Ultra)")


@pytest.mark.gpu
@requires_cupy
def test_route_ties_go_to_the_lower_index():
    """x = 0: every score is sigmoid(0) = 0.5, so the order is the expert index; equal groups likewise."""
    be = backend()
    x, gate = np.zeros((5, 16), np.float32), arrays(0)(12, 16)
    for args in [(4, 1, 1), (5, 4, 2)]:
        idx, w = run(be, be.route, x, gate, None, *args)
        idx_ref, w_ref = moe.route(x, gate, None, *args)
        assert np.array_equal(idx, idx_ref) and np.array_equal(idx[0], np.arange(args[0]))
        assert_close(w, w_ref, "kernel_router")


# ---------------------------------------------------------------------------------------------------------
# Routed experts: dispatch, grouped matmuls (16-row tiles, 8 output columns a block), combine

def expert_stack(fmt, w):
    """A float32 weight [..., out, in] in the format under test (NVFP4 needs in % 16 == 0)."""
    return {"dense": lambda: w, "nvfp4": lambda: quant.nvfp4_quantize(w), "fp8": lambda: quant.fp8_quantize(w)}[fmt]()


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, up_fmt=st.sampled_from(["dense", "nvfp4", "fp8"]),
       down_fmt=st.sampled_from(["dense", "nvfp4", "fp8"]))
def test_moe_experts_matches_reference(mode, data, seed, up_fmt, down_fmt):
    nvfp4 = "nvfp4" in (up_fmt, down_fmt)
    t = data.draw(crossing(1, 70, 16))
    e = data.draw(st.integers(1, 20))
    k = data.draw(st.one_of(st.just(e), st.integers(1, e)))
    l = 16 * data.draw(st.integers(1, 40)) if nvfp4 else data.draw(crossing(1, 600, 16, 512))
    f = 16 * data.draw(st.integers(1, 40)) if nvfp4 else data.draw(crossing(1, 600, 8, 16, 512))
    make, be, rng = arrays(seed), backend(), np.random.default_rng(seed)
    x, weights = make(t, l), make(t, k, lo=0.0, hi=1.0)
    # scaled so that up x and down h stay O(1): the tolerance is then about summation order alone
    up = expert_stack(up_fmt, make(e, f, l) * np.float32(1.5 / np.sqrt(l)))
    down = expert_stack(down_fmt, make(e, l, f) * np.float32(1.5 / np.sqrt(f)))
    idx = distinct_experts(rng, t, e, k)
    out = run(be, be.moe_experts, x, idx, weights, up, down)
    assert_close(out, moe.moe_experts(x, idx, weights, up, down), "kernel_moe", what="moe_experts")


@pytest.mark.gpu
@requires_cupy
@pytest.mark.parametrize("fmt", ["dense", "nvfp4"])
def test_moe_experts_ultra_width(fmt):
    """Experts of Ultra's width (5120 x latent 2048), 16 tokens routed over 8 of them, 4 each."""
    make, be, rng = arrays(5), backend(), np.random.default_rng(5)
    t, l, f, e, k = 16, 2048, 5120, 8, 4
    x, weights = make(t, l), make(t, k, lo=0.0, hi=1.0)
    if fmt == "nvfp4":
        up, down = random_nvfp4(rng, e, f, l), random_nvfp4(rng, e, l, f)
    else:
        up, down = make(e, f, l) * np.float32(1.5 / np.sqrt(l)), make(e, l, f) * np.float32(1.5 / np.sqrt(f))
    idx = distinct_experts(rng, t, e, k)
    out = run(be, be.moe_experts, x, idx, weights, up, down)
    assert_close(out, moe.moe_experts(x, idx, weights, up, down), "kernel_moe", what=f"moe_experts ({fmt})")


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, up_fmt=st.sampled_from(["dense", "nvfp4", "fp8"]),
       down_fmt=st.sampled_from(["dense", "nvfp4", "fp8"]))
def test_mlp_matches_reference(mode, data, seed, up_fmt, down_fmt):
    """The shared expert / dense MLP: down(relu2(up x)) with each weight dense, NVFP4 or FP8."""
    t = data.draw(crossing(1, 40, 4, 16))
    d, f = (16 * data.draw(st.integers(1, 40)) for _ in range(2))
    make = arrays(seed)
    x = make(2, t, d)
    up = expert_stack(up_fmt, make(f, d) * np.float32(1.5 / np.sqrt(d)))
    down = expert_stack(down_fmt, make(d, f) * np.float32(1.5 / np.sqrt(f)))
    assert_close(run(backend(), backend().mlp, x, up, down), moe.mlp(x, up, down), "kernel_moe", what="mlp")


# ---------------------------------------------------------------------------------------------------------
# NVFP4 / FP8

@pytest.mark.gpu
@requires_cupy
def test_nvfp4_dequantize_bit_exact_over_all_codes():
    """Every packed byte (two E2M1 codes) under every E4M3 scale code, NaN scales included, two tensors."""
    be = backend()
    packed = np.tile(np.arange(256, dtype=np.uint8), (2, 256, 1))                 # [2, 256, 256]: in = 512
    block_scale = np.tile(np.arange(256, dtype=np.uint8)[:, None], (2, 1, 32))    # row r: scale code r
    global_scale = np.array([1.0, 0.0371], dtype=np.float32)
    got = run(be, be.nvfp4_dequantize, packed, block_scale, global_scale)
    assert_bits_equal(got, quant.nvfp4_dequantize(packed, block_scale, global_scale), "nvfp4_dequantize")


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, stacked=st.booleans())
def test_nvfp4_dequantize_matches_reference(mode, data, seed, stacked):
    out = data.draw(crossing(1, 300, 8, 32))
    inn = 16 * data.draw(crossing(1, 70, 32))
    lead = (data.draw(st.integers(1, 4)),) if stacked else ()
    w = quant.nvfp4_quantize(arrays(seed)(*lead, out, inn, lo=-3.0, hi=3.0))
    got = run(backend(), backend().nvfp4_dequantize, w.packed, w.block_scale, w.global_scale)
    assert_bits_equal(got, quant.nvfp4_dequantize(w.packed, w.block_scale, w.global_scale), "nvfp4_dequantize")


def matmul_rows(data):
    """Rows of x: 1 (GEMV), 2..4, 5..16 and more (chunks of 16), crossing every kernel's row block."""
    return data.draw(st.one_of(st.just(1), crossing(1, 70, 4, 16, 32)))


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds, x_3d=st.booleans())
def test_nvfp4_matmul_matches_reference(mode, data, seed, x_3d):
    m = matmul_rows(data)
    out = data.draw(crossing(1, 600, 8, 32))
    inn = 16 * data.draw(crossing(1, 100, 32, 64))  # a warp step reads 32 blocks of 16
    make = arrays(seed)
    w = quant.nvfp4_quantize(make(out, inn))
    x = make(2, m, inn) if x_3d else make(m, inn)
    got = run(backend(), backend().nvfp4_matmul, x, w.packed, w.block_scale, w.global_scale)
    ref = quant.nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale)
    assert_close(got, ref, "kernel_quant_matmul", what="nvfp4_matmul")


@pytest.mark.parametrize("mode", [pytest.param("gpu", marks=gpu)])
@settings(max_examples=EXAMPLES)
@given(data=st.data(), seed=seeds)
def test_fp8_matmul_matches_reference(mode, data, seed):
    m = matmul_rows(data)
    out = data.draw(crossing(1, 600, 8, 32))
    inn = data.draw(crossing(1, 1100, 16, 512))  # any width: the last 16-wide step is partial
    make = arrays(seed)
    w = quant.fp8_quantize(make(out, inn))
    x = make(m, inn)
    got = run(backend(), backend().fp8_matmul, x, w.data, w.scale)
    assert_close(got, quant.fp8_matmul(x, w.data, w.scale), "kernel_quant_matmul", what="fp8_matmul")


@pytest.mark.gpu
@requires_cupy
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("out,inn", [(5120, 2048), (2048, 5120), (8192, 8192)])
def test_nvfp4_matmul_ultra_shapes(m, out, inn):
    """The fused W4A16 GEMV (m = 1) and small GEMM (m = 16) at Ultra's expert and model widths."""
    make, be = arrays(m + out), backend()
    w, x = random_nvfp4(np.random.default_rng(out), out, inn), make(m, inn)
    got = run(be, be.linear, x, w)
    assert_close(got, linear.linear(x, w), "kernel_quant_matmul", what=f"nvfp4 linear {m}x{inn} -> {out}")


@pytest.mark.gpu
@requires_cupy
def test_float64_runs_on_the_reference():
    """Oracle mode: float64 inputs give exactly the reference's float64 results."""
    make, be = arrays(1), backend()
    q, k, v = (make(1, 5, 4, 8).astype(np.float64), make(1, 9, 2, 8).astype(np.float64),
               make(1, 9, 2, 8).astype(np.float64))
    out = run(be, be.gqa_attention, q, k, v)
    assert out.dtype == np.float64 and np.array_equal(out, attention.gqa_attention(q, k, v))
    w = quant.nvfp4_quantize(make(24, 32))
    x = make(3, 32).astype(np.float64)
    got = run(be, be.nvfp4_matmul, x, w.packed, w.block_scale, w.global_scale)
    assert got.dtype == np.float64
    assert np.allclose(got, quant.nvfp4_matmul(x, w.packed, w.block_scale, w.global_scale), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Everywhere (no GPU needed): the split-K plan and the launchers' argument checks

@settings(max_examples=200)
@given(s=st.integers(1, 300_000), blocks=st.integers(1, 5000), n_sm=st.sampled_from([1, 78, 114, 132, 144]))
def test_decode_splits_cover_the_keys_in_whole_tiles(s, blocks, n_sm):
    n_split, keys = attention_cupy.decode_splits(s, blocks, n_sm)
    assert keys % attention_cupy.ATT_TILE == 0 and keys >= attention_cupy.ATT_TILE
    assert (n_split - 1) * keys < s <= n_split * keys  # every key in exactly one split, none empty


def test_launchers_check_arguments_before_touching_a_gpu():
    make = arrays(0)
    with pytest.raises(ShapeError, match="k has shape"):
        attention_cupy.gqa_attention_cupy(make(1, 2, 4, 8), make(1, 3, 2, 9), make(1, 3, 2, 9))
    with pytest.raises(ShapeError, match="t=4 positions"):
        attention_cupy.gqa_decode_cupy(make(1, 4, 4, 8), make(1, 3, 2, 8), make(1, 3, 2, 8))
    with pytest.raises(ShapeError, match="dh=300"):
        attention_cupy.gqa_attention_cupy(make(1, 1, 2, 300), make(1, 1, 1, 300), make(1, 1, 1, 300))
    with pytest.raises(DtypeError):
        attention_cupy.gqa_attention_cupy(make(1, 1, 2, 8), make(1, 1, 1, 8).astype(np.float64), make(1, 1, 1, 8))
    with pytest.raises(InputError, match="n_group=3"):
        moe_cupy.route_cupy(make(2, 8), make(8, 8), None, 2, n_group=3)
    with pytest.raises(InputError, match="top_k=5"):
        moe_cupy.route_cupy(make(2, 8), make(8, 8), None, 5, n_group=4, topk_group=2)
    idx = np.zeros((3, 2), np.int64)
    with pytest.raises(DtypeError, match="idx"):
        moe_cupy.moe_experts_cupy(make(3, 16), idx.astype(np.float32), make(3, 2), make(4, 8, 16), make(4, 16, 8))
    with pytest.raises(ShapeError, match="down"):
        moe_cupy.moe_experts_cupy(make(3, 16), idx, make(3, 2), make(4, 8, 16), make(4, 16, 9))
    with pytest.raises(ShapeError, match="multiple of 16"):
        quant_cupy.nvfp4_matmul_cupy(make(2, 24), np.zeros((4, 12), np.uint8), np.zeros((4, 1), np.uint8),
                                     np.ones((), np.float32))
    with pytest.raises(DtypeError, match="uint8"):
        quant_cupy.fp8_matmul_cupy(make(2, 8), make(4, 8), np.ones((), np.float32))
    with pytest.raises(ShapeError, match="x has shape"):
        quant_cupy.fp8_matmul_cupy(make(2, 7), np.zeros((4, 8), np.uint8), np.ones((), np.float32))
