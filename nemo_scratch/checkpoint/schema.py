"""Every tensor a Nemotron 3 checkpoint holds, from the config alone (spec section 7, NVIDIA's names).

One list serves the loader (what must be there, with which shape), the random-checkpoint writer, the
quantization recipes and the parameter/byte accounting (params.py), so the four can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NemotronConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str           # NVIDIA checkpoint name, e.g. "backbone.layers.3.mixer.experts.7.up_proj.weight"
    shape: tuple        # logical (unquantized) shape
    block: str          # "embedding" | "head" | "norm" | "mamba" | "attention" | "moe" | "mlp"
    role: str           # e.g. "in_proj", "expert_up", "shared_down", "fc1_latent", "gate", "norm", "conv"
    layer: int | None   # backbone layer index, or None
    mtp: bool = False   # part of the MTP head (mtp.layers.*)
    expert: int | None = None  # routed expert index

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_linear(self) -> bool:
        """A 2-D projection weight (what ModelOpt may quantize); embeddings and routers are not Linear."""
        return self.name.endswith("_proj.weight")


def _mixer_specs(cfg: NemotronConfig, prefix: str, block: str, layer: int, mtp: bool):
    d = cfg.hidden_size

    def spec(suffix, shape, role, expert=None):
        return TensorSpec(f"{prefix}.mixer.{suffix}", tuple(shape), block, role, layer, mtp, expert)

    if block == "mamba":
        h, i, w = cfg.mamba_num_heads, cfg.mamba_intermediate, cfg.conv_kernel
        out = [spec("in_proj.weight", (cfg.in_proj_out, d), "in_proj"),
               spec("conv1d.weight", (cfg.conv_dim, 1, w), "conv")]
        if cfg.use_conv_bias:
            out.append(spec("conv1d.bias", (cfg.conv_dim,), "conv_bias"))
        out += [spec("A_log", (h,), "A_log"), spec("D", (h,), "D"), spec("dt_bias", (h,), "dt_bias"),
                spec("norm.weight", (i,), "gated_norm"), spec("out_proj.weight", (d, i), "out_proj")]
        return out
    if block == "attention":
        q, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        return [spec("q_proj.weight", (q * dh, d), "q_proj"), spec("k_proj.weight", (kv * dh, d), "k_proj"),
                spec("v_proj.weight", (kv * dh, d), "v_proj"), spec("o_proj.weight", (d, q * dh), "o_proj")]
    if block == "mlp":
        f = cfg.intermediate_size
        return [spec("up_proj.weight", (f, d), "mlp_up"), spec("down_proj.weight", (d, f), "mlp_down")]
    if block == "moe":
        e, f, l = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_input_width
        out = [spec("gate.weight", (e, d), "gate"), spec("gate.e_score_correction_bias", (e,), "gate_bias")]
        for x in range(e):
            out += [spec(f"experts.{x}.up_proj.weight", (f, l), "expert_up", x),
                    spec(f"experts.{x}.down_proj.weight", (l, f), "expert_down", x)]
        if cfg.moe_shared_expert_intermediate_size:
            sh = cfg.moe_shared_expert_intermediate_size
            out += [spec("shared_experts.up_proj.weight", (sh, d), "shared_up"),
                    spec("shared_experts.down_proj.weight", (d, sh), "shared_down")]
        if cfg.moe_latent_size:
            out += [spec("fc1_latent_proj.weight", (cfg.moe_latent_size, d), "fc1_latent"),
                    spec("fc2_latent_proj.weight", (d, cfg.moe_latent_size), "fc2_latent")]
        return out
    raise ValueError(block)


def expected_tensors(cfg: NemotronConfig, include_mtp: bool = True) -> list[TensorSpec]:
    """All tensors of a checkpoint for ``cfg``, in NVIDIA's naming and a stable order."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [TensorSpec("backbone.embeddings.weight", (v, d), "embedding", "embedding", None)]
    for i, block in enumerate(cfg.layers_block_type):
        prefix = f"backbone.layers.{i}"
        out.append(TensorSpec(f"{prefix}.norm.weight", (d,), block, "norm", i))
        out += _mixer_specs(cfg, prefix, block, i, mtp=False)
    out.append(TensorSpec("backbone.norm_f.weight", (d,), "norm", "norm_f", None))
    if not cfg.tie_word_embeddings:
        out.append(TensorSpec("lm_head.weight", (v, d), "head", "lm_head", None))
    if include_mtp:
        out += mtp_tensors(cfg)
    return out


def mtp_tensors(cfg: NemotronConfig) -> list[TensorSpec]:
    """The MTP head (spec section 6): one set of ``mtp.layers.{j}`` per entry of mtp_layers_block_type,
    repeated for each of num_nextn_predict_layers (Super/Ultra have one, reused at every depth)."""
    d = cfg.hidden_size
    out = []
    blocks = cfg.mtp_layers_block_type
    for m in range(cfg.num_nextn_predict_layers):
        for j, block in enumerate(blocks):
            idx = m * len(blocks) + j
            prefix = f"mtp.layers.{idx}"
            if j == 0:  # has_start_projections
                out += [TensorSpec(f"{prefix}.enorm.weight", (d,), "mtp", "enorm", idx, True),
                        TensorSpec(f"{prefix}.hnorm.weight", (d,), "mtp", "hnorm", idx, True),
                        TensorSpec(f"{prefix}.eh_proj.weight", (d, 2 * d), "mtp", "eh_proj", idx, True)]
            out.append(TensorSpec(f"{prefix}.norm.weight", (d,), block, "norm", idx, True))
            out += _mixer_specs(cfg, prefix, block, idx, mtp=True)
            if j == len(blocks) - 1:  # has_end_norm
                out.append(TensorSpec(f"{prefix}.final_layernorm.weight", (d,), "mtp", "final_layernorm", idx,
                                      True))
    return out
