"""The core-path ops of every GPU backend against the NumPy reference: GQA attention (prefill and split-K
decode), the MoE router, the routed experts and the MLP (every weight dense, NVFP4 or FP8).

Each test runs for every gpu_harness.BACKEND_MODES run: numba on the CUDA simulator, cupy on the CPU CUDA
emulator (both in CI), numba and cupy on a GPU; the ``be`` fixture hands it the backend. Shapes come from
gpu_harness.DIMS and cross each kernel's tiles with non-multiples (attention key tiles, rows a block and
decode splits; router token blocks and width chunks; expert and matmul tiles; the 16-element NVFP4 block);
pinned cases (``test_*_pinned``) add the boundary cases a few random examples could miss, and on a GPU
``test_*_ultra_*`` run Nemotron 3 Ultra's shapes. Values within the tests/tolerances.py ``kernel_*`` keys;
router selection exactly (same experts, same order; only candidates within float32 rounding of each other
may swap, and exact ties are tested on their own).

The rest of the backend tests: NVFP4/FP8 dequantisation, matmuls and ``linear`` in tests/test_backend_quant.py,
the Mamba path in tests/test_backend_mamba.py, the contract (kernel table, float64, errors, empty inputs) in
tests/test_backend_contract.py, the model end to end in tests/test_backend_model.py, and what is particular
to one backend in tests/test_backend_{numba,cupy}_only.py.
"""

import gpu_harness  # noqa: F401  (first: turns the simulator on before numba is imported)
import numpy as np
import pytest
from gpu_harness import (BACKEND_MODES, arrays, backend_modes, dim, dyadic, kernel_settings, pack, pinned,
                         random_nvfp4, run, seeds)
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.ops import attention, moe

FORMATS = st.sampled_from(["dense", "nvfp4", "fp8"])
EMU_GPU = ("emu", "gpu")


# ---------------------------------------------------------------------------------------------------------
# GQA attention: prefill (tiled online softmax) and decode (split-K + merge)

@st.composite
def attention_shapes(draw, mode, decode):
    """b, t <= s, kv heads, q heads per kv head, dh; s and t * q cross the key tiles, row blocks and splits."""
    b, nkv, ratio, dh = (draw(dim(mode, k)) for k in ("batch", "kv_heads", "q_per_kv", "attn_head_dim"))
    if decode:
        s = draw(dim(mode, "decode_keys"))
        t = min(s, draw(dim(mode, "decode_queries")))
    else:
        s = draw(dim(mode, "keys"))
        t = min(s, draw(dim(mode, "queries")))   # often all s positions (a prefill), else the last t
    return dict(b=b, t=t, s=s, nkv=nkv, ratio=ratio, dh=dh)


def qkv(seed, b, t, s, nkv, ratio, dh):  # -> q [b,t,q,dh], k [b,s,kv,dh], v [b,s,kv,dh]
    make = arrays(seed)
    return make(b, t, nkv * ratio, dh, lo=-2, hi=2), make(b, s, nkv, dh, lo=-2, hi=2), make(b, s, nkv, dh)


def check_gqa_attention(be, seed, causal=True, **shape):
    q, k, v = qkv(seed, **shape)
    assert_close(run(be, be.gqa_attention, q, k, v, causal=causal), attention.gqa_attention(q, k, v, causal=causal),
                 "kernel_attention", what=f"gqa_attention {shape} causal={causal}")


def check_gqa_decode(be, seed, **shape):
    q, k, v = qkv(seed, **shape)
    assert_close(run(be, be.gqa_decode, q, k, v), attention.gqa_decode(q, k, v), "kernel_attention",
                 what=f"gqa_decode {shape}")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, causal=st.booleans())
def test_gqa_attention_matches_reference(be, mode, data, seed, causal):
    check_gqa_attention(be, seed, causal, **data.draw(attention_shapes(mode, decode=False)))


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings(2 * gpu_harness.EXAMPLES)  # cheap on the simulator and the emulator: twice the examples
@given(data=st.data(), seed=seeds)
def test_gqa_decode_matches_reference(be, mode, data, seed):
    check_gqa_decode(be, seed, **data.draw(attention_shapes(mode, decode=True)))


@pytest.mark.parametrize("backend, mode, case", pinned([
    (("sim",), "tiles-and-row-blocks", dict(seed=9, b=1, t=9, s=9, nkv=2, ratio=3, dh=3)),
    (EMU_GPU, "tiles-and-row-blocks", dict(seed=9, b=1, t=65, s=65, nkv=2, ratio=3, dh=33)),
    (EMU_GPU, "dh256-opt-in-smem", dict(seed=10, b=1, t=11, s=33, nkv=1, ratio=2, dh=256)),
]))
def test_gqa_attention_pinned(be, mode, case):
    check_gqa_attention(be, **case)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (("sim",), "splits-ragged", dict(seed=11, b=1, t=3, s=17, nkv=2, ratio=3, dh=4)),
    (EMU_GPU, "4-splits-ragged", dict(seed=11, b=1, t=3, s=97, nkv=2, ratio=8, dh=40)),
]))
def test_gqa_decode_pinned(be, mode, case):
    check_gqa_decode(be, **case)


