"""Checkpoints written tensor by tensor, in bounded memory: what write_checkpoint, make-random and quantize share.

A checkpoint is a list of ``Entry``: one logical weight, the stored tensors it becomes (``layout``: names,
safetensors dtypes, shapes) and a producer of their bytes (``pieces``). Every size follows from a shape and a
format (the params.tensor_bytes rules), so each shard's header is written first and the data after it, one
piece at a time, straight into the shard file: nothing is buffered or rewritten. What is held at any moment:
WORKERS pieces of at most PIECE_ELEMS values being encoded on threads (about 13 bytes a value for BF16, 33
for NVFP4 or FP8, plus the float32 slice itself), the values of the quantized weight being written when it
has at most HOLD_ELEMS of them, and an NVFP4 weight's block scales (one byte per 16 values) until its codes
are out (stream_peak_bytes).

A weight to encode comes as ``values``: a function returning an iterator of float32 slices of rows
(``row_slices``). Plain weights are encoded slice by slice; a quantized one needs its values twice, once for
the per-tensor amax and once to encode each slice with the scale that amax gives (ops/quant.py quantizes rows
independently once the per-tensor scale is fixed, so the codes equal those of the whole tensor at once): the
slices of the first pass are kept for the second, or, above HOLD_ELEMS values, read (drawn) again.

Shards: ``plan_shards`` cuts the entries, in order, into ``shards`` parts of about equal bytes (what
write_checkpoint always did) or into parts of at most ``shard_bytes`` (a weight larger than that gets a part
of its own); one part is ``model.safetensors``, more are ``model-0000k-of-0000N.safetensors`` plus the index.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CheckpointError, InputError
from ..ops.quant import fp8_quantize, nvfp4_quantize
from .modelopt import config_json_entry
from .reader import CONFIG, INDEX, QUANT_CONFIG, SINGLE
from .safe_write import atomic_directory, atomic_file, copy_file
from .safetensors_io import STORAGE, encode, write_safetensors_stream

PIECE_ELEMS = 2**18              # values encoded at a time (1 MiB of float32)
WORKERS = max(1, min(8, os.cpu_count() or 1))   # threads encoding pieces (in order; see ordered_map)
HOLD_ELEMS = 2**24               # a quantized weight up to this size (64 MiB of float32) is read once, kept
PIECE_BYTES_PER_ELEM = 64        # an upper bound of what a piece allocates per value (measured: 21-41 in all)
DEFAULT_SHARD_BYTES = 2 * 2**30  # quantize's and make-random's shard size unless told otherwise
METADATA = {"format": "pt"}      # transformers refuses a safetensors file whose metadata lacks a format
# Kept in F32 whatever the float dtype, as NVIDIA ships them (A_log and D feed exp and a skip connection; the
# router bias only ranks experts, and transformers keeps it fp32 too: _keep_in_fp32_modules_strict).
F32_SUFFIXES = (".A_log", ".D", ".gate.e_score_correction_bias")
QUANTIZED = ("nvfp4", "fp8")


@dataclass(frozen=True)
class Entry:
    """One logical weight as written: ``layout`` ((stored name, dtype, shape), ...) in file order, and
    ``pieces()`` -> an iterator of (stored name, array in the stored dtype) giving those tensors' bytes."""

    name: str
    layout: tuple
    pieces: Callable

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * STORAGE[dtype].itemsize for _, dtype, shape in self.layout)


