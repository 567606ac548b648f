"""``nemo-scratch quantize`` and ``nemo-scratch inspect``: write ModelOpt checkpoints, account for every byte.

quantize: a BF16 checkpoint -> per-tensor format from a recipe (checkpoint/modelopt.py::recipe_format, the same
rule params.py counts with) -> NVFP4 / FP8 codecs of ops/quant.py -> shards with the matching
hf_quant_config.json. It streams (checkpoint/stream.py): each weight is read from the source a slice of rows
at a time, decoded to float32, encoded and appended to the shard being written, so memory holds a few slices
(stream.stream_peak_bytes), never the model. inspect: what is stored, grouped by block type and format, or
tensor by tensor; it reads the safetensors headers only.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..guards import SMALL, check_loaded
from .modelopt import RECIPES, quant_config_for, recipe_format
from .paths import resolve_inside
from .reader import COMPANIONS, IGNORED, _where, logical_view, open_checkpoint, validate_checkpoint
from .safe_write import check_destination
from .safetensors_io import STORAGE, bf16_to_float32
from .schema import expected_tensors
from .stream import encoded_entry, row_slices, write_streamed

EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def quantize_checkpoint(src, dst, recipe="ultra", overwrite=False, shards=None, shard_bytes=None, progress=None,
                        quiet=False) -> Counter:
    """Write ``dst``: the checkpoint ``src`` with every tensor stored as ``recipe`` says. -> {format: count}.

    ``dst`` may not be ``src`` (through a symlink either), lie inside it or contain it; a non-empty ``dst`` is
    refused unless ``overwrite=True``; the write is atomic (stream.write_streamed). The tokenizer and
    generation files of ``src`` are copied along. ``shards`` / ``shard_bytes``: as many shards of about equal
    bytes, or shards of at most this many bytes (default stream.DEFAULT_SHARD_BYTES, 2 GiB). ``progress`` /
    ``quiet``: a byte progress bar on stderr (progress.py), or an object with update(n) and close().

    Memory: a few slices of PIECE_ELEMS values (one per encoding thread), a quantized weight of at most
    HOLD_ELEMS values and an NVFP4 weight's block scales (stream.stream_peak_bytes), whatever the model's
    size. The bytes written equal those of quantizing the whole float32 model and writing it."""
    from ..progress import progress_bar

    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise InputError(f"quantize: recipe {recipe!r}; expected one of {RECIPES}")
    check_destination(dst, overwrite, [src], what="quantize: destination")
    reader = open_checkpoint(src)
    cfg, refs, _, _, formats, include_mtp = validate_checkpoint(reader)   # headers only
    specs = expected_tensors(cfg, include_mtp=include_mtp)
    packed = next((s.name for s in specs if formats[s.name] in ("nvfp4", "fp8")), None)
    if packed is not None:
        raise CheckpointError(f"{src}: tensor {packed!r} is already quantized ({formats[packed]}); quantize "
                              "starts from a BF16/F32 checkpoint")
    for s in specs:   # what load_tensors refuses: a non-finite norm, bias or other small tensor (one at a time)
        if len(s.shape) <= 1 or s.numel <= SMALL:
            check_loaded({s.name: _read(reader, refs[s.name])}, lambda name: _where(reader, name, refs[name]))
    entries, counts = [], Counter()
    for spec in specs:
        fmt = recipe_format(spec, recipe, cfg)
        ref = refs[spec.name]
        entries.append(encoded_entry(spec.name, spec.shape, fmt, lambda ref=ref: _source_rows(reader, ref),
                                     where=_where(reader, spec.name, ref)))
        counts[fmt] += 1
    extras = [resolve_inside(Path(src), name, f"{src}: {name}") for name in EXTRA_FILES
              if (Path(src) / name).is_file() or (Path(src) / name).is_symlink()]
    bar = progress if progress is not None else progress_bar(sum(e.nbytes for e in entries),
                                                            f"quantize {Path(dst).name}", quiet)
    try:
        write_streamed(dst, cfg, entries, shards=shards, shard_bytes=shard_bytes,
                       quant_config=quant_config_for(cfg, recipe), overwrite=overwrite, sources=[src],
                       extra_files=extras, progress=bar, what="quantize")
    finally:
        bar.close()
    return counts


def _source_rows(reader, ref):  # -> float32 [rows, ...] slices of one stored weight, in order
    """A stored weight, a slice of rows at a time, as float32: exactly load_tensors(dtype="float32")'s values
    (BF16 and F16 upcast exactly, F64 rounded), each slice read as it is asked for by one plain file read
    (SafetensorsFile.read): neither the weights nor the pages read stay in this process's memory."""
    stored, expert = ref
    file = reader.files[str(reader.file_of(stored).relative_to(reader.directory))]
    shape = file.shape_of(stored) if expert is None else file.shape_of(stored)[1:]
    dtype = file.dtype_of(stored)
    for r0, r1 in row_slices(shape):
        rows = file.read(stored, r0, r1, expert)
        yield bf16_to_float32(rows) if dtype == "BF16" else np.asarray(rows, dtype=np.float32)