CAUSAL = {"sim": (9, 5, 3), "emu": (48, 40, 32), "gpu": (70, 40, 64)}  # (s = t, first changed key, dh)


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_gqa_attention_is_causal(be, mode):
    """Changing the keys/values after a query's position leaves its output unchanged, bit for bit."""
    s, cut, dh = CAUSAL[mode]
    make = arrays(3)
    q, k, v = make(1, s, 4, dh), make(1, s, 2, dh), make(1, s, 2, dh)
    k2, v2 = k.copy(), v.copy()
    k2[:, cut:], v2[:, cut:] = make(1, s - cut, 2, dh), make(1, s - cut, 2, dh)
    out, out2 = run(be, be.gqa_attention, q, k, v), run(be, be.gqa_attention, q, k2, v2)
    assert out.shape == q.shape and out.dtype == np.float32
    assert np.array_equal(out[:, :cut], out2[:, :cut])
    assert not np.array_equal(out[:, cut:], out2[:, cut:])


@pytest.mark.parametrize("backend, mode", backend_modes("gpu"))
@pytest.mark.parametrize("s", [1, 4096, 4097])
def test_gqa_decode_ultra_shape(be, mode, s):
    """One decode token against an Ultra attention layer's cache: 64 q heads over 2 kv heads x 128."""
    q, k, v = qkv(s, b=1, t=1, s=s, nkv=2, ratio=32, dh=128)
    ref = attention.gqa_attention(q, k, v)
    assert_close(run(be, be.gqa_decode, q, k, v), ref, "kernel_attention", what="gqa_decode (Ultra)")
    assert_close(run(be, be.gqa_attention, q, k, v), ref, "kernel_attention", what="gqa_attention t=1 (Ultra)")


@pytest.mark.parametrize("backend, mode", backend_modes("gpu"))
def test_gqa_attention_ultra_prefill_shape(be, mode):
    check_gqa_attention(be, seed=7, b=1, t=300, s=300, nkv=2, ratio=32, dh=128)


# ---------------------------------------------------------------------------------------------------------
# Router: sigmoid scores, biased group-limited top-k, normalised and scaled weights

def assert_same_selection(idx, idx_ref, x, gate, bias, margin=1e-6):
    """Same experts in the same order, token by token. Where they differ, every differing pair must be a
    near-tie: biased scores within ``margin`` (a kernel's expf and NumPy's exp may round sigmoid one ulp
    apart, so candidates that close may be ranked either way; exact ties are tested separately)."""
    assert idx.shape == idx_ref.shape and idx.dtype == np.int64
    logits = x.astype(np.float64) @ gate.T.astype(np.float64)
    choice = 1 / (1 + np.exp(-logits)) + (0 if bias is None else bias.astype(np.float64))
    for tok in np.nonzero(np.any(idx != idx_ref, axis=1))[0]:
        got, ref = choice[tok, idx[tok]], choice[tok, idx_ref[tok]]
        assert np.all(np.abs(got - ref) < margin), (
            f"router selection differs at token {tok}: {idx[tok].tolist()} vs reference {idx_ref[tok].tolist()}")


@st.composite
def router_shapes(draw, mode):
    """t, d, e = n_group * experts a group, top_k often the largest allowed (every expert of the kept groups)."""
    t, d, n_group, per_group = (draw(dim(mode, k)) for k in ("tokens", "router_width", "n_group",
                                                             "experts_per_group"))
    topk_group = draw(st.integers(1, n_group))
    k_max = topk_group * per_group
    top_k = draw(st.one_of(st.just(k_max), st.integers(max(1, k_max - 2), k_max), st.integers(1, k_max)))
    return dict(t=t, d=d, e=n_group * per_group, top_k=top_k, n_group=n_group, topk_group=topk_group)


def check_route(be, seed, t, d, e, top_k, n_group, topk_group, with_bias, norm_topk, scaling):
    rng = np.random.default_rng(seed)
    x, gate = dyadic(rng, (t, d), 8, 1 / 8), dyadic(rng, (e, d), 8, 1 / 64)
    bias = dyadic(rng, (e,), 8, 1 / 128) if with_bias else None
    args = (top_k, n_group, topk_group, norm_topk, scaling)
    idx, w = run(be, be.route, x, gate, bias, *args)
    idx_ref, w_ref = moe.route(x, gate, bias, *args)
    assert_same_selection(idx, idx_ref, x, gate, bias)
    same = np.all(idx == idx_ref, axis=1)  # weights are comparable where the same experts were picked
    assert_close(w[same], w_ref[same], "kernel_router", what=f"route weights e={e} top_k={top_k}")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings(2 * gpu_harness.EXAMPLES)
