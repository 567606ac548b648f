"""nemo_scratch.ops.attention: GQA without positional encoding.

- equals the textbook definition written per head (scale dh**-0.5, the queries are the last t keys);
- decode token by token (and a few tokens at a time) equals the prefill;
- GQA equals multi-head attention with the kv heads repeated (repeat_kv);
- causal: changing future keys and values does not change earlier outputs;
- the softmax is stable for large scores.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.errors import ShapeError
from nemo_scratch.ops.attention import gqa_attention, gqa_decode

DTYPES = st.sampled_from(["float32", "float64"])


def make_qkv(seed, b, t, s, nkv, rep, dh, dtype, scale=1.0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    return normal(b, t, nkv * rep, dh), normal(b, s, nkv, dh), normal(b, s, nkv, dh)


def attention_by_definition(q, k, v, causal):
    """One (batch, query head, query) at a time, in float64."""
    b, t, nq, dh = q.shape
    s, nkv = k.shape[1:3]
    out = np.zeros(q.shape)
    for bb in range(b):
        for j in range(nq):
            kk, vv = k[bb, :, j // (nq // nkv)].astype(np.float64), v[bb, :, j // (nq // nkv)].astype(np.float64)
            for i in range(t):
                scores = kk @ q[bb, i, j].astype(np.float64) / np.sqrt(dh)
                if causal:
                    scores[s - t + i + 1:] = -np.inf  # query i is key position s - t + i
                p = np.exp(scores - scores.max())
                out[bb, i, j] = (p / p.sum()) @ vv
    return out.astype(q.dtype)


qkv_shapes = dict(seed=st.integers(0, 2**16), b=st.integers(1, 2), s=st.integers(1, 7), t_frac=st.floats(0, 1),
                  nkv=st.integers(1, 2), rep=st.sampled_from([1, 2, 3]), dh=st.integers(1, 5), dtype=DTYPES)


@given(causal=st.booleans(), **qkv_shapes)
@example(causal=True, seed=0, b=1, s=1, t_frac=1.0, nkv=1, rep=1, dh=1, dtype="float32")
def test_matches_definition(causal, seed, b, s, t_frac, nkv, rep, dh, dtype):
    t = max(1, round(t_frac * s))
    q, k, v = make_qkv(seed, b, t, s, nkv, rep, dh, dtype)
    out = gqa_attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, attention_by_definition(q, k, v, causal), "attention")


@given(**qkv_shapes)
@example(seed=0, b=1, s=5, t_frac=0.0, nkv=2, rep=2, dh=2, dtype="float32")
def test_decode_token_by_token_equals_prefill(seed, b, s, t_frac, nkv, rep, dh, dtype):
    q, k, v = make_qkv(seed, b, s, s, nkv, rep, dh, dtype)
    prefill = gqa_attention(q, k, v)
    step = max(1, round(t_frac * 3))  # decode 1, 2 or 3 new tokens per call (speculative verification)
    outs = []
    for start in range(0, s, step):
        end = min(start + step, s)
        # the cache holds keys 0 .. end-1; the new tokens start .. end-1 are the last of them
        outs.append(gqa_decode(q[:, start:end], k[:, :end], v[:, :end]))
    assert_close(np.concatenate(outs, axis=1), prefill, "attention", what="decode vs prefill")


@given(**qkv_shapes)
def test_gqa_equals_mha_with_repeated_kv(seed, b, s, t_frac, nkv, rep, dh, dtype):
    t = max(1, round(t_frac * s))
    q, k, v = make_qkv(seed, b, t, s, nkv, rep, dh, dtype)
    # repeat_kv: query head j reads kv head j // rep
    mha = gqa_attention(q, np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2))
    assert_close(gqa_attention(q, k, v), mha, "attention", what="GQA vs MHA")


@given(seed=st.integers(0, 2**16), s=st.integers(2, 8), cut_frac=st.floats(0, 1), dtype=DTYPES)
def test_future_keys_do_not_change_earlier_outputs(seed, s, cut_frac, dtype):
    q, k, v = make_qkv(seed, 1, s, s, 2, 2, 3, dtype)
    cut = 1 + int(cut_frac * (s - 2))  # positions >= cut are "the future"
    k2, v2 = k.copy(), v.copy()
    rng = np.random.default_rng(seed + 1)
    k2[:, cut:] = rng.standard_normal(k2[:, cut:].shape)
    v2[:, cut:] = rng.standard_normal(v2[:, cut:].shape)
    before, after = gqa_attention(q, k, v), gqa_attention(q, k2, v2)
    np.testing.assert_array_equal(after[:, :cut], before[:, :cut])
    assert not np.array_equal(after[:, cut:], before[:, cut:])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_is_stable_for_large_scores(dtype):
    q, k, v = make_qkv(3, 1, 4, 6, 1, 2, 4, dtype, scale=300.0)  # scores ~ 1e5: exp would overflow unshifted
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = gqa_attention(q, k, v)
    assert np.all(np.isfinite(out))
    assert_close(out, attention_by_definition(q, k, v, True), "attention")


def test_more_queries_than_keys_raises():
    q, k, v = make_qkv(0, 1, 3, 2, 1, 1, 2, "float32")
    with pytest.raises(ShapeError, match="t <= s"):
        gqa_attention(q, k, v)


def test_kv_heads_must_divide_query_heads():
    q, _, _ = make_qkv(0, 1, 2, 2, 1, 3, 2, "float32")
    _, k, v = make_qkv(0, 1, 2, 2, 2, 1, 2, "float32")
    with pytest.raises(ShapeError, match="kv heads"):
        gqa_attention(q, k, v)


@given(seed=st.integers(0, 2**16), t=st.integers(1, 12), extra=st.integers(0, 6), tile=st.integers(1, 5),
       causal=st.booleans(), dtype=DTYPES)
@example(seed=0, t=7, extra=3, tile=1, causal=True, dtype="float32")
def test_query_tiles_do_not_change_the_result(seed, t, extra, tile, causal, dtype):
    """The queries run a tile at a time (bounded score memory): any tile size gives the one-shot result."""
    import nemo_scratch.ops.attention as attention_module

    q, k, v = make_qkv(seed, 2, t, t + extra, 2, 3, 4, dtype)
    whole = gqa_attention(q, k, v, causal)
    saved = attention_module.SCORE_TILE_BYTES
    try:
        # a budget of exactly `tile` query rows of scores
        attention_module.SCORE_TILE_BYTES = 2 * 6 * (t + extra) * np.dtype(dtype).itemsize * tile
        assert attention_module.query_tile(2, 6, t + extra, np.dtype(dtype).itemsize) == tile
        tiled = gqa_attention(q, k, v, causal)
    finally:
        attention_module.SCORE_TILE_BYTES = saved
    assert tiled.shape == whole.shape and tiled.dtype == whole.dtype
    assert_close(tiled, whole, "attention", what=f"tile={tile}")
