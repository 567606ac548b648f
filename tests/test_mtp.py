"""MTP head and speculative decoding: lossless greedy, exact rollback, logits from the spec formula."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nemo_scratch.checkpoint.writer import random_tensors
from nemo_scratch.config import preset
from nemo_scratch.errors import InputError
from nemo_scratch.model.generate import show_speculation
from nemo_scratch.model.model import Model
from nemo_scratch.model.weights import build_params
from tolerances import assert_close

_MODELS = {}


def model_for(seed, **overrides):
    key = (seed, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        cfg = preset("tiny", **overrides)
        _MODELS[key] = Model(cfg, build_params(cfg, random_tensors(cfg, seed=seed)))
    return _MODELS[key]


@given(seed=st.integers(0, 3), prompt_len=st.integers(1, 12), depth=st.integers(1, 3),
       new=st.integers(1, 14))
@example(seed=0, prompt_len=2, depth=3, new=12)   # prompt shorter than the conv kernel
@example(seed=1, prompt_len=5, depth=2, new=9)    # rollbacks land mid-chunk (chunk_size 8)
def test_greedy_mtp_is_lossless(seed, prompt_len, depth, new):
    model = model_for(seed)
    prompt = np.random.default_rng(seed + 100 * prompt_len).integers(0, model.cfg.vocab_size, size=prompt_len)
    plain = model.generate(prompt, new)
    spec = model.generate(prompt, new, mtp=True, draft_depth=depth)
    np.testing.assert_array_equal(spec.ids, plain.ids)
    s = spec.stats
    assert s["proposed"] == sum(s["proposed_per_depth"]) and 0 <= s["accepted"] <= s["proposed"]
    assert s["forward_passes"] == 1 + s["rounds"]


def test_speculation_trace_bookkeeping():
    """Each round's trace: drafts, how many were accepted, the backbone's next token; shown per round."""
    model = model_for(0)
    prompt = [5, 9, 2, 7]
    target = model.generate(prompt, 10).ids[0]
    res = model.generate(prompt, 10, mtp=True, draft_depth=2)
    np.testing.assert_array_equal(res.ids[0], target)
    for r in res.stats["trace"]:
        assert 0 <= r["accepted"] <= len(r["drafts"])
    assert "round" in show_speculation(res)


def _assert_same_state(a, b):
    """Cache states equal up to BLAS row-count effects: the verification forward projects 3 rows at once,
    plain decoding one row, so in_proj outputs (the raw conv inputs) may differ in the last bit."""
    assert a.length == b.length
    for la, lb in zip(a.layers, b.layers):
        assert sorted(la) == sorted(lb)
        for key in la:
            if la[key] is None:
                assert lb[key] is None
            else:
                assert_close(la[key], lb[key], "model_step_vs_forward", np.float32, what=key)


def test_state_after_rejected_draft_equals_never_seen():
    """record -> forward [x, d1, d2] -> accept(1) leaves the state of forward [x] alone."""
    model = model_for(2)
    prompt = np.array([[4, 8, 15, 16, 23]])
    a, b = model.new_cache(1), model.new_cache(1)
    model.forward(prompt, a)
    model.forward(prompt, b)
    a.record()
    model.forward([[42, 7, 99]], a)
    a.accept(1, 3)
    model.forward([[42]], b)
    _assert_same_state(a, b)
    assert_close(model.forward([[3]], a), model.forward([[3]], b), "model_step_vs_forward", np.float32)


def test_accept_takes_the_recorded_state_exactly():
    """accept(keep) installs, bit for bit, the state recorded after the keep-th verified token."""
    model = model_for(3)
    cache = model.new_cache(1)
    model.forward([[1, 2, 3]], cache)
    cache.record()
    model.forward([[10, 11, 12]], cache)
    mamba = [layer for layer in cache.layers if "ssm_history" in layer]
    assert mamba, "the tiny preset has Mamba layers"
    expected = [(layer["conv_history"][1].copy(), layer["ssm_history"][1].copy()) for layer in mamba]
    kv_len = [layer["k"].shape[1] for layer in cache.layers if layer.get("k") is not None]
    cache.accept(2, 3)
    for layer, (conv, ssm) in zip(mamba, expected):
        np.testing.assert_array_equal(layer["conv"], conv)
        np.testing.assert_array_equal(layer["ssm"], ssm)
        assert "record" not in layer and "ssm_history" not in layer
    assert [layer["k"].shape[1] for layer in cache.layers if layer.get("k") is not None] == [n - 1 for n in kv_len]
    assert cache.length == 5


def test_accept_two_of_three_equals_two_steps():
    model = model_for(3)
    a, b = model.new_cache(1), model.new_cache(1)
    model.forward([[1, 2, 3]], a)
    model.forward([[1, 2, 3]], b)
    a.record()
    model.forward([[10, 11, 12]], a)
    a.accept(2, 3)
    model.forward([[10]], b)
    model.forward([[11]], b)
    _assert_same_state(a, b)


# ---------------------------------------------------------------- the MTP formula, recomputed independently
def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _attention_block(a, t, pre, cfg):
    x = _rms(a, t[pre + "norm.weight"], cfg.layer_norm_epsilon)
    nq, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ t[pre + "mixer.q_proj.weight"].T).reshape(-1, nq, dh)
    k = (x @ t[pre + "mixer.k_proj.weight"].T).reshape(-1, nkv, dh)
    v = (x @ t[pre + "mixer.v_proj.weight"].T).reshape(-1, nkv, dh)
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        for hq in range(nq):
            kv = hq // (nq // nkv)
            s = k[:i + 1, kv] @ q[i, hq] / np.sqrt(dh)
            p = np.exp(s - s.max())
            out[i, hq] = (p / p.sum()) @ v[:i + 1, kv]
    return a + out.reshape(len(a), -1) @ t[pre + "mixer.o_proj.weight"].T


def _moe_block(a, t, pre, cfg):
    x = _rms(a, t[pre + "norm.weight"], cfg.layer_norm_epsilon)
    m = pre + "mixer."
    out = np.zeros_like(x)
    for i, xi in enumerate(x):
        s = 1 / (1 + np.exp(-(t[m + "gate.weight"] @ xi)))
        chosen = np.argsort(-(s + t[m + "gate.e_score_correction_bias"]), kind="stable")[:cfg.num_experts_per_tok]
        w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
        u = t[m + "fc1_latent_proj.weight"] @ xi
        acc = sum(wj * (t[f"{m}experts.{e}.down_proj.weight"] @ np.maximum(t[f"{m}experts.{e}.up_proj.weight"] @ u, 0) ** 2)
                  for e, wj in zip(chosen, w))
        shared = t[m + "shared_experts.down_proj.weight"] @ np.maximum(t[m + "shared_experts.up_proj.weight"] @ xi, 0) ** 2
        out[i] = t[m + "fc2_latent_proj.weight"] @ acc + shared
    return a + out


def test_mtp_logits_match_spec_formula():
    cfg = preset("tiny", n_group=1, topk_group=1)
    t = {k: np.asarray(v, dtype=np.float64) for k, v in random_tensors(cfg, seed=4).items()}
    model = Model(cfg, build_params(cfg, t))
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, 6, cfg.hidden_size))
    next_ids = rng.integers(0, cfg.vocab_size, size=(1, 6))
    got = model.mtp.predict(hidden, next_ids, depth=1)[0][0]
    eps = cfg.layer_norm_epsilon
    # a = eh_proj(concat[enorm(e), hnorm(h)]) ; attention block ; MoE block ; final_layernorm ; lm_head
    e = t["backbone.embeddings.weight"][next_ids[0]]
    a = np.concatenate([_rms(e, t["mtp.layers.0.enorm.weight"], eps),
                        _rms(hidden[0], t["mtp.layers.0.hnorm.weight"], eps)], axis=-1) @ t["mtp.layers.0.eh_proj.weight"].T
    a = _attention_block(a, t, "mtp.layers.0.", cfg)
    a = _moe_block(a, t, "mtp.layers.1.", cfg)
    ref = _rms(a, t["mtp.layers.1.final_layernorm.weight"], eps) @ t["lm_head.weight"].T
    assert_close(got, ref, "moe", np.float64)


def test_mtp_errors():
    model = model_for(0, num_nextn_predict_layers=0)
    with pytest.raises(InputError, match="no MTP"):
        model.generate([1, 2], 3, mtp=True)
    with pytest.raises(InputError, match="batch 1"):
        model_for(0).generate([[1, 2], [3, 4]], 3, mtp=True)


def test_sampling_mtp_keeps_the_backbone_distribution():
    """Sampling mode: the token after a speculative round is distributed as the backbone says (rejection rule).

    With draft depth 1 and 3 new tokens, token 2 comes from accepting or correcting the MTP draft (token 1 is
    the prefill's own sample, token 3 the bonus); conditioned on token 1 its empirical distribution over many
    seeds must match p(. | prompt, token 1) computed exactly.
    """
    from nemo_scratch.model.generate import token_probs

    cfg = preset("tiny")
    tensors = random_tensors(cfg, seed=1)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 40   # peaky distributions: few tokens carry the mass
    model = Model(cfg, build_params(cfg, tensors))
    prompt, temperature, top_p, runs = [7, 3, 9], 1.0, 0.95, 600
    results = [model.generate(prompt, 3, greedy=False, temperature=temperature, top_p=top_p, seed=s, mtp=True,
                              draft_depth=1) for s in range(runs)]
    assert all(r.stats["proposed"] == 1 for r in results)       # one speculative round each
    samples = [r.ids[0] for r in results]
    first = np.array([s[0] for s in samples])
    x1 = int(np.bincount(first).argmax())                      # the most frequent first token
    second = np.array([s[1] for s in samples if s[0] == x1])
    p = token_probs(model.forward([prompt + [x1]])[:, -1], temperature, top_p)[0]
    empirical = np.bincount(second, minlength=p.size) / second.size
    tv = 0.5 * np.abs(empirical - p).sum()
    # an exact sampler's expected total-variation distance from n draws is below sqrt(support / n) / 2
    support = int((p > 0).sum())
    assert second.size >= 200, second.size
    assert tv < 0.6 * np.sqrt(support / second.size), (tv, support, second.size)
    # both branches of the rule ran: drafts accepted, and drafts rejected then resampled from max(p - q, 0)
    accepted = sum(r.stats["accepted"] for r in results)
    assert 0 < accepted < runs, accepted