@given(data=st.data(), seed=seeds, with_bias=st.booleans(), norm_topk=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5, 5.0]))
def test_route_matches_reference(be, mode, data, seed, with_bias, norm_topk, scaling):
    check_route(be, seed, **data.draw(router_shapes(mode)), with_bias=with_bias, norm_topk=norm_topk,
                scaling=scaling)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (("sim",) + EMU_GPU, "one-group-of-40-all-picked",
     dict(seed=12, t=5, d=33, e=40, top_k=40, n_group=1, topk_group=1, with_bias=True, norm_topk=True)),
    (("sim",) + EMU_GPU, "4-groups-keep-2",
     dict(seed=13, t=9, d=40, e=12, top_k=3, n_group=4, topk_group=2, with_bias=False, norm_topk=False)),
]))
def test_route_pinned(be, mode, case):
    check_route(be, **case, scaling=2.5)


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
def test_route_ties_go_to_the_lower_index(be, mode):
    """Exact ties go to the lower expert and group index, exactly as in the reference: duplicated gate rows
    and biases (experts 2i and 2i+1 score the same), and x = 0 (every score is sigmoid(0): index order)."""
    make = arrays(3)
    gate = np.repeat(make(8, 12), 2, axis=0)
    bias = np.repeat(make(8, lo=-0.1, hi=0.1), 2)
    x = np.concatenate([make(3, 12), np.zeros((2, 12), np.float32)])
    for n_group, topk_group, top_k in ((1, 1, 5), (4, 2, 7), (8, 3, 6), (2, 2, 16)):
        args = (top_k, n_group, topk_group, True, 1.0)
        idx, w = run(be, be.route, x, gate, bias, *args)
        idx_ref, w_ref = moe.route(x, gate, bias, *args)
        assert idx.shape == idx_ref.shape and idx.dtype == np.int64
        assert np.array_equal(idx, idx_ref), f"n_group={n_group}: {idx} vs {idx_ref}"
        assert_close(w, w_ref, "kernel_router")
    x, gate = np.zeros((5, 16), np.float32), arrays(0)(12, 16)
    for top_k, n_group, topk_group in [(4, 1, 1), (5, 4, 2)]:
        idx, w = run(be, be.route, x, gate, None, top_k, n_group, topk_group)
        idx_ref, w_ref = moe.route(x, gate, None, top_k, n_group, topk_group)
        assert np.array_equal(idx, idx_ref) and np.array_equal(idx[0], np.arange(top_k))
        assert_close(w, w_ref, "kernel_router")


@pytest.mark.parametrize("backend, mode", backend_modes("gpu"))
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4)])
def test_route_ultra_shape(be, mode, n_group, topk_group):
    """Ultra's router: d = 8192, 512 experts, top-22, routed_scaling_factor 5 (and the 8/4 grouping variant)."""
    rng = np.random.default_rng(11)
    x, gate = dyadic(rng, (9, 8192), 8, 1 / 8), dyadic(rng, (512, 8192), 2, 1 / 64)
    bias = dyadic(rng, (512,), 8, 1 / 256)
    args = (22, n_group, topk_group, True, 5.0)
    idx, w = run(be, be.route, x, gate, bias, *args)
    idx_ref, w_ref = moe.route(x, gate, bias, *args)
    assert_same_selection(idx, idx_ref, x, gate, bias)
    same = np.all(idx == idx_ref, axis=1)
    assert_close(w[same], w_ref[same], "kernel_router", what="router weights (Ultra)")


# ---------------------------------------------------------------------------------------------------------
# Routed experts (dispatch, grouped matmuls, relu2, combine) and the dense MLP / shared expert, with every
# weight dense, NVFP4 or FP8

def distinct_experts(rng, t, e, k):  # -> idx [t, k] int64, k distinct experts a token (as route() gives)
    return np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int64).reshape(t, k)


def width(draw, mode, nvfp4):
    """The input width of a weight: any size (dense, FP8), whole 16-element blocks for NVFP4."""
    return 16 * draw(dim(mode, "nvfp4_blocks")) if nvfp4 else draw(dim(mode, "moe_width"))


def check_moe_experts(be, seed, t, e, k, l, f, up_fmt, down_fmt):
    make, rng = arrays(seed), np.random.default_rng(seed)
    x, weights = make(t, l), make(t, k, lo=0.0, hi=1.0)
    # scaled so that up x and down h stay O(1): the tolerance is then about summation order alone
    up = pack(up_fmt, make(e, f, l) * np.float32(1.5 / np.sqrt(l)))
    down = pack(down_fmt, make(e, l, f) * np.float32(1.5 / np.sqrt(f)))
    idx = distinct_experts(rng, t, e, k)
    assert_close(run(be, be.moe_experts, x, idx, weights, up, down), moe.moe_experts(x, idx, weights, up, down),
                 "kernel_moe", what=f"moe_experts t={t} e={e} k={k} l={l} f={f} {up_fmt}/{down_fmt}")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, up_fmt=FORMATS, down_fmt=FORMATS)
