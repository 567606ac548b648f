"""Parameter, byte and GPU-memory accounting from a config alone (no weights needed).

Shapes come from checkpoint/schema.expected_tensors and storage formats from checkpoint/modelopt.recipe_format,
the same two functions the loader and the quantizer use, so the numbers here describe the files those write.

Conventions (chosen because they reproduce NVIDIA's published figures; see PUBLISHED):
- total params: every tensor of the checkpoint, embeddings and lm_head included; reported without and with
  the MTP head.
- active params per token: every tensor a token's forward pass multiplies by, with the routed experts
  counted as top-k of n_routed_experts. It EXCLUDES the input embedding table (a row lookup, not a matmul)
  and INCLUDES lm_head; ``active_with_embeddings`` adds the table back. NVIDIA's Nano card says "3.2B active
  (3.6B with embeddings)": these are exactly those two figures. Super's "A12B" and Ultra's "A55B" are the
  first one. "active with MTP" adds one MTP depth (its layers and its top-k experts).
- bytes per tensor (ModelOpt layout, spec 9.2): BF16 2 B/elem; F32 4 B/elem (A_log, D, router bias); FP8
  1 B/elem + 4 B weight_scale + 4 B input_scale; NVFP4 0.5 B/elem + 1 B per 16 elems (E4M3 block scales)
  + 4 B weight_scale_2 + 4 B input_scale.
- GPU plan: the checkpoint bytes split evenly over N GPUs; weights only (no KV cache, activations or
  workspace), so "fits" is a necessary condition, not a sufficient one.
"""

from __future__ import annotations

from .checkpoint.modelopt import RECIPES, recipe_formats
from .checkpoint.schema import expected_tensors
from .config import NemotronConfig, preset
from .errors import InputError

SCALE_BYTES = 4        # one float32 scale (weight_scale, weight_scale_2 or input_scale)
NVFP4_BLOCK = 16
GB, GIB = 1e9, 2 ** 30

# NVIDIA's published figures (spec section 8, 9.1; NVIDIA research pages and model cards).
PUBLISHED = {
    "nano": {"total": 31.6e9, "active": 3.2e9, "active_with_embeddings": 3.6e9,
             "source": "Nemotron 3 Nano: '3.2B active (3.6B with embeddings), 31.6B total'"},
    "super": {"total": 120e9, "active": 12e9, "source": "Nemotron 3 Super 120B-A12B: '12B active 120B total'"},
    "ultra": {"total": 550e9, "total_with_mtp": 560e9, "active": 55e9,
              "bytes": {"ultra": 352.3e9, "bf16": 1121e9}, "bits_per_param": {"ultra": 5.03},
              "source": "Nemotron 3 Ultra 550B-A55B: 550B total (~560B with MTP), 55B active; NVFP4 "
                        "checkpoint 352.3 GB from 1,121 GB BF16"},
}


def tensor_bytes(numel: int, fmt: str, with_input_scale: bool = True) -> float:
    """Bytes one tensor of ``numel`` elements takes in storage format ``fmt`` (ModelOpt layout)."""
    scales = SCALE_BYTES * (2 if with_input_scale else 1)
    if fmt == "nvfp4":
        # packed E2M1 (0.5 B) + one E4M3 block scale per 16 + weight_scale_2 (+ input_scale)
        return numel / 2 + numel // NVFP4_BLOCK + scales
    if fmt == "fp8":
        return numel + scales
    if fmt == "f32":
        return 4 * numel
    if fmt == "bf16":
        return 2 * numel
    raise InputError(f"unknown storage format {fmt!r}: expected nvfp4, fp8, f32 or bf16")


def _resolve(cfg_or_name):
    if isinstance(cfg_or_name, NemotronConfig):
        return cfg_or_name, None
    if isinstance(cfg_or_name, str):
        return preset(cfg_or_name), cfg_or_name
    raise InputError(f"expected a NemotronConfig or a preset name, got {type(cfg_or_name).__name__}")


def count_params(cfg: NemotronConfig) -> dict:
    """Total and active parameter counts (see the module docstring for the conventions)."""
    topk_share = cfg.num_experts_per_tok / cfg.n_routed_experts
    out = dict.fromkeys(("total", "total_with_mtp", "active", "active_with_mtp", "embedding"), 0)
    for spec in expected_tensors(cfg):
        n = spec.numel
        # active: routed experts count top-k / n_routed_experts; the embedding table is a lookup
        active = n * topk_share if spec.expert is not None else n
        if spec.role == "embedding":
            out["embedding"] = n
            active = n if cfg.tie_word_embeddings else 0   # a tied table is also the lm_head matmul
        out["total_with_mtp"] += n
        out["active_with_mtp"] += active
        if not spec.mtp:
            out["total"] += n
            out["active"] += active
    out["active_with_embeddings"] = out["active"] + (0 if cfg.tie_word_embeddings else out["embedding"])
    out["active"], out["active_with_mtp"] = round(out["active"]), round(out["active_with_mtp"])
    out["active_with_embeddings"] = round(out["active_with_embeddings"])
    return out


