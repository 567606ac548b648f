"""The typed decode cache (model/cache.py): KV buffers grown geometrically, Mamba states recorded and accepted."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nemo_scratch.config import preset
from nemo_scratch.errors import InputError
from nemo_scratch.model.cache import KV_INITIAL_CAPACITY, Cache, KVCache, MambaState


@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=12), cut=st.integers(0, 200))
def test_kv_append_equals_concatenation(chunks, cut):
    rng = np.random.default_rng(len(chunks))
    cache, ks, vs = KVCache(2, 3, 4, np.float32), [], []
    for t in chunks:
        k, v = rng.standard_normal((2, t, 3, 4)).astype(np.float32), rng.standard_normal((2, t, 3, 4)).astype(np.float32)
        ks.append(k)
        vs.append(v)
        got_k, got_v = cache.append(k, v)
        np.testing.assert_array_equal(got_k, np.concatenate(ks, axis=1))
        np.testing.assert_array_equal(got_v, np.concatenate(vs, axis=1))
    total = sum(chunks)
    assert cache.length == total
    # geometric growth: the capacity is the initial one doubled as often as needed (or exactly what one
    # append needed), never one position at a time
    assert cache.capacity >= total and (cache.capacity == KV_INITIAL_CAPACITY or cache.capacity < 2 * total + 80)
    cache.truncate(cut)
    assert cache.length == min(cut, total)
    k, v = rng.standard_normal((2, 1, 3, 4)).astype(np.float32), rng.standard_normal((2, 1, 3, 4)).astype(np.float32)
    got_k, _ = cache.append(k, v)
    np.testing.assert_array_equal(got_k, np.concatenate([np.concatenate(ks, axis=1)[:, :min(cut, total)], k], axis=1))


def test_kv_growth_doubles():
    cache = KVCache(1, 1, 2, np.float32, capacity=4)
    capacities = []
    for _ in range(20):
        cache.append(np.ones((1, 1, 1, 2), np.float32), np.ones((1, 1, 1, 2), np.float32))
        capacities.append(cache.capacity)
    assert sorted(set(capacities)) == [4, 8, 16, 32]


def test_mamba_state_record_and_accept():
    cfg = preset("tiny")
    state = MambaState.zeros(cfg, 1, np.float32)
    assert not state.recording and state.conv.shape == (1, cfg.conv_dim, cfg.conv_kernel)
    state.record()
    steps = [(np.full_like(state.conv, i), np.full_like(state.ssm, -i)) for i in range(1, 4)]
    for conv, ssm in steps:
        state.update(conv, ssm)
    state.accept(2)
    assert not state.recording and state.conv is steps[1][0] and state.ssm is steps[1][1]
    with pytest.raises(InputError, match="no recorded forward"):
        state.accept(1)


def test_cache_errors_are_package_errors():
    cfg = preset("tiny")
    cache = Cache(cfg.layers_block_type, cfg, 1, np.float32)
    assert [type(layer).__name__ for layer in cache.layers] == \
        [{"mamba": "MambaState", "attention": "KVCache"}.get(bt, "NoneType") for bt in cfg.layers_block_type]
    with pytest.raises(InputError, match="keep=0"):
        cache.accept(0, 2)
    cache.length = 5
    with pytest.raises(InputError, match="cannot rewind"):
        cache.truncate(3)
    mtp = Cache(cfg.mtp_layers_block_type, cfg, 1, np.float32)
    mtp.length = 5
    mtp.truncate(3)
    assert mtp.length == 3
