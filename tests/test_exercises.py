"""Every notebook exercise checker accepts a right answer and rejects a wrong one (with a reason)."""

import numpy as np
import pytest

import nemo_scratch
from nemo_scratch import exercises as ex
from nemo_scratch.checkpoint.schema import expected_tensors
from nemo_scratch.model.generate import token_probs
from nemo_scratch.ops.quant import E2M1_VALUES, e4m3_decode, unpack_nibbles


@pytest.fixture(scope="module")
def model():
    return nemo_scratch.load()


def verdict(result, ok):
    assert isinstance(result, ex.CheckResult)
    assert bool(result) is ok, result
    assert repr(result).startswith("correct: " if ok else "not yet: ") and result.message


# ----------------------------------------------------------------------------- right answers, written plainly

def scan(x, dt, A, B, C, D, skip=True, group=lambda hh, h, g: hh // (h // g)):
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    state = np.zeros((b, h, p, n))
    y = np.zeros_like(x)
    for s in range(t):
        for hh in range(h):
            gg = group(hh, h, g)
            state[:, hh] = (np.exp(dt[:, s, hh] * A[hh])[:, None, None] * state[:, hh]
                            + dt[:, s, hh, None, None] * x[:, s, hh, :, None] * B[:, s, gg, None, :])
            y[:, s, hh] = np.einsum("bpn,bn->bp", state[:, hh], C[:, s, gg]) + (D[hh] * x[:, s, hh] if skip else 0)
    return y, state


def uniform(t):
    l = np.arange(t)
    return {"entropy": np.log(l + 1), "self": 1 / (l + 1), "distance": l / 2}


def one_head(q, k, v, scale=True):
    s = q @ k.T / (np.sqrt(q.shape[1]) if scale else 1) + np.triu(np.full((len(q), len(k)), -np.inf), 1)
    p = np.exp(s - s.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True) @ v


def router(x, gate, bias, k, scale, biased_weights=False):
    s = 1 / (1 + np.exp(-x @ gate.T))
    idx = np.argsort(-(s + bias), axis=1)[:, :k]
    w = np.take_along_axis(s + bias if biased_weights else s, idx, 1)
    return idx, scale * w / w.sum(1, keepdims=True)


def decode_e2m1(codes):
    mag = codes & 7
    e, m = mag >> 1, mag & 1
    val = np.where(e == 0, 0.5 * m, 2.0 ** (e.astype(np.int32) - 1) * (1 + 0.5 * m))
    return np.where(codes >= 8, -val, val).astype(np.float32)


def dequant(packed, scale, g, swap=False):
    q = unpack_nibbles(packed)
    if swap:
        q = q.reshape(*q.shape[:-1], -1, 2)[..., ::-1].reshape(q.shape)
    return E2M1_VALUES[q] * np.repeat(e4m3_decode(scale), 16, axis=-1) * np.float32(g)


def bpb(model, text):
    ids = np.array([model.tokenizer.encode(text)])
    p = token_probs(model.forward(ids)[0, :-1])
    return -np.log2(p[np.arange(ids.shape[1] - 1), ids[0, 1:]]).mean()


def mamba_params(cfg):
    i, c, h = cfg.mamba_intermediate, cfg.conv_dim, cfg.mamba_num_heads
    return cfg.hidden_size * (i + c + h) + c * cfg.conv_kernel + c + 3 * h + i + i * cfg.hidden_size


def half_lives(model):
    out = {}
    for li, p in enumerate(model.params["layers"]):
        if p["type"] == "mamba":
            dt0 = np.log1p(np.exp(p["dt_bias"].astype(np.float64)))
            out[li] = np.log(2) / (np.maximum(dt0, model.dt_limit[0]) * -p["A"])
    return out


# ----------------------------------------------------------------------------- the checks

def test_sequential_scan():
    verdict(ex.check_sequential_scan(scan), True)
    verdict(ex.check_sequential_scan(lambda *a: scan(*a, skip=False)), False)                    # forgot D x
    verdict(ex.check_sequential_scan(lambda *a: scan(*a, group=lambda hh, h, g: hh % g)), False)  # tiled groups
    verdict(ex.check_sequential_scan(lambda *a: scan(*a)[0]), False)                               # no state
    verdict(ex.check_sequential_scan(lambda *a: 1 / 0), False)                                     # raises


def test_half_lives(model):
    verdict(ex.check_half_lives(half_lives(model), model), True)
    wrong = {li: v * np.log(2) for li, v in half_lives(model).items()}       # 1/(dt |A|), not ln2/(dt |A|)
    verdict(ex.check_half_lives(wrong, model), False)
    verdict(ex.check_half_lives(list(half_lives(model).values()), model), False)


def test_uniform_baseline():
    verdict(ex.check_uniform_baseline(uniform), True)
    verdict(ex.check_uniform_baseline(lambda t: {**uniform(t), "distance": np.arange(t) / 2 + 0.5}), False)
    verdict(ex.check_uniform_baseline(lambda t: {"entropy": np.log(np.arange(t) + 1)}), False)


def test_causal_attention():
    verdict(ex.check_causal_attention(one_head), True)
    verdict(ex.check_causal_attention(lambda q, k, v: one_head(q, k, v, scale=False)), False)
    verdict(ex.check_causal_attention(lambda q, k, v: one_head(q, k, v)[:, :-1]), False)       # wrong shape


def test_route():
    verdict(ex.check_route(router), True)
    verdict(ex.check_route(lambda *a: router(*a, biased_weights=True)), False)
    verdict(ex.check_route(lambda x, gate, bias, k, scale: router(x, gate, 0 * bias, k, scale)), False)


def test_load_cv():
    def cv(idx, e, all_experts=True):
        load = np.bincount(idx.ravel(), minlength=e if all_experts else 0)
        load = load if all_experts else load[load > 0]
        return load.std() / load.mean()

    verdict(ex.check_load_cv(cv), True)
    verdict(ex.check_load_cv(lambda idx, e: cv(idx, e, all_experts=False)), False)


def test_expected_tokens_and_speedup():
    verdict(ex.check_expected_tokens(lambda a: 1 + sum(a)), True)
    verdict(ex.check_expected_tokens(lambda a: sum(a)), False)                   # forgot the backbone's token
    verdict(ex.check_speedup(lambda a, r, v: (1 + sum(a)) / (v + len(a) * r)), True)
    verdict(ex.check_speedup(lambda a, r, v: (1 + sum(a)) / (v + r)), False)      # one draft step per round


def test_e2m1_decode():
    verdict(ex.check_e2m1_decode(decode_e2m1), True)
    verdict(ex.check_e2m1_decode(lambda c: np.abs(decode_e2m1(c))), False)                # lost the sign
    verdict(ex.check_e2m1_decode(lambda c: np.where(c == 8, 0.0, decode_e2m1(c)).astype(np.float32)), False)
    verdict(ex.check_e2m1_decode(lambda c: decode_e2m1(c).astype(np.float64)), False)     # dtype


def test_nvfp4_dequantize():
    verdict(ex.check_nvfp4_dequantize(dequant), True)
    verdict(ex.check_nvfp4_dequantize(lambda *a: dequant(*a, swap=True)), False)          # nibble order


def test_bits_per_byte(model):
    verdict(ex.check_bits_per_byte(bpb, model), True)
    verdict(ex.check_bits_per_byte(lambda m, text: bpb(m, text) * np.log(2), model), False)   # nats


def test_mamba_layer_params():
    verdict(ex.check_mamba_layer_params(mamba_params), True)
    verdict(ex.check_mamba_layer_params(lambda cfg: mamba_params(cfg) - cfg.hidden_size * cfg.mamba_num_heads),
            False)                                                               # in_proj without the dt rows
    cfg = nemo_scratch.preset("nano")
    mixer = [s for s in expected_tensors(cfg) if s.layer == 0 and s.role != "norm"]
    assert mamba_params(cfg) == sum(s.numel for s in mixer)