def count_bytes(cfg: NemotronConfig, recipe: str, include_mtp: bool = True) -> dict:
    """Checkpoint bytes under ``recipe``: {"total", "params", "bits_per_param", "by_format": {fmt:
    {"tensors", "params", "bytes"}}}. MTP tensors are included when the config has them and include_mtp."""
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}: expected one of {RECIPES}")
    by_format = {}
    for spec, fmt in recipe_formats(cfg, recipe, include_mtp=include_mtp):
        row = by_format.setdefault(fmt, {"tensors": 0, "params": 0, "bytes": 0.0})
        row["tensors"] += 1
        row["params"] += spec.numel
        row["bytes"] += tensor_bytes(spec.numel, fmt)
    total = sum(r["bytes"] for r in by_format.values())
    params = sum(r["params"] for r in by_format.values())
    return {"total": total, "params": params, "bits_per_param": 8 * total / params,
            "by_format": dict(sorted(by_format.items()))}


def plan(cfg_or_preset_name, recipe: str = "bf16", gpus: int = 8, gpu_mem_gib: float = 80.0) -> dict:
    """Parameters, checkpoint bytes and an even split over ``gpus`` GPUs of ``gpu_mem_gib`` GiB each.

    Never raises for a plan that does not fit: it reports ``fits: False`` and the caller decides. Invalid
    arguments (gpus <= 0, gpu_mem_gib <= 0, unknown recipe or preset) raise InputError / ConfigError.
    """
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus <= 0:
        raise InputError(f"plan: gpus must be a positive integer, got {gpus!r}")
    if isinstance(gpu_mem_gib, bool) or not isinstance(gpu_mem_gib, (int, float)) or not gpu_mem_gib > 0:
        raise InputError(f"plan: gpu_mem_gib must be a positive number, got {gpu_mem_gib!r}")
    if recipe not in RECIPES:
        raise InputError(f"plan: unknown recipe {recipe!r}: expected one of {RECIPES}")
    cfg, name = _resolve(cfg_or_preset_name)
    size = count_bytes(cfg, recipe)
    per_gpu = size["total"] / gpus
    return {
        "model": name or "custom config",
        "recipe": recipe,
        "layers": cfg.hybrid_override_pattern,
        "mtp_layers": cfg.num_nextn_predict_layers,
        "params": count_params(cfg),
        "bytes": size,
        "gpus": {"count": gpus, "mem_gib": float(gpu_mem_gib), "per_gpu_bytes": per_gpu,
                 "per_gpu_gib": per_gpu / GIB, "fits": per_gpu <= gpu_mem_gib * GIB,
                 "note": "weights only, even split; KV cache, SSM state and activations come on top"},
        "published": PUBLISHED.get(name, {}),
    }


def _vs(computed, published):
    if published is None:
        return ""
    return f"published ~{published / GB:g}B ({100 * (computed / published - 1):+.1f}%)"


TEST_PRESETS = ("tiny", "small")   # presets of no published model: the test and benchmark sizes


def _count(n) -> str:
    """A parameter count in the unit that keeps it readable: '549.309B', '41.234M', '59,464'."""
    return f"{n / GB:.3f}B" if n >= GB else f"{n / 1e6:.3f}M" if n >= 1e6 else f"{int(n):,}"


def decimal_bytes(n) -> str:
    """Bytes in the decimal unit that keeps them readable, as checkpoint sizes are quoted: '351.88 GB', '68.02 kB'."""
    for unit, scale in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(report: dict) -> str:
    """The plan as a small table, each computed figure next to the published one where NVIDIA gave one."""
    p, b, g, pub = report["params"], report["bytes"], report["gpus"], report["published"]
    lines = [f"model {report['model']}  recipe {report['recipe']}  layers {report['layers']}"
             f"  mtp layers {report['mtp_layers']}", "", "parameters"]
    rows = [("total", p["total"], pub.get("total")),
            ("total with MTP", p["total_with_mtp"], pub.get("total_with_mtp")),
            ("active / token (excl. embedding table)", p["active"], pub.get("active")),
            ("active with embeddings", p["active_with_embeddings"], pub.get("active_with_embeddings")),
            ("active with MTP", p["active_with_mtp"], None)]
    lines += [f"  {label:<40} {_count(value):>11}   {_vs(value, ref)}".rstrip() for label, value, ref in rows]
    lines += ["", f"checkpoint bytes, recipe {report['recipe']}"]
    for fmt, row in b["by_format"].items():
        lines.append(f"  {fmt:<6} {row['tensors']:>7,} tensors {row['params']:>17,} params "
                     f"{decimal_bytes(row['bytes']):>13}")
    ref_bytes = pub.get("bytes", {}).get(report["recipe"])
    ref_bits = pub.get("bits_per_param", {}).get(report["recipe"])
    total = f"  total  {decimal_bytes(b['total'])}, {b['bits_per_param']:.3f} bits per parameter"
    if ref_bytes:
        total += f"   published ~{ref_bytes / GB:g} GB ({100 * (b['total'] / ref_bytes - 1):+.2f}%)"
    if ref_bits:
        total += f", ~{ref_bits} bits"
    lines += [total, "", f"GPUs: {g['count']} x {g['mem_gib']:g} GiB -> {decimal_bytes(g['per_gpu_bytes'])} = "
              f"{g['per_gpu_gib']:.2f} GiB per GPU: {'fits' if g['fits'] else 'does NOT fit'} ({g['note']})"]
    if pub.get("source"):
        lines.append(f"published figures: {pub['source']}")
    if report["model"] in TEST_PRESETS:
        lines.append(f"preset '{report['model']}' is a test size, not a published model, and not the bundled "
                     "trained model either: `nemo-scratch plan --checkpoint nemo_scratch/data/nemotron3-tiny` "
                     "plans that one")
    return "\n".join(lines)
