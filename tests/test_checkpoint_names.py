"""Tensor names: NVIDIA's <-> transformers' (``model.`` prefix, stacked routed experts), the legacy embedding
name, and check_tensor_set's all-or-nothing rule for the MTP head; (marker ``oracle``) our transformers names
are exactly the keys of NemotronHForCausalLM's state dict, for random configs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_scratch.checkpoint import check_tensor_set, from_transformers, random_tensors, to_transformers
from nemo_scratch.checkpoint.names import expert_names, is_stacked, nvidia_name, transformers_name
from nemo_scratch.config import preset
from nemo_scratch.errors import CheckpointError

TINY = preset("tiny")


@pytest.mark.parametrize("stored, nvidia", [
    ("model.layers.3.mixer.in_proj.weight", "backbone.layers.3.mixer.in_proj.weight"),
    ("model.embeddings.weight", "backbone.embeddings.weight"),
    ("backbone.embedding.weight", "backbone.embeddings.weight"),       # NVIDIA's older remote code
    ("model.norm_f.weight", "backbone.norm_f.weight"),
    ("backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.A_log"),
    ("lm_head.weight", "lm_head.weight"),
    ("mtp.layers.1.final_layernorm.weight", "mtp.layers.1.final_layernorm.weight"),
])
def test_nvidia_name(stored, nvidia):
    assert nvidia_name(stored) == nvidia
    if stored.startswith("model."):
        assert transformers_name(nvidia) == stored


def test_stacked_expert_names():
    assert is_stacked("model.layers.2.mixer.experts.up_proj") and is_stacked("backbone.layers.2.mixer.experts.down_proj")
    assert not is_stacked("backbone.layers.2.mixer.experts.0.up_proj.weight")
    assert not is_stacked("backbone.layers.2.mixer.shared_experts.up_proj.weight")
    assert expert_names("model.layers.2.mixer.experts.down_proj", 2) == [
        "backbone.layers.2.mixer.experts.0.down_proj.weight", "backbone.layers.2.mixer.experts.1.down_proj.weight"]
    with pytest.raises(CheckpointError, match="'model.layers.2.mixer.gate.weight'"):
        expert_names("model.layers.2.mixer.gate.weight", 2)


def test_to_transformers_stacks_experts_like_transformers():
    t = random_tensors(TINY)
    hf = to_transformers(t)
    e, f, l = TINY.n_routed_experts, TINY.moe_intermediate_size, TINY.moe_input_width
    assert hf["model.layers.2.mixer.experts.up_proj"].shape == (e, f, l)
    assert hf["model.layers.2.mixer.experts.down_proj"].shape == (e, l, f)
    np.testing.assert_array_equal(hf["model.layers.5.mixer.experts.down_proj"][3],
                                  t["backbone.layers.5.mixer.experts.3.down_proj.weight"])
    assert "mtp.layers.1.mixer.experts.up_proj" in hf and "model.embeddings.weight" in hf
    assert not any(n.startswith("backbone.") or ".experts.0." in n for n in hf)
    back = from_transformers(hf)
    assert back.keys() == t.keys() and all(np.array_equal(back[n], v) for n, v in t.items())
    with pytest.raises(CheckpointError, match=r"experts \[0, 2\]"):
        to_transformers({"backbone.layers.2.mixer.experts.0.up_proj.weight": np.ones(2),
                         "backbone.layers.2.mixer.experts.2.up_proj.weight": np.ones(2)})


def _shapes(cfg, drop=()):
    return {n: v.shape for n, v in random_tensors(cfg).items() if not n.startswith(drop)}


def test_check_tensor_set_mtp_all_or_nothing():
    def where(name):
        return f"test: tensor {name!r}"

    assert check_tensor_set(TINY, _shapes(TINY), where, "test") is True
    assert check_tensor_set(TINY, _shapes(TINY, drop=("mtp.",)), where, "test") is False
    partial = _shapes(TINY, drop=("mtp.layers.1.",))
    with pytest.raises(CheckpointError, match=r"test: partial MTP head: .*'mtp\.layers\.1\."):
        check_tensor_set(TINY, partial, where, "test")
    no_mtp_cfg = TINY.replace(num_nextn_predict_layers=0)
    assert check_tensor_set(no_mtp_cfg, _shapes(no_mtp_cfg), where, "test") is False


# Small random configs covering every block type, LatentMoE on and off, shared expert on and off.
CONFIGS = st.builds(
    lambda pattern, experts, latent, shared, mtp: preset(
        "tiny", hybrid_override_pattern=pattern, n_routed_experts=experts, num_experts_per_tok=1, n_group=1,
        topk_group=1, moe_latent_size=latent, moe_shared_expert_intermediate_size=shared,
        num_nextn_predict_layers=mtp),
    st.text("M*E-", min_size=1, max_size=5), st.integers(1, 4), st.sampled_from([None, 8]),
    st.sampled_from([0, 24]), st.integers(0, 1))


@given(CONFIGS)
def test_names_round_trip_for_any_config(cfg):
    t = random_tensors(cfg)
    assert check_tensor_set(cfg, {n: v.shape for n, v in t.items()}, str, "test") is (cfg.num_nextn_predict_layers > 0)
    back = from_transformers(to_transformers(t))
    assert back.keys() == t.keys() and all(np.array_equal(back[n], t[n]) for n in t)


@pytest.mark.oracle
@settings(max_examples=8)
@given(CONFIGS.filter(lambda cfg: cfg.moe_shared_expert_intermediate_size > 0))
def test_transformers_names_are_the_state_dict_keys(cfg):
    # transformers always builds a shared expert (a size of 0 falls back to intermediate_size); "0 = none" is ours
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle (extra 'oracle')")
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg.to_dict()))
    ours = {n: v.shape for n, v in to_transformers(random_tensors(cfg)).items() if not n.startswith("mtp.")}
    theirs = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert ours == theirs