def test_moe_experts_matches_reference(be, mode, data, seed, up_fmt, down_fmt):
    t, e = data.draw(dim(mode, "moe_tokens")), data.draw(dim(mode, "experts"))
    k = data.draw(st.one_of(st.just(e), st.integers(max(1, e - 1), e), st.integers(1, e)))
    l, f = width(data.draw, mode, up_fmt == "nvfp4"), width(data.draw, mode, down_fmt == "nvfp4")  # up [e,f,l]
    check_moe_experts(be, seed, t, e, k, l, f, up_fmt, down_fmt)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "two-tiles-nvfp4-fp8", dict(seed=14, t=17, e=3, k=2, l=32, f=48, up_fmt="nvfp4", down_fmt="fp8")),
    (EMU_GPU, "one-full-tile", dict(seed=15, t=16, e=4, k=4, l=16, f=32, up_fmt="dense", down_fmt="nvfp4")),
]))
def test_moe_experts_pinned(be, mode, case):
    check_moe_experts(be, **case)


@pytest.mark.parametrize("backend, mode", backend_modes("gpu"))
@pytest.mark.parametrize("fmt", ["dense", "nvfp4"])
def test_moe_experts_ultra_width(be, mode, fmt):
    """Experts of Ultra's width (5120 x latent 2048), 16 tokens routed over 8 of them, 4 each."""
    make, rng = arrays(5), np.random.default_rng(5)
    t, l, f, e, k = 16, 2048, 5120, 8, 4
    x, weights = make(t, l), make(t, k, lo=0.0, hi=1.0)
    if fmt == "nvfp4":
        up, down = random_nvfp4(rng, e, f, l), random_nvfp4(rng, e, l, f)
    else:
        up, down = make(e, f, l) * np.float32(1.5 / np.sqrt(l)), make(e, l, f) * np.float32(1.5 / np.sqrt(f))
    idx = distinct_experts(rng, t, e, k)
    assert_close(run(be, be.moe_experts, x, idx, weights, up, down), moe.moe_experts(x, idx, weights, up, down),
                 "kernel_moe", what=f"moe_experts ({fmt}, Ultra)")


def check_mlp(be, seed, x_shape, f, up_fmt, down_fmt):
    """down(relu2(up x)) with each weight dense, NVFP4 or FP8; x [..., d]."""
    make, d = arrays(seed), x_shape[-1]
    x = make(*x_shape)
    up = pack(up_fmt, make(f, d) * np.float32(1.5 / np.sqrt(d)))
    down = pack(down_fmt, make(d, f) * np.float32(1.5 / np.sqrt(f)))
    assert_close(run(be, be.mlp, x, up, down), moe.mlp(x, up, down), "kernel_quant_matmul",
                 what=f"mlp x={x_shape} f={f} {up_fmt}/{down_fmt}")


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@kernel_settings()
@given(data=st.data(), seed=seeds, up_fmt=FORMATS, down_fmt=FORMATS, lead=st.sampled_from([(), (2,)]))
def test_mlp_matches_reference(be, mode, data, seed, up_fmt, down_fmt, lead):
    t = data.draw(dim(mode, "matmul_rows"))
    d, f = width(data.draw, mode, up_fmt == "nvfp4"), width(data.draw, mode, down_fmt == "nvfp4")  # up [f,d]
    check_mlp(be, seed, (*lead, t, d), f, up_fmt, down_fmt)


@pytest.mark.parametrize("backend, mode, case", pinned([
    (EMU_GPU, "rows-past-a-block", dict(seed=16, x_shape=(2, 5, 32), f=48, up_fmt="fp8",
                                                    down_fmt="nvfp4")),
]))
def test_mlp_pinned(be, mode, case):
    check_mlp(be, **case)


MLP_WIDTHS = {"sim": (16, 32), "emu": (96, 160), "gpu": (2688, 1856)}  # (d, f); gpu: Nemotron 3 Nano's


@pytest.mark.parametrize("backend, mode", BACKEND_MODES)
@pytest.mark.parametrize("fmt", ["dense", "nvfp4", "fp8"])
def test_mlp_with_packed_weights(be, mode, fmt):
    """Five decode tokens through an MLP whose two weights share one format (gpu: the real model's width)."""
    d, f = MLP_WIDTHS[mode]
    check_mlp(be, 7, (5, 1, d), f, fmt, fmt)
