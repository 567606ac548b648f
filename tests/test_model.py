"""The model on random checkpoints written by make_random_checkpoint: cache semantics, generation, errors."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nemo_scratch
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import InputError
from tolerances import assert_close


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    make_random_checkpoint(out, preset("tiny"), seed=0)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return nemo_scratch.load(tiny_dir)


def test_forward_shape_dtype(tiny):
    logits = tiny.forward([[1, 2, 3, 4, 5]])
    assert logits.shape == (1, 5, tiny.cfg.vocab_size)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))


def test_float64_oracle_mode(tiny_dir, tiny):
    m64 = nemo_scratch.load(tiny_dir, dtype="float64")
    ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    got64 = m64.forward(ids)
    assert got64.dtype == np.float64
    assert_close(tiny.forward(ids), got64.astype(np.float32), "model_vs_transformers", np.float32)


@pytest.mark.parametrize("split", [1, 3, 8, 9, 17])
def test_prefill_then_steps_equals_forward(tiny, split):
    ids = np.random.default_rng(split).integers(0, tiny.cfg.vocab_size, size=(2, 20))
    full = tiny.forward(ids)
    cache = tiny.new_cache(2)
    parts = [tiny.forward(ids[:, :split], cache)]
    for t in range(split, 20):
        parts.append(tiny.forward(ids[:, t:t + 1], cache))
    assert cache.length == 20
    assert_close(np.concatenate(parts, axis=1), full, "model_step_vs_forward", np.float32)


def test_chunked_continuation_equals_forward(tiny):
    """Two multi-token forwards chained by the cache (prefill continuation) equal one forward."""
    ids = np.random.default_rng(7).integers(0, tiny.cfg.vocab_size, size=(1, 19))
    cache = tiny.new_cache(1)
    got = np.concatenate([tiny.forward(ids[:, :10], cache), tiny.forward(ids[:, 10:], cache)], axis=1)
    assert_close(got, tiny.forward(ids), "model_step_vs_forward", np.float32)


def test_generate_greedy_is_deterministic_and_matches_argmax(tiny):
    prompt = [3, 1, 4, 1, 5]
    res = tiny.generate(prompt, 6)
    assert res.ids.shape == (1, 6)
    # greedy = argmax of a full forward over prompt + generated prefix, token by token
    seq = list(prompt)
    for tok in res.ids[0]:
        assert int(np.argmax(tiny.forward([seq])[0, -1])) == tok
        seq.append(int(tok))
    assert res.tokens_per_s > 0


def test_generate_sampling_seeded(tiny):
    a = tiny.generate([1, 2, 3], 8, greedy=False, temperature=0.8, top_p=0.9, seed=5).ids
    b = tiny.generate([1, 2, 3], 8, greedy=False, temperature=0.8, top_p=0.9, seed=5).ids
    np.testing.assert_array_equal(a, b)


def test_generate_batch(tiny):
    res = tiny.generate([[1, 2, 3], [4, 5, 6]], 4)
    assert res.ids.shape == (2, 4)
    np.testing.assert_array_equal(res.ids[1], tiny.generate([4, 5, 6], 4).ids[0])


@pytest.mark.parametrize("ids, match", [
    ([[1, 2, 256]], "outside the vocabulary"),
    ([[-1]], "outside the vocabulary"),
    ([[]], "non-empty"),
    ([[1.5, 2.0]], "integers"),
])
def test_bad_ids(tiny, ids, match):
    with pytest.raises(InputError, match=match):
        tiny.forward(ids)


def test_bad_generate_args(tiny):
    with pytest.raises(InputError, match="max_new_tokens"):
        tiny.generate([1], 0)
    with pytest.raises(InputError, match="temperature"):
        tiny.generate([1], 2, greedy=False, temperature=0)
    with pytest.raises(InputError, match="top_p"):
        tiny.generate([1], 2, top_p=1.5)
    with pytest.raises(InputError, match="dt_floor"):
        nemo_scratch.load(tiny.path, dt_floor="sometimes")


def test_dt_floor_switch(tiny_dir):
    base = nemo_scratch.load(tiny_dir)
    hf = nemo_scratch.load(tiny_dir, dt_floor="transformers")
    assert base.dt_limit[0] == 0.0 and hf.dt_limit[0] == pytest.approx(base.cfg.time_step_min)
    assert nemo_scratch.load(tiny_dir, dt_floor=0.01).dt_limit[0] == pytest.approx(0.01)


@settings(max_examples=15)
@given(t=st.integers(2, 21), chunk=st.integers(1, 22), batch=st.integers(1, 2), last_only=st.booleans())
@example(t=20, chunk=1, batch=1, last_only=False)     # one token a chunk: the decode path all the way
@example(t=21, chunk=8, batch=2, last_only=False)     # the SSD chunk size of the tiny preset, not dividing t
@example(t=17, chunk=5, batch=1, last_only=True)      # neither divides the other
def test_chunked_prefill_equals_one_forward(tiny, t, chunk, batch, last_only):
    """prefill_chunk=N runs the prompt N tokens at a time through the cache: the same logits as one pass."""
    ids = np.random.default_rng(t * 31 + chunk).integers(0, tiny.cfg.vocab_size, size=(batch, t))
    whole = tiny.forward(ids, last_only=last_only)
    cache = tiny.new_cache(batch)
    got = tiny.forward(ids, cache, last_only=last_only, prefill_chunk=chunk)
    assert got.shape == whole.shape and got.dtype == whole.dtype and cache.length == t
    assert_close(got, whole, "model_step_vs_forward", np.float32, what=f"chunk={chunk}")
    # the cache carried through the chunks continues like the one-pass cache
    ref_cache = tiny.new_cache(batch)
    tiny.forward(ids, ref_cache)
    nxt = ids[:, :1]
    assert_close(tiny.forward(nxt, cache), tiny.forward(nxt, ref_cache), "model_step_vs_forward", np.float32)


def test_chunked_prefill_in_generate(tiny):
    prompt = list(np.random.default_rng(3).integers(0, tiny.cfg.vocab_size, size=19))
    plain = tiny.generate(prompt, 6).ids
    np.testing.assert_array_equal(tiny.generate(prompt, 6, prefill_chunk=4).ids, plain)
    np.testing.assert_array_equal(tiny.generate(prompt, 6, prefill_chunk=3, mtp=True, draft_depth=2).ids, plain)
    for bad in (0, -2, 1.5, "8", True):
        with pytest.raises(InputError, match="prefill_chunk"):
            tiny.forward([[1, 2, 3]], prefill_chunk=bad)
