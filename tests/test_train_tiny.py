"""tools/train_tiny.py on a micro config (the same code path as the shipped model), and the shipped files.

- a few training steps lower both the main and the MTP cross-entropy; the router bias moves (aux-loss-free rule)
- the MTP head is causal and predicts from embeddings of token t+1 and the post-norm_f hidden state
- to_nvidia gives exactly schema.expected_tensors(cfg); from_nvidia inverts it (same logits)
- the corpus builder is deterministic, ASCII and capped
- nemo_scratch/data/nemotron3-tiny: config.json reads with NemotronConfig, declares the byte tokenizer and the dt
  floor, model.safetensors holds the schema's tensors in BF16 (A_log, D, router bias F32)
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="tools/train_tiny.py trains with torch (extra 'oracle')")
pytest.importorskip("transformers", reason="tools/train_tiny.py uses transformers' NemotronH (extra 'oracle')")
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import corpus
import train_tiny as tt

from nemo_scratch.checkpoint.schema import expected_tensors
from nemo_scratch.config import NemotronConfig

pytestmark = pytest.mark.oracle

# Every ingredient of the shipped recipe, at a size that trains a step in milliseconds.
MICRO = dict(hybrid_override_pattern="M*E", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, moe_latent_size=16,
             moe_shared_expert_intermediate_size=32, intermediate_size=32)
SHIPPED = ROOT / "nemo_scratch" / "data" / "nemotron3-tiny"


@pytest.fixture(scope="module")
def text():
    return np.frombuffer(corpus.build_corpus(max_bytes=20_000), dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(text):
    cfg = tt.nemotron_config(**MICRO)
    args = tt.parse_args(["--steps", "12", "--batch", "4", "--seq", "24", "--lr", "1e-2", "--warmup", "2",
                          "--log-every", "100", "--bias-rate", "0.01", "--threads", "1"])
    logs = []
    model, mtp, history, planned = tt.train(cfg, text, args, log=logs.append)
    assert planned == 12  # the 20-minute default budget does not cut 12 micro steps
    return cfg, args, model, mtp, history, logs


def test_micro_training_lowers_main_and_mtp_loss(trained, text):
    _, _, model, mtp, history, logs = trained
    assert len(history) == 12 and logs[0].startswith("step     1")
    first_main, first_mtp = history[0][3], history[0][4]
    # an untrained byte model is near uniform: ln 256 = 5.55 nats for both heads
    assert abs(first_main - math.log(256)) < 0.5 and abs(first_mtp - math.log(256)) < 0.5
    main, extra, acc = tt.evaluate(model, mtp, text, batches=2, batch=4, seq=24, seed=7)
    assert main < first_main - 1.0, (first_main, main)
    assert extra < first_mtp - 1.0, (first_mtp, extra)
    assert 0.0 < acc <= 1.0


def test_router_bias_follows_the_balancing_rule(trained):
    _, _, model, mtp, _, _ = trained
    biases = [m.e_score_correction_bias for root in (model, mtp) for m in root.modules()
              if hasattr(m, "e_score_correction_bias")]
    assert len(biases) == 2  # backbone MoE + MTP MoE
    assert all(b.abs().max() > 0 for b in biases)
    # the rule itself: under-loaded experts go up, over-loaded go down, by exactly `rate`
    routers, loads = tt.track_router_loads([mtp])
    before = routers[0].e_score_correction_bias.clone()
    loads[id(routers[0])][:] = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    tt.balance_router_bias(routers, loads, rate=0.5)
    delta = routers[0].e_score_correction_bias - before
    assert torch.equal(delta, torch.tensor([-0.5, 0.5, 0, 0, 0, 0, 0, 0]))
    assert loads[id(routers[0])].sum() == 0


def test_mtp_head_is_causal_and_uses_the_next_token(trained):
    _, _, model, mtp, _, _ = trained
    window = torch.randint(0, 256, (2, 18), generator=torch.Generator().manual_seed(0))
    changed = window.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256   # the last MTP target: must not change any logit
    changed[:, -2] = (changed[:, -2] + 1) % 256   # the last MTP input token: changes only the last position
    with torch.no_grad():
        _, _, a = tt.forward_losses(model, mtp, window)
        _, _, b = tt.forward_losses(model, mtp, changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-5)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


def test_nvidia_names_match_the_schema_and_round_trip(trained):
    cfg, _, model, mtp, _, _ = trained
    tensors = tt.to_nvidia(model, mtp)
    tt.check_against_schema(tensors, cfg)
    assert {s.name for s in expected_tensors(cfg)} == set(tensors)
    assert all(v.dtype == np.float32 for v in tensors.values())
    backbone, head = tt.from_nvidia(tensors, cfg)
    model2, mtp2 = tt.build_models(cfg, seed=123)
    model2.load_state_dict(backbone, strict=True)
    mtp2.load_state_dict(head, strict=True)
    window = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = tt.forward_losses(model, mtp, window), tt.forward_losses(model2.eval(), mtp2.eval(), window)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=0)


def test_fit_steps_cuts_the_count_to_the_budget():
    # 2 s/step measured between steps 10 and 50; 500 s left of 10 min -> 0.95 * 250 more steps
    assert tt.fit_steps(600, 50, 100.0, (10, 20.0), minutes=10) == 50 + 237
    assert tt.fit_steps(100, 50, 100.0, (10, 20.0), minutes=10) == 100   # never more than asked
    assert tt.lr_at(49, 600, 1e-3, 50) == tt.lr_at(49, 287, 1e-3, 50)    # warm-up ignores the total


def test_hf_config_has_our_geometry():
    cfg = tt.nemotron_config()
    hf = tt.hf_config(cfg)
    assert hf.hybrid_override_pattern == cfg.hybrid_override_pattern == "MEM*EME"
    assert hf.mtp_hybrid_override_pattern == "*E" and hf.num_nextn_predict_layers == 1
    assert (hf.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok) == (256, 32, 4)
    assert cfg.moe_latent_size < cfg.hidden_size and cfg.moe_shared_expert_intermediate_size > 0
    assert cfg.time_step_limit == (cfg.time_step_min, math.inf)
    assert cfg.extra["nemo_scratch_tokenizer"] == "bytes"


def test_corpus_is_deterministic_ascii_and_capped():
    a, b = corpus.build_corpus(max_bytes=5_000), corpus.build_corpus(max_bytes=5_000)
    assert a == b and 0 < len(a) <= 5_000
    assert max(a) < 128 and a.endswith(b"\n\n")
    info = corpus.describe(a)
    assert info["bytes"] == len(a) and len(info["sha256"]) == 64


def test_shipped_checkpoint_files():
    from safetensors import safe_open

    cfg = NemotronConfig.from_json(SHIPPED / "config.json")
    raw = json.loads((SHIPPED / "config.json").read_text())
    assert raw["nemo_scratch_tokenizer"] == "bytes"
    # the dt floor transformers applies; inf is written as JSON's Infinity (NemotronConfig.save)
    assert raw["time_step_limit"][0] == cfg.time_step_min and float(raw["time_step_limit"][1]) == math.inf
    assert cfg.time_step_limit == (cfg.time_step_min, math.inf)
    assert cfg.hybrid_override_pattern == tt.nemotron_config().hybrid_override_pattern
    want = {s.name: s.shape for s in expected_tensors(cfg)}
    with safe_open(str(SHIPPED / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == set(want)
        for name in names:
            t = f.get_slice(name)
            assert tuple(t.get_shape()) == want[name], name
            f32 = name.endswith(("A_log", ".D", "e_score_correction_bias"))
            assert t.get_dtype() == ("F32" if f32 else "BF16"), name
    assert (SHIPPED / "model.safetensors").stat().st_size < 12_000_000


def test_shipped_checkpoint_reads_with_our_loader():
    from nemo_scratch.checkpoint.reader import load_tensors

    cfg, tensors, info = load_tensors(SHIPPED)
    assert info["mtp"] and cfg.num_nextn_predict_layers == 1
    assert set(info["formats"].values()) == {"bf16", "f32"}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in tensors.values())
    # the router bias was trained (aux-loss-free balancing), not left at zero
    assert np.abs(tensors["backbone.layers.1.mixer.gate.e_score_correction_bias"]).max() > 0
    assert "Return the " in (SHIPPED / "TRAINING.md").read_text()


def test_shipped_mtp_head_numpy_equals_the_trained_torch_head():
    """Our NumPy model (nemo_scratch.load) runs the shipped weights as train_tiny's torch code trained them:
    backbone (transformers) and MTP head (MTPHead) agree within the model-vs-transformers tolerance."""
    from tolerances import assert_close

    import nemo_scratch

    ours = nemo_scratch.load(SHIPPED)
    _, model, mtp = tt.load_checkpoint(SHIPPED)
    window = torch.tensor([list(b"Return the number of bytes in the buffer, or raise ValueError.")])
    ids, next_ids = window[:, :-2], window[:, 1:-1]
    with torch.no_grad():
        h0 = model.model(input_ids=ids).last_hidden_state
        ref_main = model.lm_head(h0).numpy()
        ref_mtp = model.lm_head(mtp(model.model.embeddings(next_ids), h0)).numpy()
    assert_close(ours.forward(ids.numpy()), ref_main, "model_vs_transformers", np.float32, what="main logits")
    got_mtp = ours.mtp.predict(ours.hidden(ids.numpy()), next_ids.numpy(), depth=1)[0]
    assert_close(got_mtp, ref_mtp, "model_vs_transformers", np.float32, what="MTP logits")