def row_slices(shape, piece_elems=None):  # -> [(r0, r1)] covering the rows of a tensor of ``shape``
    """Slices of whole rows (the first axis) of at most ``piece_elems`` values (one row when a row is larger)."""
    if len(shape) == 0:
        return [(None, None)]
    per_row = math.prod(shape[1:])
    step = max(1, (PIECE_ELEMS if piece_elems is None else piece_elems) // max(1, per_row))
    return [(r0, min(r0 + step, shape[0])) for r0 in range(0, shape[0], step)]


def layout_of(name, shape, fmt, float_dtype="BF16") -> tuple:
    """The stored tensors of one weight in format ``fmt`` ("nvfp4", "fp8", anything else: plain), ModelOpt's
    sets for the quantized ones (spec 9.2): X.weight codes, X.weight_scale, (X.weight_scale_2)."""
    base = name[:-len("weight")]
    if fmt == "nvfp4":
        out, cols = shape
        return ((name, "U8", (out, cols // 2)), (base + "weight_scale", "F8_E4M3", (out, cols // 16)),
                (base + "weight_scale_2", "F32", ()))
    if fmt == "fp8":
        return (name, "F8_E4M3", tuple(shape)), (base + "weight_scale", "F32", ())
    return ((name, "F32" if name.endswith(F32_SUFFIXES) else float_dtype, tuple(shape)),)


def encoded_entry(name, shape, fmt, values, float_dtype="BF16", where=None) -> Entry:
    """The Entry of a weight whose float32 values ``values()`` yields slice by slice (new arrays, not views of
    a reused buffer), stored as ``fmt``. ``where`` names the weight (and its file) when a value cannot be
    quantized. The slices are encoded on WORKERS threads, in order."""
    if fmt in QUANTIZED and not name.endswith(".weight"):
        raise CheckpointError(f"tensor {name!r}: only a '.weight' can be stored as {fmt}")
    layout = layout_of(name, shape, fmt, float_dtype)
    if fmt in QUANTIZED:
        held = math.prod(shape) <= HOLD_ELEMS
        return Entry(name, layout, lambda: _quantized_pieces(layout, fmt, values, where or f"tensor {name!r}", held))
    stored, dtype = layout[0][:2]
    return Entry(name, layout, lambda: ((stored, piece) for piece in ordered_map(lambda v: encode(v, dtype),
                                                                                  values())))


def _quantized_pieces(layout, fmt, values, where, held):
    """Two passes over the values: the per-tensor amax, then each slice encoded with the scale it gives. A
    weight of at most HOLD_ELEMS values is read once, its slices kept for the second pass."""
    amax, kept = np.float32(0), []
    for rows in values():
        if not np.isfinite(rows).all():
            raise InputError(f"{where} contains NaN or inf; only finite weights can be quantized")
        amax = max(amax, np.abs(rows).max(initial=np.float32(0)))
        if held:
            kept.append(rows)
    amax = np.float32(amax)
    again = _drain(kept) if held else values()
    if fmt == "fp8":
        (codes_name, _, _), (scale_name, _, _) = layout
        for q in ordered_map(lambda rows: fp8_quantize(rows, amax=amax), again):
            yield codes_name, q.data
        yield scale_name, np.asarray(q.scale, dtype=np.float32).reshape(())
        return
    (codes_name, _, _), (block_name, _, _), (global_name, _, _) = layout
    block_scales = []        # one byte per 16 values: written after the codes, as the layout orders them
    for q in ordered_map(lambda rows: nvfp4_quantize(rows, amax=amax), again):
        yield codes_name, q.packed
        block_scales.append(q.block_scale)
    yield from ((block_name, s) for s in block_scales)
    yield global_name, np.asarray(q.global_scale, dtype=np.float32).reshape(())


def _drain(items):
    """Yield and forget the items of a list, first to last (each slice freed once it is encoded)."""
    items.reverse()
    while items:
        yield items.pop()


def ordered_map(fn, items):
    """fn(item) for each item, computed on WORKERS threads (NumPy releases the GIL in its loops), yielded in
    order; at most WORKERS items are in flight, so memory holds WORKERS slices, not the iterable."""
    if WORKERS <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(WORKERS) as pool:
        window = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= WORKERS:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def array_entry(name, group) -> Entry:
    """The Entry of tensors already in memory: ``group`` [(stored name, (array, dtype))], encoded a row slice
    at a time (the same bytes as encoding each array whole)."""
    layout = tuple((stored, dtype, tuple(np.shape(array))) for stored, (array, dtype) in group)

    def pieces():
        for stored, (array, dtype) in group:
            array = np.asarray(array)
            for r0, r1 in row_slices(array.shape):
                yield stored, encode(array if r0 is None else array[r0:r1], dtype)

    return Entry(name, layout, pieces)


# ---------------------------------------------------------------------------------------------- shards

def plan_shards(sizes, shards=None, shard_bytes=None, what="write_checkpoint") -> list:
    """Entry indices cut, in order, into non-empty parts: ``shards`` of about equal bytes, or parts of at
    most ``shard_bytes`` (DEFAULT_SHARD_BYTES when neither is given). -> [[index, ...], ...]."""
    if shards is not None and shard_bytes is not None:
        raise InputError(f"{what}: pass shards or shard_bytes, not both (got {shards!r} and {shard_bytes!r})")
    if shards is not None:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise InputError(f"{what}: argument shards={shards!r}; expected an integer >= 1")
        if shards > len(sizes):
            raise InputError(f"{what}: argument shards={shards} exceeds the {len(sizes)} weights to write")
        return _split_even(sizes, shards)
    limit = DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 1 or math.isinf(limit):
        raise InputError(f"{what}: argument shard_bytes={shard_bytes!r}; expected a finite number of bytes >= 1")
    parts, filled = [[]], 0
    for i, size in enumerate(sizes):
        if parts[-1] and filled + size > limit:
            parts.append([])
            filled = 0
        parts[-1].append(i)
        filled += size
    return parts


def _split_even(sizes, shards) -> list:
    """``shards`` non-empty parts of about equal bytes: a new part starts once the bytes so far reach the
    share of the parts started, or when only as many weights are left as parts still to fill."""
    total, done, parts = sum(sizes), 0, [[]]
    for i, size in enumerate(sizes):
        shards_left = shards - len(parts)
        if parts[-1] and shards_left and (len(sizes) - i <= shards_left or done >= total * len(parts) / shards):
            parts.append([])
        parts[-1].append(i)
        done += size
    return parts


# ---------------------------------------------------------------------------------------------- writing

def write_streamed(out_dir, cfg, entries, *, shards=None, shard_bytes=None, quant_config=None, overwrite=False,
                   sources=(), extra_files=(), progress=None, what="write_checkpoint", disk_what=None) -> Path:
    """Write ``entries`` and ``cfg`` as the checkpoint ``out_dir``, atomically (safe_write.atomic_directory:
    the destination rules, and a temporary sibling that takes its place once complete).

    quant_config  a ModelOpt dict: hf_quant_config.json and config.json's "quantization_config"
    extra_files   paths copied in by name (tokenizer.json, ...)
    progress      an object with update(n_bytes): called as the tensor bytes are written
    disk_what     how the refusal names what does not fit on the disk (default: "the checkpoint")
    """
    out_dir = Path(out_dir)
    parts = plan_shards([e.nbytes for e in entries], shards, shard_bytes, what)
    extra_files = [Path(f) for f in extra_files]
    for f in extra_files:
        if not f.is_file():
            raise InputError(f"{what}: extra file {f} not found")
    check_disk(out_dir, sum(e.nbytes for e in entries) + sum(f.stat().st_size for f in extra_files),
               disk_what or f"{what}: the checkpoint")
    with atomic_directory(out_dir, overwrite, sources, what="write_checkpoint: out_dir") as tmp:
        write_entries(tmp, cfg, entries, parts, quant_config, None if progress is None else progress.update)
        for f in extra_files:
            with atomic_file(tmp / f.name, what=f"{what}: {f.name}") as out:
                copy_file(f, out)
    return out_dir


def write_entries(directory: Path, cfg, entries, parts, quant_config=None, on_bytes=None) -> list:
    """The files of a checkpoint in the (new, empty) ``directory``: the shards of ``parts`` (plan_shards) and
    their index, then hf_quant_config.json, then config.json. -> the names written."""
    written, weight_map, total = [], {}, 0
    for k, part in enumerate(parts):
        file_name = SINGLE if len(parts) == 1 else f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        layout = [t for i in part for t in entries[i].layout]
        pieces = (piece for i in part for piece in entries[i].pieces())
        write_safetensors_stream(directory / file_name, layout, pieces, METADATA, on_bytes)
        weight_map.update({name: file_name for name, _, _ in layout})
        total += sum(entries[i].nbytes for i in part)
        written.append(file_name)
    if len(parts) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(directory / INDEX, index)
        written.append(INDEX)
    config = cfg.to_dict()
    if quant_config is not None:
        write_json(directory / QUANT_CONFIG, quant_config)
        written.append(QUANT_CONFIG)
        # config.json carries the flat form transformers and vLLM read (quant_method "modelopt")
        config["quantization_config"] = config_json_entry(quant_config)
    write_json(directory / CONFIG, config, sort_keys=True)
    return written + [CONFIG]


def check_disk(out_dir, nbytes, what):
    """Refuse before writing when the filesystem of ``out_dir`` has less room than the new files need (the
    old files stay until the new ones are complete, so their room does not count)."""
    from ..memory import free_disk_bytes, gib

    free = free_disk_bytes(out_dir)
    need = nbytes + 2**20   # headers, index and config files
    if free is not None and need > free:
        raise InputError(f"{what} needs about {gib(need)} on disk at {out_dir} but only {gib(free)} is free there")


def write_json(path, value, sort_keys=False):
    with atomic_file(path, overwrite=True, what=str(path), error=CheckpointError) as f:
        f.write((json.dumps(value, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8"))


def stream_peak_bytes(nvfp4_numel=0, quantized_numel=0) -> int:
    """What writing a checkpoint holds at most besides its entry list: WORKERS pieces being encoded (and one
    being read), the values of its largest quantized weight when it is held for the second pass
    (``quantized_numel`` float32 values, if at most HOLD_ELEMS) and the block scales of its largest NVFP4
    weight (``nvfp4_numel`` values, one byte per 16)."""
    held = 4 * quantized_numel if quantized_numel <= HOLD_ELEMS else 0
    return PIECE_BYTES_PER_ELEM * PIECE_ELEMS * (WORKERS + 1) + held + nvfp4_numel // 16
