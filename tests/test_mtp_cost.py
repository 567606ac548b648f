"""The MTP speculative-decoding cost model (model/mtp_cost.py) on cases with known answers."""

import math

import numpy as np
import pytest

import nemo_scratch
from nemo_scratch.checkpoint.modelopt import F32_ROLES
from nemo_scratch.checkpoint.schema import expected_tensors
from nemo_scratch.errors import InputError
from nemo_scratch.model import mtp_cost as mc
from nemo_scratch.model.generate import GenerationResult
from nemo_scratch.params import count_params


@pytest.mark.parametrize("acceptance, tokens", [([0.0], 1.0), ([1.0], 2.0), ([1.0, 1.0, 1.0], 4.0),
                                                ([0.5, 0.25], 1.75), ([0.9, 0.0, 0.0], 1.9)])
def test_expected_tokens_per_round(acceptance, tokens):
    assert mc.expected_tokens_per_round(acceptance) == pytest.approx(tokens, abs=1e-15)


@pytest.mark.parametrize("acceptance, r, v, speedup", [
    ([1.0, 1.0], 0.0, 1.0, 3.0),            # free, always-right drafts: 3 tokens per pass
    ([0.0], 0.5, 1.0, 1 / 1.5),             # never accepted: pure overhead
    ([0.0, 0.0], 0.0, 1.0, 1.0),            # free drafts, never accepted: no change
    ([0.8, 0.5, 0.2], 0.1, 1.3, 2.5 / 1.6),
    ([1.0], 1.0, 1.0, 1.0),                 # a draft as dear as the backbone: break even at 100%
])
def test_modelled_speedup(acceptance, r, v, speedup):
    assert mc.round_cost(len(acceptance), r, v) == pytest.approx(v + len(acceptance) * r)
    assert mc.modelled_speedup(acceptance, r, v) == pytest.approx(speedup, rel=1e-12)


def test_break_even_acceptance_gives_speedup_one():
    for depth, r, v in ((1, 0.2, 1.1), (3, 0.05, 1.5), (2, 0.0, 1.0)):
        need = mc.break_even_acceptance(depth, r, v)
        assert need == pytest.approx(v + depth * r - 1)
        if need <= depth:
            acc = [need / depth] * depth
            assert mc.modelled_speedup(acc, r, v) == pytest.approx(1.0)


@pytest.mark.parametrize("call", [
    lambda: mc.expected_tokens_per_round([]),
    lambda: mc.expected_tokens_per_round([0.5, 0.7]),        # acceptance cannot grow with depth
    lambda: mc.expected_tokens_per_round([1.2]),
    lambda: mc.expected_tokens_per_round([float("nan")]),
    lambda: mc.round_cost(0, 0.1),
    lambda: mc.round_cost(1, -0.1),
    lambda: mc.round_cost(1, 0.1, verify_cost=math.inf),
    lambda: mc.modelled_speedup([0.5], 0.0, 0.0),
])
def test_bad_arguments_raise_input_error(call):
    with pytest.raises(InputError):
        call()


def test_measured_speedup_uses_decode_time_only():
    ids = np.zeros((1, 8), np.int64)
    plain, spec = GenerationResult(ids, 1.1, 0.1), GenerationResult(ids, 0.6, 0.1)
    assert mc.measured_speedup(plain, spec) == pytest.approx(2.0)
    with pytest.raises(InputError, match="same length"):
        mc.measured_speedup(plain, GenerationResult(ids[:, :4], 0.6, 0.1))


def test_byte_costs_against_the_parameter_count():
    cfg = nemo_scratch.preset("tiny")
    b = mc.byte_costs(cfg, "bf16", depth=3)
    assert len(b["verify_bytes"]) == len(b["verify_cost"]) == 4
    # bf16 recipe: 2 bytes per active parameter, 4 for the float32 ones (A_log, D, router bias)
    f32 = sum(s.numel for s in expected_tensors(cfg, include_mtp=False) if s.role in F32_ROLES)
    assert b["step_bytes"] == pytest.approx(2 * count_params(cfg)["active"] + 2 * f32)
    # one verify token reads exactly what a decode step reads; more tokens hit more experts
    assert b["verify_cost"][0] == pytest.approx(1.0)
    assert np.all(np.diff(b["verify_cost"]) > 0)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    extra = b["moe_layers"] * b["expert_bytes"] * (e * (1 - (1 - k / e) ** 2) - k)
    assert b["verify_bytes"][1] - b["step_bytes"] == pytest.approx(extra)


def test_byte_costs_ultra_draft_is_cheap_next_to_108_layers():
    ultra = mc.byte_costs(nemo_scratch.preset("ultra"), "ultra", depth=2)
    tiny = mc.byte_costs(nemo_scratch.load().cfg, "bf16", depth=2)
    assert 0 < ultra["draft_ratio"] < 0.1 < tiny["draft_ratio"]
    assert 1 < ultra["verify_cost"][1] < ultra["verify_cost"][2] < 2
    with pytest.raises(InputError, match="no MTP"):
        mc.byte_costs(nemo_scratch.preset("nano"), "bf16")


def test_measure_costs_on_the_bundled_model():
    model = nemo_scratch.load()
    c = mc.measure_costs(model, 2, model.tokenizer.encode("Return the "), repeats=3)
    assert set(c) == {"step_s", "draft_s", "verify_s", "draft_ratio", "verify_cost"}
    assert len(c["verify_s"]) == len(c["verify_cost"]) == 3
    assert c["step_s"] > 0 and c["draft_s"] > 0 and all(v > 0 for v in c["verify_s"])
    assert c["draft_ratio"] == pytest.approx(c["draft_s"] / c["step_s"])
    with pytest.raises(InputError, match="depth"):
        mc.measure_costs(model, 0, [1, 2])


def test_measure_speedups_pairs_model_and_measurement():
    model = nemo_scratch.load()
    res = mc.measure_speedups(model, model.tokenizer.encode("Return the "), 6, depths=(1, 2), repeats=1)
    assert set(res) == {"plain", "spec", "costs", "modelled", "measured"}
    assert sorted(res["spec"]) == sorted(res["modelled"]) == sorted(res["measured"]) == [1, 2]
    for depth, run in res["spec"].items():
        np.testing.assert_array_equal(run.ids, res["plain"].ids)
        acc = run.stats["acceptance_per_depth"]
        assert res["modelled"][depth] == pytest.approx(
            mc.modelled_speedup(acc, res["costs"]["draft_ratio"], res["costs"]["verify_cost"][depth]))
        assert res["measured"][depth] == pytest.approx(mc.measured_speedup(res["plain"], run))
    with pytest.raises(InputError, match="max_new_tokens"):
        mc.measure_speedups(model, [1, 2], 1)
