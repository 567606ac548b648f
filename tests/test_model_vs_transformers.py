"""The model against the independent oracle: transformers' NemotronHForCausalLM (pure-torch path, CPU).

Random tiny configs covering every block type, LatentMoE and group-limited routing are built and saved by
transformers (``save_pretrained``), loaded by us, and compared: logits within the tolerance table, greedy
tokens identical for 16 new tokens, cached decode equal to a full forward.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (extra 'oracle')")
transformers = pytest.importorskip("transformers", reason="the transformers oracle (extra 'oracle')")

import nemo_scratch  # noqa: E402
from tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.oracle

BASE = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=24, intermediate_size=40, routed_scaling_factor=2.5,
            layer_norm_epsilon=1e-5, use_cache=True, tie_word_embeddings=False)

CASES = {
    # every block type, LatentMoE, group-limited routing
    "all_blocks_latent_groups": dict(layers_block_type=["mamba", "attention", "moe", "mlp", "mamba", "moe"],
                                     moe_latent_size=16, n_group=2, topk_group=1, num_experts_per_tok=3),
    # MoE without a latent projection, more KV heads, top-k close to the expert count
    "moe_no_latent": dict(layers_block_type=["moe", "mamba", "attention", "moe"], num_key_value_heads=4,
                          n_routed_experts=4, num_experts_per_tok=3, norm_topk_prob=False),
    # Mamba-heavy with one group per head pair and a chunk that does not divide the sequence
    "mamba_chunks": dict(layers_block_type=["mamba", "mamba", "attention", "mlp"], n_groups=4, chunk_size=5),
}


def _randomise(model, seed):
    """Make every parameter non-trivial (norm weights, A_log, D, dt_bias, router bias included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 15 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 3.0)
            elif "norm" in name or name.endswith(".D"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.15))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    name = request.param
    cfg = transformers.NemotronHConfig(**{**BASE, **CASES[name]})
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(cfg).float().eval()
    _randomise(hf, seed=sorted(CASES).index(name))
    out = tmp_path_factory.mktemp(name)
    hf.save_pretrained(out)
    ours = nemo_scratch.load(out, dt_floor="transformers")
    return hf, ours


def test_logits_match(pair):
    hf, ours = pair
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(2, 13))  # batch 2, 13 % chunk != 0
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    got = ours.forward(ids)
    assert_close(got, ref, "model_vs_transformers", np.float32)


def test_greedy_tokens_match(pair):
    hf, ours = pair
    prompt = np.random.default_rng(2).integers(0, hf.config.vocab_size, size=(1, 7))
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(prompt), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    ref_new = ref[0, prompt.shape[1]:].numpy()
    got = ours.generate(prompt, 16).ids[0]
    np.testing.assert_array_equal(got, ref_new)


def test_cached_decode_equals_forward(pair):
    _, ours = pair
    ids = np.random.default_rng(3).integers(0, ours.cfg.vocab_size, size=(2, 11))
    full = ours.forward(ids)
    cache = ours.new_cache(2)
    steps = [ours.forward(ids[:, :6], cache)]
    for t in range(6, 11):
        steps.append(ours.forward(ids[:, t:t + 1], cache))
    assert_close(np.concatenate(steps, axis=1), full, "model_step_vs_forward", np.float32)
