"""What a decoded token costs each rank of a sharded model: collectives (counted by the tests against the
real run) and weight bytes read (MODELLED from the config and a quantization recipe; nothing here is measured).

Collectives of one forward (any number of tokens, batch 1 or more) under a ``Layout`` (shard.py):
- dense parts split ("tp"): one all-reduce for the vocab-parallel embedding, one per block, one more per
  Mamba block whose norm groups span ranks (R a multiple of n_groups, R > n_groups), and
  one all-gather of the logits;
- dense parts replicated (EP only): one all-reduce per MoE block.
A generated token adds one broadcast: rank 0's sampled id (RankZeroRng).

Bytes per token per rank: every weight a token multiplies by, at its stored size (checkpoint/modelopt.py
recipes, params.tensor_bytes), times the share of it the rank holds; routed experts count top-k of the
n_routed_experts. Expert parallelism is modelled with uniform, independent routing: the mean rank reads
k/R experts, the slowest rank E[max] of them (``expected_max_experts``, exact). The embedding row lookup is
left out, as params.py's "active" count leaves it out; the MTP head is not included.
"""

from __future__ import annotations

from math import comb

from ..checkpoint.modelopt import recipe_formats
from ..params import tensor_bytes
from .shard import Layout, attention_kv_heads, check_layout, mamba_conv_channels, mamba_in_proj_rows

REPLICATED_ROLES = frozenset({"norm", "norm_f", "gate", "gate_bias", "fc1_latent", "fc2_latent"})
PARTS = {"in_proj": "mamba", "conv": "mamba", "conv_bias": "mamba", "A_log": "mamba", "D": "mamba",
         "dt_bias": "mamba", "gated_norm": "mamba", "out_proj": "mamba", "q_proj": "attention",
         "k_proj": "attention", "v_proj": "attention", "o_proj": "attention", "mlp_up": "mlp", "mlp_down": "mlp",
         "shared_up": "shared expert", "shared_down": "shared expert", "gate": "router and latent (replicated)",
         "gate_bias": "router and latent (replicated)", "fc1_latent": "router and latent (replicated)",
         "fc2_latent": "router and latent (replicated)", "norm": "norms (replicated)",
         "norm_f": "norms (replicated)", "lm_head": "lm_head", "expert_up": "routed experts",
         "expert_down": "routed experts"}


def collectives_per_forward(cfg, layout, blocks=None):
    """{kind: calls} of one forward of the stack ``blocks`` (default: the backbone) under ``layout``."""
    blocks = cfg.layers_block_type if blocks is None else blocks
    R = layout.ranks
    if layout.dense == "replicated":
        return {"all_reduce": sum(b == "moe" for b in blocks)}
    spans = sum(b == "mamba" for b in blocks) if cfg.n_groups % R else 0
    return {"all_reduce": 1 + len(blocks) + spans, "all_gather": 1}


def collectives_per_token(cfg, layout):
    """{kind: calls} per generated token of plain decoding: one forward and rank 0's id broadcast."""
    return {**collectives_per_forward(cfg, layout), "broadcast": 1}


def wire_bytes_per_token(cfg, layout, itemsize=4):
    """{kind: bytes one rank contributes} per generated token at batch 1 (activations of ``itemsize``)."""
    calls = collectives_per_token(cfg, layout)
    d, v, R = cfg.hidden_size, cfg.vocab_size, layout.ranks
    out = {"all_reduce": 0, "all_gather": 0, "broadcast": 8 * calls["broadcast"]}
    if layout.dense == "tp":
        spans = calls["all_reduce"] - 1 - cfg.num_hidden_layers          # the span-norm sums: n_groups values
        out["all_reduce"] = itemsize * (d * (calls["all_reduce"] - spans) + cfg.n_groups * spans)
        out["all_gather"] = itemsize * v // R
    else:
        out["all_reduce"] = itemsize * d * calls["all_reduce"]
    return out


def expected_max_experts(n_experts, k, ranks):
    """E[max over ranks of the selected experts a rank owns] when k of n_experts are chosen uniformly without
    replacement and each rank owns n_experts / ranks of them. Exact: P(max <= m) counts the selections with at
    most m per rank, the x^k coefficient of (sum_{j<=m} C(n/R, j) x^j)^R, over C(n, k)."""
    per = n_experts // ranks
    total, expect = comb(n_experts, k), 0.0
    for m in range(k):
        poly = [1]
        for _ in range(ranks):        # multiply by sum_{j<=m} C(per, j) x^j, truncated at degree k
            nxt = [0] * min(len(poly) + m, k + 1)
            for i, c in enumerate(poly):
                for j in range(min(m, per) + 1):
                    if i + j <= k:
                        nxt[i + j] += c * comb(per, j)
            poly = nxt
        at_most_m = poly[k] if len(poly) > k else 0
        expect += 1.0 - at_most_m / total          # E[max] = sum_{m>=0} P(max > m)
    return expect


