"""nemo_scratch.ops.moe: the router, squared-ReLU MLPs, routed experts and LatentMoE (spec 5).

Router invariants: exactly k distinct experts per token, ordered by biased score (ties to the lower index);
the bias steers the selection but never enters the weights; group limiting never leaves the kept groups;
normalised weights sum to routed_scaling_factor. (oracle) selected sets and weights equal transformers'
NemotronHTopkRouter. moe_experts equals a naive per-token loop; latent_moe with fc1/fc2 None equals
moe_experts, and with them equals fc2(experts(fc1 x)).
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.errors import InputError
from nemo_scratch.ops.linear import linear
from nemo_scratch.ops.moe import latent_moe, mlp, moe_experts, relu2, route

DTYPES = st.sampled_from(["float32", "float64"])


def normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def sigmoid64(a):
    return 1 / (1 + np.exp(-a.astype(np.float64)))


router_cases = dict(seed=st.integers(0, 2**16), t=st.integers(1, 5), d=st.integers(1, 6),
                    n_group=st.sampled_from([1, 2, 4]), group_size=st.integers(2, 4), groups_frac=st.floats(0, 1),
                    k_frac=st.floats(0, 1), with_bias=st.booleans(), norm=st.booleans(),
                    scale=st.sampled_from([1.0, 2.5]), dtype=DTYPES)


def draw_router(seed, t, d, n_group, group_size, groups_frac, k_frac, with_bias, dtype):
    """Random router inputs and a valid (topk_group, top_k) for them."""
    rng = np.random.default_rng(seed)
    e = n_group * group_size
    topk_group = 1 + int(groups_frac * (n_group - 1))
    top_k = 1 + int(k_frac * (topk_group * group_size - 1))
    bias = normal(rng, (e,), dtype, 0.3) if with_bias else None
    return normal(rng, (t, d), dtype), normal(rng, (e, d), dtype), bias, top_k, topk_group


@given(**router_cases)
@example(seed=0, t=1, d=1, n_group=1, group_size=2, groups_frac=0.0, k_frac=1.0, with_bias=False, norm=True,
         scale=1.0, dtype="float32")
def test_router_invariants(seed, t, d, n_group, group_size, groups_frac, k_frac, with_bias, norm, scale, dtype):
    x, gate, bias, top_k, topk_group = draw_router(seed, t, d, n_group, group_size, groups_frac, k_frac,
                                                   with_bias, dtype)
    idx, w = route(x, gate, bias, top_k, n_group, topk_group, norm_topk_prob=norm, routed_scaling_factor=scale)
    assert idx.shape == (t, top_k) and idx.dtype == np.int64
    assert w.shape == (t, top_k) and w.dtype == dtype
    s = sigmoid64(x @ gate.T)                                                          # [t, e] unbiased
    sc = s if bias is None else s + bias                                               # biased, for selection
    tol = 1e-5 if dtype == "float32" else 1e-12  # scores recomputed here in float64: near-ties may swap
    for tt in range(t):
        chosen = idx[tt]
        picked = sc[tt, chosen]
        # exactly k distinct experts, in descending biased score
        assert len(set(chosen.tolist())) == top_k
        assert np.all(np.diff(picked) <= tol)
        # group limiting: every chosen expert lies in one of the topk_group best groups (top-2 sums)
        group_scores = np.sort(sc[tt].reshape(n_group, group_size), axis=-1)[:, -2:].sum(-1)
        threshold = np.sort(group_scores)[::-1][topk_group - 1]
        assert np.all(group_scores[chosen // group_size] >= threshold - tol)
        # no unchosen expert of a clearly kept group beats a chosen one
        kept = np.flatnonzero(np.repeat(group_scores >= threshold + tol, group_size))
        others = np.setdiff1d(kept, chosen)
        assert np.all(sc[tt, others] <= picked.min() + tol)
    # weights: the UNBIASED sigmoid of the chosen experts, normalised (+1e-20), times the scale
    want = np.take_along_axis(s, idx, axis=-1)
    if norm:
        want = want / (want.sum(-1, keepdims=True) + 1e-20)
        assert_close(w.sum(-1), np.full(t, scale, dtype), "router", what="normalised weights sum")
    assert_close(w, (want * scale).astype(dtype), "router", what="weights")


def test_bias_changes_selection_but_not_the_weight_formula():
    rng = np.random.default_rng(0)
    x, gate = normal(rng, (4, 6), "float64"), normal(rng, (8, 6), "float64")
    idx0, _ = route(x, gate, None, 2)
    bias = np.zeros(8)
    bias[7] = 10.0  # expert 7 now wins every token's selection ...
    idx1, w1 = route(x, gate, bias, 2)
    assert np.all(idx1[:, 0] == 7) and not np.all(idx0[:, 0] == 7)
    s = sigmoid64(x @ gate.T)
    sel = np.take_along_axis(s, idx1, axis=-1)  # ... but its weight is its own unbiased score
    assert_close(w1, sel / sel.sum(-1, keepdims=True), "router")


def test_ties_go_to_the_lower_index():
    x = np.ones((3, 4), np.float32)
    gate = np.zeros((8, 4), np.float32)  # every expert scores sigmoid(0) = 0.5
    idx, w = route(x, gate, None, 3)
    np.testing.assert_array_equal(idx, [[0, 1, 2]] * 3)
    assert_close(w, np.full((3, 3), 1 / 3, np.float32), "router")
    # group ties too: 4 equal groups, keep 2 -> groups 0 and 1 -> experts 0..3
    idx, _ = route(x, gate, None, 4, n_group=4, topk_group=2)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3]] * 3)


def test_router_rejects_impossible_top_k():
    x, gate = np.ones((1, 2), np.float32), np.ones((8, 2), np.float32)
    with pytest.raises(InputError, match="top_k"):
        route(x, gate, None, 5, n_group=4, topk_group=2)  # only 2 groups x 2 experts can be chosen
    with pytest.raises(InputError, match="n_group"):
        route(x, gate, None, 2, n_group=3)


@pytest.mark.oracle
@pytest.mark.parametrize("n_group, topk_group, top_k, norm", [(1, 1, 3, True), (4, 2, 3, True), (4, 3, 5, False),
                                                               (8, 4, 4, True)])
def test_router_matches_transformers(n_group, topk_group, top_k, norm):
    torch = pytest.importorskip("torch", reason="the oracle test needs torch (extra 'oracle')")
    transformers = pytest.importorskip("transformers", reason="the oracle test needs transformers (extra 'oracle')")
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    e, d, t = 16, 8, 12
    cfg = transformers.NemotronHConfig(hidden_size=d, n_routed_experts=e, num_experts_per_tok=top_k,
                                       n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                       routed_scaling_factor=2.5)
    router = NemotronHTopkRouter(cfg)
    rng = np.random.default_rng(n_group * 10 + top_k)
    x, gate, bias = normal(rng, (t, d), "float32"), normal(rng, (e, d), "float32"), normal(rng, (e,), "float32", .3)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(gate))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, want_w, want_idx = router(torch.from_numpy(x))
    idx, w = route(x, gate, bias, top_k, n_group, topk_group, norm, 2.5)
    # transformers' topk is unsorted: compare the selected SETS, then the weights expert by expert
    want_idx, want_w = want_idx.numpy(), want_w.numpy()
    for tt in range(t):
        assert set(idx[tt].tolist()) == set(want_idx[tt].tolist()), f"token {tt}"
        ref = dict(zip(want_idx[tt].tolist(), want_w[tt].tolist()))
        assert_close(w[tt], np.array([ref[ex] for ex in idx[tt].tolist()], np.float32), "router",
                     what=f"weights of token {tt}")


def experts_by_definition(x, idx, weights, up, down):
    """out[t] = sum_j w[t,j] * down[e] relu(up[e] x[t])^2, one token and one slot at a time, in float64."""
    out = np.zeros(x.shape)
    for tt in range(x.shape[0]):
        for j, ex in enumerate(idx[tt]):
            hidden = np.maximum(up[ex].astype(np.float64) @ x[tt], 0) ** 2
            out[tt] += weights[tt, j] * (down[ex].astype(np.float64) @ hidden)
    return out.astype(x.dtype)


moe_cases = dict(seed=st.integers(0, 2**16), t=st.integers(1, 6), l=st.integers(1, 5), f=st.integers(1, 5),
                 e=st.integers(1, 6), k_frac=st.floats(0, 1), dtype=DTYPES)


def draw_moe(seed, t, l, f, e, k_frac, dtype):
    rng = np.random.default_rng(seed)
    k = 1 + int(k_frac * (e - 1))
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int64)
    return (normal(rng, (t, l), dtype), idx, rng.uniform(0, 2, (t, k)).astype(dtype),
            normal(rng, (e, f, l), dtype), normal(rng, (e, l, f), dtype))


@given(**moe_cases)
@example(seed=0, t=1, l=1, f=1, e=1, k_frac=0.0, dtype="float32")
def test_moe_experts_equal_per_token_loop(seed, t, l, f, e, k_frac, dtype):
    x, idx, weights, up, down = draw_moe(seed, t, l, f, e, k_frac, dtype)
    out = moe_experts(x, idx, weights, up, down)
    assert out.shape == (t, l) and out.dtype == dtype
    assert_close(out, experts_by_definition(x, idx, weights, up, down), "moe")


@given(d=st.integers(1, 6), **moe_cases)
@example(d=5, seed=2, t=4, l=5, f=5, e=3, k_frac=0.5, dtype="float32")  # a float32 cancellation case
def test_latent_moe(seed, t, l, f, e, k_frac, dtype, d):
    x, idx, weights, up, down = draw_moe(seed, t, l, f, e, k_frac, dtype)
    # fc1 = fc2 = None: no latent, the identity
    np.testing.assert_array_equal(latent_moe(x, idx, weights, up, down), moe_experts(x, idx, weights, up, down))
    # with a latent: exactly fc2(moe_experts(fc1 x)) (moe_experts itself is checked against its definition above),
    # the two projections by the reference's own linear (a few rows run ops/quant_fast.py's kernel, not x @ W^T)
    rng = np.random.default_rng(seed + 1)
    xd, fc1, fc2 = normal(rng, (t, d), dtype), normal(rng, (l, d), dtype), normal(rng, (d, l), dtype)
    out = latent_moe(xd, idx, weights, up, down, fc1, fc2)
    assert out.shape == (t, d) and out.dtype == dtype
    np.testing.assert_array_equal(out, linear(moe_experts(linear(xd, fc1), idx, weights, up, down), fc2))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mlp_and_relu2(dtype):
    rng = np.random.default_rng(4)
    x, up, down = normal(rng, (2, 3, 5), dtype), normal(rng, (7, 5), dtype), normal(rng, (5, 7), dtype)
    r = relu2(np.array([-2.0, 0.0, 3.0], dtype))
    np.testing.assert_array_equal(r, np.array([0.0, 0.0, 9.0], dtype))
    out = mlp(x, up, down)
    assert out.shape == x.shape and out.dtype == dtype
    want = np.maximum(x.astype(np.float64) @ up.T, 0) ** 2 @ down.T
    assert_close(out, want.astype(dtype), "moe")


def test_moe_experts_rejects_bad_indices():
    x, idx, weights, up, down = draw_moe(0, 2, 3, 2, 4, 0.5, "float32")
    with pytest.raises(InputError, match="expert ids"):
        moe_experts(x, idx + 4, weights, up, down)
    twice = idx.copy()
    twice[0, 1] = twice[0, 0]
    with pytest.raises(InputError, match="twice"):
        moe_experts(x, twice, weights, up, down)