def _read(reader, ref):
    return np.concatenate(list(_source_rows(reader, ref)))


def _base(name):
    """The logical weight a stored tensor belongs to (its quantization scales count with it)."""
    for suffix in COMPANIONS:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight"
    return name


def inspect_checkpoint(path, tensors=False) -> dict:
    """Tensors grouped by (block type, format): count, parameters, stored bytes, bits per parameter; with
    ``tensors``, also "tensors": every stored tensor (tensor_listing). Nothing but the headers is read."""
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
    report = {"path": str(path), "pattern": cfg.hybrid_override_pattern, "mtp": info["mtp"], "groups": rows,
              "total_params": total_params, "total_bytes": total_bytes, "file_bytes": file_bytes,
              "bits_per_param": 8 * total_bytes / total_params,
              "quant_algo": ((info["quant_config"] or {}).get("quantization") or info["quant_config"] or {}).get(
                  "quant_algo")}
    if tensors:
        report["tensors"] = tensor_listing(reader, list(specs), formats)
    return report


def tensor_listing(reader, order, formats) -> list:
    """Every stored tensor, from the headers: [{"name": its NVIDIA name, "stored": its name in the file,
    "file", "shape" (as stored), "dtype" (safetensors), "format" (of the weight it belongs to: bf16, f32,
    nvfp4, fp8, ...; "ignored" for the FP8 KV-cache scales), "weight", "bytes"}], in schema order (``order``:
    the logical names), each weight followed by its quantization scales; transformers' stacked experts are one
    tensor, named ``...experts.{0..e-1}...``."""
    rank = {name: i for i, name in enumerate(order)}
    rows = {}
    for name, (stored, expert) in logical_view(reader).items():
        if stored in rows:             # a stacked expert tensor: one row for its e experts
            continue
        shape, dtype = reader.shape_of(stored), reader.dtype_of(stored)
        weight = _base(name)
        shown = name if expert is None else name.replace(f".experts.{expert}.", f".experts.{{0..{shape[0] - 1}}}.")
        rows[stored] = {"name": shown, "stored": stored, "file": reader.file_of(stored).name, "shape": list(shape),
                        "dtype": dtype, "format": "ignored" if name.endswith(IGNORED) else formats[weight],
                        "weight": weight, "bytes": int(np.prod(shape, dtype=np.int64)) * STORAGE[dtype].itemsize}
    companion = {suffix: i + 1 for i, suffix in enumerate(("weight_scale", "weight_scale_2", "input_scale"))}
    return sorted(rows.values(), key=lambda r: (rank.get(r["weight"], len(rank)),
                                                companion.get(r["name"][len(r["weight"]) - len("weight"):], 0),
                                                r["name"]))


def format_tensor_listing(tensors) -> str:
    """The listing as a table: name, stored name (where it differs), file (when several), shape, dtype,
    format, bytes."""
    renamed = any(r["stored"] != r["name"] for r in tensors)
    sharded = len({r["file"] for r in tensors}) > 1
    columns = [("tensor (NVIDIA name)", lambda r: r["name"], "<")]
    if renamed:
        columns.append(("stored as", lambda r: "" if r["stored"] == r["name"] else r["stored"], "<"))
    if sharded:
        columns.append(("file", lambda r: r["file"], "<"))
    columns += [("shape", lambda r: "[" + ", ".join(map(str, r["shape"])) + "]", "<"),
                ("dtype", lambda r: r["dtype"], "<"), ("format", lambda r: r["format"], "<"),
                ("bytes", lambda r: f"{r['bytes']:,}", ">")]
    cells = [[title for title, _, _ in columns]] + [[cell(r) for _, cell, _ in columns] for r in tensors]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(f"{text:{align}{width}}" for text, width, (_, _, align) in zip(row, widths, columns))
                     .rstrip() for row in cells)


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
    if "tensors" in report:
        lines += ["", format_tensor_listing(report["tensors"])]
    return "\n".join(lines)
