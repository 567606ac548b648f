"""The bundled tiny trained model: it loads, matches transformers on the same weights, its NVFP4 copy
is exactly what ``quantize`` writes, greedy generation with MTP equals without, and the demo runs."""

import numpy as np
import pytest

import nemo_scratch
from nemo_scratch import DEFAULT_CHECKPOINT
from nemo_scratch.checkpoint import open_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from tolerances import assert_close

NVFP4_COPY = DEFAULT_CHECKPOINT.parent / (DEFAULT_CHECKPOINT.name + "-nvfp4")


@pytest.fixture(scope="module")
def model():
    return nemo_scratch.load()


def test_bundled_model_has_every_ingredient(model):
    cfg = model.cfg
    assert {"mamba", "attention", "moe"} <= set(cfg.layers_block_type)
    assert cfg.moe_latent_size and cfg.moe_latent_size < cfg.hidden_size
    assert cfg.moe_shared_expert_intermediate_size > 0 and cfg.n_routed_experts >= 16
    assert cfg.num_nextn_predict_layers == 1 and model.mtp is not None
    assert cfg.vocab_size == 256 and model.tokenizer.decode(model.tokenizer.encode("abc")) == "abc"


def test_generates_text_and_mtp_is_lossless(model):
    ids = model.tokenizer.encode("Return the ")
    plain = model.generate(ids, 24)
    spec = model.generate(ids, 24, mtp=True, draft_depth=2)
    np.testing.assert_array_equal(spec.ids, plain.ids)
    assert spec.stats["acceptance_rate"] > 0.2, "a trained MTP head should agree with the backbone often"
    text = model.tokenizer.decode(plain.ids[0])
    assert sum(ch.isalpha() or ch == " " for ch in text) > len(text) // 2, text


@pytest.mark.oracle
def test_logits_match_transformers(model):
    torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (extra 'oracle')")
    transformers = pytest.importorskip("transformers", reason="the transformers oracle (extra 'oracle')")
    hf = transformers.NemotronHForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, dtype=torch.float32).eval()
    ids = np.array([model.tokenizer.encode("def read(self, path):\n    Return the")])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.float().numpy()
    assert_close(model.forward(ids), ref, "model_vs_transformers", np.float32)


def test_nvfp4_copy_is_what_quantize_writes(tmp_path):
    fresh = tmp_path / "q"
    quantize_checkpoint(DEFAULT_CHECKPOINT, fresh, "ultra")
    shipped, ours = open_checkpoint(NVFP4_COPY), open_checkpoint(fresh)
    assert shipped.names() == ours.names()
    for name in ours.names():
        assert shipped.dtype_of(name) == ours.dtype_of(name), name
        np.testing.assert_array_equal(shipped.get(name), ours.get(name), err_msg=name)
    q = nemo_scratch.load(NVFP4_COPY)
    ids = [[ord(c) for c in "Return the "]]
    assert_close(q.forward(ids), nemo_scratch.load(fresh).forward(ids), "model_quantized_vs_dequantized",
                 np.float32)


def test_demo_runs(capsys):
    from nemo_scratch.demo import run_demo

    plain, spec = run_demo(max_new_tokens=16)
    out = capsys.readouterr().out
    assert "agree: yes" in out and "tokens/s wall clock" in out and "MTP acceptance" in out
    # the cost explanation: measured draft and verify costs, modelled next to measured speedup, Ultra's case
    assert "one MTP draft step" in out and "modelled" in out and "measured" in out and "Ultra" in out
    np.testing.assert_array_equal(plain.ids, spec.ids)