def _share(spec, cfg, layout):
    """The fraction of one tensor's bytes a rank reads per token (routed experts: before top-k)."""
    R, role = layout.ranks, spec.role
    if role in REPLICATED_ROLES or role == "embedding":
        return 1.0
    if role in ("expert_up", "expert_down"):
        return 1.0 / R                      # TP slices every expert; EP: the mean rank's share
    if layout.dense == "replicated":
        return 1.0
    if role == "in_proj":
        return len(mamba_in_proj_rows(cfg, 0, R)) / cfg.in_proj_out
    if role in ("conv", "conv_bias"):
        return len(mamba_conv_channels(cfg, 0, R)) / cfg.conv_dim
    if role in ("k_proj", "v_proj"):
        kv = attention_kv_heads(cfg, 0, R)
        return (kv.stop - kv.start) / cfg.num_key_value_heads
    return 1.0 / R


def modelled_decode(cfg, recipe, layout):
    """MODELLED per-rank cost of one decoded token (batch 1, backbone): weight bytes by part, the mean and the
    slowest rank (EP), the single-device total, and the collectives with the bytes each rank puts on them."""
    layout = check_layout(cfg, layout, with_mtp=False)
    topk = cfg.num_experts_per_tok / cfg.n_routed_experts
    parts, single = {}, 0.0
    for spec, fmt in recipe_formats(cfg, recipe, include_mtp=False):
        if spec.role == "embedding":
            continue
        full = tensor_bytes(spec.numel, fmt) * (topk if spec.expert is not None else 1.0)
        single += full
        part = PARTS[spec.role]
        parts[part] = parts.get(part, 0.0) + full * _share(spec, cfg, layout)
    mean = sum(parts.values())
    slowest = mean
    if layout.experts == "ep" and "routed experts" in parts:
        k, R = cfg.num_experts_per_tok, layout.ranks
        worst = expected_max_experts(cfg.n_routed_experts, k, R)
        slowest = mean + parts["routed experts"] * (worst / (k / R) - 1.0)
    return {"layout": layout.label, "recipe": recipe, "parts": parts, "per_rank_mean": mean,
            "per_rank_slowest": slowest, "single_device": single,
            "collectives": collectives_per_token(cfg, layout), "wire_bytes": wire_bytes_per_token(cfg, layout),
            "expected_max_experts": (expected_max_experts(cfg.n_routed_experts, cfg.num_experts_per_tok,
                                                          layout.ranks) if layout.experts == "ep" else None)}


def format_modelled(report, gb=1e9):
    """The markdown rows docs/parallel.md and docs/benchmarks.md show for one modelled_decode report."""
    rows = [f"| {part} | {b / gb:.2f} |" for part, b in sorted(report["parts"].items())]
    rows.append(f"| **per rank (mean)** | **{report['per_rank_mean'] / gb:.2f}** |")
    rows.append(f"| per rank (slowest, uniform routing) | {report['per_rank_slowest'] / gb:.2f} |")
    rows.append(f"| one device, unsharded | {report['single_device'] / gb:.2f} |")
    return "\n".join(rows)


def describe_collectives(counts):
    """{"all_reduce": 109, "all_gather": 1} -> "109 all-reduces, 1 all-gather"."""
    return ", ".join(f"{n} {k.replace('_', '-')}{'' if n == 1 else 's'}" for k, n in counts.items())


def main(argv=None):
    """``python -m nemo_scratch.parallel.tensor_cost``: the modelled tables of docs/parallel.md."""
    import argparse

    from ..config import preset

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--preset", default="ultra")
    parser.add_argument("--recipe", default="ultra")
    parser.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args(argv)
    cfg = preset(args.preset)
    for layout in (Layout.of(tp=args.ranks), Layout.of(args.ranks, args.ranks), Layout.of(ep=args.ranks)):
        report = modelled_decode(cfg, args.recipe, layout)
        print(f"\n{args.preset} {args.recipe} {layout.label} (MODELLED): "
              f"{describe_collectives(report['collectives'])} per token\n")
        print("| part | GB per token, per rank |\n|---|---:|")
        print(format_modelled(report))


if __name__ == "__main__":
    main()
