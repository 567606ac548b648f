"""Measure the deviations listed in docs/architecture.md section 7 (the rows marked "measured here").

Each figure is a normwise relative difference ||a - b|| / ||b|| of logits, float32, on CPU:

1. nemo_scratch against transformers' NemotronHForCausalLM on the bundled trained model, with the dt
   convention matched (the bundled config floors dt at 0.001, which transformers also does).
2. the dt floor on the bundled model: floor 0 (vLLM, llama.cpp and NVIDIA's kernels, which ignore the floor)
   against the 0.001 it was trained with (transformers, which floors at time_step_min).
3. the MTP head's final norm on the bundled model: llama.cpp's choice of a LayerNorm (mean removed) against
   the RMSNorm of vLLM's nemotron_h_mtp.py, on the MTP logits of a text.
4. why random-init parity tests can miss Mamba bugs: a transformers model at width 256 with its own random
   init (std 0.02) barely reacts to raising the dt floor from 0.001 to 0.1; the same model with the
   non-trivial weights of the parity tests (tests/test_model_vs_transformers.py::_randomise: norm gains
   near 1, A_log and dt_bias spread over their useful range) reacts strongly.

    python tools/measure_deviations.py        # needs torch and transformers (the oracle extra)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import transformers

import nemo_scratch
from nemo_scratch.model.blocks import block
from nemo_scratch.ops.norm import rms_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_model_vs_transformers import _randomise  # noqa: E402  (the parity tests' non-trivial weights)

TEXT = "def read(self, size=-1):\n    Return the number of bytes in the buffer."


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def layer_norm(x, weight, eps):  # [..., d], [d] -> [..., d]: mean removed, then RMS-normalised
    x = x - x.mean(axis=-1, keepdims=True)
    return rms_norm(x, weight, eps)


def mtp_logits(model, ids, final_norm):  # one MTP depth over a text, with the given final norm
    head, cfg, be = model.mtp, model.cfg, model.backend
    p, eps = head.p, cfg.layer_norm_epsilon
    h = model.hidden(ids)[:, :-1]
    e = model.embed(ids[:, 1:])
    a = be.linear(np.concatenate([rms_norm(e, p["enorm"], eps), rms_norm(h, p["hnorm"], eps)], -1), p["eh_proj"])
    for layer in p["layers"]:
        a = block(a, layer, cfg, be)
    return model.logits(final_norm(a, p["final_layernorm"], eps))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def random_init_invisibility(width=256, seed=0):
    """(std-0.02 init, the parity tests' weights): relative logit change when the dt floor goes 0.001 -> 0.1."""
    cfg = dict(vocab_size=128, hidden_size=width, layers_block_type=["mamba", "attention", "mamba", "mlp"],
               num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, mamba_num_heads=8,
               mamba_head_dim=width // 8, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=16,
               intermediate_size=2 * width, tie_word_embeddings=False)
    ids = np.random.default_rng(seed).integers(0, 128, size=(1, 24))
    out = []
    for parity_weights in (False, True):
        torch.manual_seed(seed)
        hf = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg)).float().eval()
        if parity_weights:
            _randomise(hf, seed)
        logits = []
        for floor in (0.001, 0.1):   # the same weights; only the mixers' runtime clip of dt changes
            mixers = [m for m in hf.modules() if hasattr(m, "time_step_limit")]
            assert mixers, "transformers' Mamba mixer keeps its dt clip in time_step_limit"
            for m in mixers:
                m.time_step_limit = (floor, float("inf"))
            logits.append(hf_logits(hf, ids))
        out.append(rel(logits[1], logits[0]))
    return tuple(out)


def main():
    model = nemo_scratch.load()
    ids = np.array([model.tokenizer.encode(TEXT)])
    hf = transformers.NemotronHForCausalLM.from_pretrained(nemo_scratch.DEFAULT_CHECKPOINT,
                                                           dtype=torch.float32).eval()
    ref = model.forward(ids)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"1. nemo_scratch vs transformers, bundled model, dt floor matched:   {rel(ref, hf_logits(hf, ids)):.1e}")
    no_floor = nemo_scratch.load(dt_floor=0.0).forward(ids)
    print(f"2. dt floor 0 vs 0.001 (trained with 0.001), bundled model:          {rel(no_floor, ref):.1e}")
    rms = mtp_logits(model, ids, rms_norm)
    np.testing.assert_allclose(rms[0], model.mtp.predict(model.hidden(ids)[:, :-1], ids[:, 1:])[0][0],
                               rtol=1e-5, atol=1e-5)
    print(f"3. MTP final norm LayerNorm vs RMSNorm, bundled model's MTP logits:  "
          f"{rel(mtp_logits(model, ids, layer_norm), rms):.1e}")
    std_init, unit = random_init_invisibility()
    print(f"4. dt floor 0.1 vs 0.001, width 256: transformers' std-0.02 init {std_init:.1e}, "
          f"the parity tests' weights {unit:.1e}")


if __name__ == "__main__":
    main()
