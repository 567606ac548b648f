"""``nemo-scratch quantize`` and ``nemo-scratch inspect``: write ModelOpt checkpoints, account for every byte.

quantize: BF16 checkpoint -> per-tensor format from a recipe (checkpoint/modelopt.py::recipe_format, the same
rule params.py counts with) -> NVFP4 / FP8 codecs of ops/quant.py -> write_checkpoint with the matching
hf_quant_config.json. inspect: what is stored, grouped by block type and format.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..ops.quant import FP8Weight, NVFP4Weight, fp8_quantize, nvfp4_quantize
from .modelopt import RECIPES, quant_config_for, recipe_format
from .paths import resolve_inside
from .reader import COMPANIONS, load_tensors, logical_view, open_checkpoint, validate_checkpoint
from .safe_write import check_destination
from .safetensors_io import STORAGE
from .schema import expected_tensors
from .writer import write_checkpoint

QUANTIZERS = {"nvfp4": nvfp4_quantize, "fp8": fp8_quantize}
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def quantize_checkpoint(src, dst, recipe="ultra", overwrite=False) -> Counter:
    """Write ``dst``: the checkpoint ``src`` with every tensor stored as ``recipe`` says. -> {format: count}.

    ``dst`` may not be ``src`` (through a symlink either), lie inside it or contain it; a non-empty ``dst`` is
    refused unless ``overwrite=True``; the write is atomic (writer.write_checkpoint). The tokenizer and
    generation files of ``src`` are copied along."""
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise InputError(f"quantize: recipe {recipe!r}; expected one of {RECIPES}")
    check_destination(dst, overwrite, [src], what="quantize: destination")
    cfg, tensors, info = load_tensors(src, dtype="float32")
    packed = [n for n, w in tensors.items() if isinstance(w, (NVFP4Weight, FP8Weight))]
    if packed:
        raise CheckpointError(f"{src}: tensor {packed[0]!r} is already quantized ({info['formats'][packed[0]]}); "
                              "quantize starts from a BF16/F32 checkpoint")
    out, counts = {}, Counter()
    for spec in expected_tensors(cfg, include_mtp=info["mtp"]):
        fmt = recipe_format(spec, recipe, cfg)
        out[spec.name] = QUANTIZERS[fmt](tensors[spec.name]) if fmt in QUANTIZERS else tensors[spec.name]
        counts[fmt] += 1
    extras = [resolve_inside(Path(src), name, f"{src}: {name}") for name in EXTRA_FILES
              if (Path(src) / name).is_file() or (Path(src) / name).is_symlink()]
    write_checkpoint(dst, cfg, out, quant_config=quant_config_for(cfg, recipe), overwrite=overwrite, sources=[src],
                     extra_files=extras)
    return counts


def _base(name):
    """The logical weight a stored tensor belongs to (its quantization scales count with it)."""
    for suffix in COMPANIONS:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight"
    return name


def inspect_checkpoint(path) -> dict:
    """Tensors grouped by (block type, format): count, parameters, stored bytes, bits per parameter."""
    reader = open_checkpoint(path)
    cfg, _, _, _, formats, include_mtp = validate_checkpoint(reader)   # names, shapes, formats; no tensor read
    info = {"mtp": include_mtp, "formats": formats, "quant_config": reader.quant_config}
    specs = {s.name: s for s in expected_tensors(cfg, include_mtp=info["mtp"])}
    stored = defaultdict(float)
    for name, (stored_name, expert) in logical_view(reader).items():
        shape = reader.shape_of(stored_name)
        nbytes = float(np.prod(shape, dtype=np.int64)) * STORAGE[reader.dtype_of(stored_name)].itemsize
        stored[_base(name)] += nbytes / shape[0] if expert is not None else nbytes
    groups = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0.0})
    for name, spec in specs.items():
        key = ("mtp." if spec.mtp else "") + spec.block, info["formats"][name]
        g = groups[key]
        g["tensors"] += 1
        g["params"] += spec.numel
        g["bytes"] += stored.get(name, 0.0)
    rows = [{"block": b, "format": f, **g, "bits_per_param": 8 * g["bytes"] / g["params"]}
            for (b, f), g in sorted(groups.items())]
    total_params = sum(r["params"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    file_bytes = sum((reader.directory / f).stat().st_size for f in reader.files)
    return {"path": str(path), "pattern": cfg.hybrid_override_pattern, "mtp": info["mtp"], "groups": rows,
            "total_params": total_params, "total_bytes": total_bytes, "file_bytes": file_bytes,
            "bits_per_param": 8 * total_bytes / total_params,
            "quant_algo": ((info["quant_config"] or {}).get("quantization") or info["quant_config"] or {}).get(
                "quant_algo")}


def format_inspection(report) -> str:
    lines = [f"{report['path']}: pattern {report['pattern']}, MTP {'yes' if report['mtp'] else 'no'}, "
             f"quantization {report['quant_algo'] or 'none'}",
             f"{'block':16s}{'format':8s}{'tensors':>9s}{'params':>14s}{'bytes':>14s}{'bits/param':>12s}"]
    for r in report["groups"]:
        lines.append(f"{r['block']:16s}{r['format']:8s}{r['tensors']:9d}{r['params']:14,d}{r['bytes']:14,.0f}"
                     f"{r['bits_per_param']:12.3f}")
    lines.append(f"{'total':24s}{sum(r['tensors'] for r in report['groups']):9d}{report['total_params']:14,d}"
                 f"{report['total_bytes']:14,.0f}{report['bits_per_param']:12.3f}")
    lines.append(f"tensor bytes {report['total_bytes']:,.0f}; files on disk {report['file_bytes']:,d} "
                 "(headers included)")
    return "\n".join(lines)
