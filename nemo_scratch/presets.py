"""Model presets: a tiny toy, a small CPU benchmark model, and Nemotron 3 Nano, Super and Ultra (spec section 8)."""

from __future__ import annotations

from .errors import ConfigError


def _alternate_me(num_layers: int, attention_at) -> str:
    """Attention at the given layers; the rest alternate M, E, M, E... (the Nano/Super/Ultra layout)."""
    out, k = [], 0
    for i in range(num_layers):
        if i in attention_at:
            out.append("*")
        else:
            out.append("ME"[k % 2])
            k += 1
    return "".join(out)


NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*"
                 "EMEMEMEME")
# Ultra: attention layers from one third-party blog [3p]; the rest alternate M/E -> 48 M, 48 E, 12 *.
ULTRA_PATTERN = _alternate_me(108, {7, 14, 23, 32, 39, 48, 57, 64, 73, 82, 89, 98})

_COMMON_REAL = dict(vocab_size=131072, head_dim=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
                    conv_kernel=4, chunk_size=128, max_position_embeddings=262144, layer_norm_epsilon=1e-5)

PRESETS = {
    # A toy with every block type, LatentMoE, group-limited routing and one MTP layer: runs in milliseconds.
    "tiny": dict(
        hybrid_override_pattern="M*E-ME", vocab_size=256, hidden_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=32, moe_latent_size=16, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, intermediate_size=48, num_nextn_predict_layers=1,
        mtp_hybrid_override_pattern="*E", max_position_embeddings=512,
    ),
    # Tens of millions of parameters, every block type and LatentMoE: the CPU benchmark's model.
    "small": dict(
        hybrid_override_pattern="MEM*EMEM-E", vocab_size=8192, hidden_size=512,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        mamba_num_heads=16, mamba_head_dim=64, n_groups=4, ssm_state_size=64, conv_kernel=4, chunk_size=64,
        n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=1024, moe_latent_size=256, routed_scaling_factor=2.5,
        intermediate_size=1536, max_position_embeddings=4096,
    ),
    # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (spec section 8; agreeing third-party copies).
    "nano": dict(
        _COMMON_REAL, hybrid_override_pattern=NANO_PATTERN, hidden_size=2688,
        num_attention_heads=32, num_key_value_heads=2, mamba_num_heads=64,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5, intermediate_size=1856,
    ),
    # nvidia/NVIDIA-Nemotron-3-Super-120B-A12B (spec section 8; third-party transcription of config.json).
    "super": dict(
        _COMMON_REAL, hybrid_override_pattern=SUPER_PATTERN, hidden_size=4096,
        num_attention_heads=32, num_key_value_heads=2, mamba_num_heads=128,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688, moe_latent_size=1024,
        moe_shared_expert_intermediate_size=5376, routed_scaling_factor=5.0, intermediate_size=2688,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
    ),
    # Nemotron 3 Ultra 550B-A55B: NO official config.json was found (spec section 8).
    # Agreed by >= 3 third-party sources: hidden 8192, 108 layers (48 M / 48 E / 12 *), 64 q / 2 kv heads,
    #   256 mamba heads x 64, 512 experts top-22, moe_intermediate_size 5120.
    # From one blog only (weaker): moe_latent_size 2048, shared expert 10240, routed_scaling_factor 5.0,
    #   n_group 1, the attention layer positions, MTP "*E".
    "ultra": dict(
        _COMMON_REAL, hybrid_override_pattern=ULTRA_PATTERN, hidden_size=8192,
        num_attention_heads=64, num_key_value_heads=2, mamba_num_heads=256,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=5120, moe_latent_size=2048,
        moe_shared_expert_intermediate_size=10240, routed_scaling_factor=5.0, intermediate_size=5120,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
    ),
}


def preset(name: str, **overrides):
    """A NemotronConfig for one of PRESETS (``tiny``, ``small``, ``nano``, ``super``, ``ultra``)."""
    from .config import NemotronConfig

    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return NemotronConfig.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")
