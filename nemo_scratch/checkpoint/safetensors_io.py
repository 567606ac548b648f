"""Safetensors files read and written with NumPy alone (no torch, no ``safetensors`` package).

The format (github.com/huggingface/safetensors), all integers little-endian:

    [8 bytes]  n: uint64, the length of the header
    [n bytes]  a UTF-8 JSON object {name: {"dtype": "BF16", "shape": [r, c], "data_offsets": [begin, end]}, ...}
               plus an optional "__metadata__": {str: str}; writers pad it with spaces to a multiple of 8
    [rest]     the raw tensor bytes, row-major; data_offsets count from the end of the header

Every header field is checked before a byte of data is trusted, and a bad file raises CheckpointError naming
the file and the tensor. Tensor data is read through one read-only np.memmap of the file: ``get`` copies only
what it must convert (BF16 and F16 upcasts), never the whole file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..strict_json import parse_json, read_error
from .safe_write import atomic_file

# safetensors dtype -> the NumPy dtype of its bytes as stored (little-endian on disk, whatever the host).
STORAGE = {
    "BF16": np.dtype("<u2"),     # bfloat16 bit patterns: the high half of a float32
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype("u1"),   # FP8 E4M3FN bit patterns, returned raw: the codec lives in ops/quant.py
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
FLOAT_TYPES = ("BF16", "F16", "F32", "F64")
INT_TYPES = ("I8", "I16", "I32", "I64")
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit; a larger length field is corrupt


# ---------------------------------------------------------------------------------------------- bfloat16

def bf16_to_float32(bits):  # uint16 [...] -> float32 [...]
    """Exact upcast: a bfloat16 is the top half of a float32, so f32_bits = bf16_bits << 16 (inf, NaN too)."""
    from ..ops.quant import bf16_decode

    return bf16_decode(np.asarray(bits, dtype=np.uint16))


def float32_to_bf16(x):  # float32 [...] -> uint16 [...]
    """Round float32 to bfloat16 bit patterns, round-to-nearest, ties to even (what torch and ml_dtypes do).

    Adding 0x7FFF plus the lowest kept bit, then dropping the low 16 bits, rounds the 16 dropped bits: below
    half goes down, above half goes up (a carry into the exponent rounds to the next binade, or to inf past
    the largest bfloat16), and exactly half goes to the neighbour whose last kept bit is 0. NaN stays NaN:
    its sign and top payload bits are kept and the quiet bit is set, so truncation cannot turn it into inf.
    Computed in place in uint32 (about 7 bytes of temporaries per value: the streaming writers encode large
    tensors this way, a slice at a time).
    """
    x = np.asarray(x, dtype=np.float32)
    u = x.reshape(-1).view(np.uint32)
    # in place on one uint32 array: u + 0x7FFF + lsb wraps past 2^32 only for negative NaNs, replaced below
    out = u >> np.uint32(16)
    out &= np.uint32(1)
    out += np.uint32(0x7FFF)
    out += u
    out >>= np.uint32(16)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if is_nan.any():
        out[is_nan] = (u[is_nan] >> np.uint32(16)) | np.uint32(0x0040)
    return out.astype(np.uint16).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- reading

class SafetensorsFile:
    """One validated safetensors file: ``keys()``, ``dtype_of``, ``shape_of``, ``get`` (a NumPy array)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: file is {size} bytes, shorter than the 8-byte header "
                                          "length field: truncated, or not a safetensors file")
                n = int.from_bytes(head, "little")
                if n > size - 8 or n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{self.path}: corrupt header length: the first 8 bytes say {n} header "
                                          f"bytes but {size - 8} bytes follow (limit {MAX_HEADER_BYTES}): "
                                          "truncated, or not a safetensors file")
                raw = f.read(n)
        except OSError as exc:
            raise read_error(self.path, exc, "a .safetensors file") from None
        self._data_start = 8 + n
        self._buffer = None
        self.metadata, self._entries = _parse_header(self.path, raw, data_size=size - 8 - n)

    def keys(self) -> list:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name):
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this file ({len(self._entries)} tensors)")
        return self._entries[name]

    def dtype_of(self, name) -> str:
        """The safetensors dtype string, e.g. "BF16", "F8_E4M3"."""
        return self._entry(name)[0]

    def shape_of(self, name) -> tuple:
        return self._entry(name)[1]

    def nbytes_of(self, name) -> int:
        begin, end = self._entry(name)[2]
        return end - begin

    def raw(self, name):  # -> the stored dtype, host byte order, read-only view of the file where possible
        """The tensor's stored values without conversion (BF16 as uint16 bit patterns)."""
        dtype, shape, (begin, end) = self._entry(name)
        if self._buffer is None:
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
        data = self._buffer[self._data_start + begin:self._data_start + end].view(STORAGE[dtype]).reshape(shape)
        return data.astype(STORAGE[dtype].newbyteorder("="), copy=False)

    def read(self, name, r0=None, r1=None, index=None):  # -> the stored dtype, host byte order, a fresh array
        """The tensor's stored values read into a new array with a plain file read, not through the memory map:
        the page cache it passes through is not mapped into this process, so the copy is all it holds.
        ``r0, r1``: only rows r0:r1 (of entry ``index`` along the first axis, for a stacked tensor), the one
        positioned read a streaming converter makes per slice."""
        dtype, shape, (begin, _) = self._entry(name)
        item = STORAGE[dtype].itemsize
        if index is not None:
            begin += index * math.prod(shape[1:]) * item
            shape = shape[1:]
        if r0 is not None:
            begin += r0 * math.prod(shape[1:]) * item
            shape = (r1 - r0, *shape[1:])
        out = np.empty(shape, dtype=STORAGE[dtype])
        try:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                got = f.readinto(out.reshape(-1).view(np.uint8))
        except OSError as exc:
            raise read_error(self.path, exc, "a .safetensors file") from None
        if got != out.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r}: read {got} of its {out.nbytes} bytes: the file "
                                  "changed or was truncated while it was read")
        return out.astype(STORAGE[dtype].newbyteorder("="), copy=False)

    def get(self, name, copy=False):
        """The tensor as a NumPy array: BF16 and F16 -> float32 (exact), F32, F64, F8_E4M3 -> uint8 codes,
        U8, I8, I16, I32, I64, BOOL as stored. ``copy=True`` reads it into memory of its own (``read``) rather
        than viewing the memory-mapped file."""
        data = self.read(name) if copy else self.raw(name)
        dtype = self._entries[name][0]
        if dtype == "BF16":
            return bf16_to_float32(data)
        if dtype == "F16":
            return data.astype(np.float32)
        return data


def _parse_header(path, raw, data_size):
    """Header bytes -> (metadata, {name: (dtype, shape, (begin, end))}) with every field validated.

    The safetensors library's rules (``Metadata::validate`` and ``read_metadata``): the tensors, in order of
    their offsets, tile the data section exactly: the first starts at byte 0, each starts where the previous
    one ends (no gap, no overlap) and the last ends at the end of the file (no trailing bytes).
    """
    header = parse_json(raw, f"{path}: corrupt header", error=CheckpointError, max_bytes=MAX_HEADER_BYTES,
                        what="UTF-8 JSON")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header: a JSON {type(header).__name__}, expected an object "
                              "{name: {dtype, shape, data_offsets}}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: corrupt header: '__metadata__' must map strings to strings, got {metadata!r}"
                              [:400])
    entries = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    covered = None   # (name, begin, end) of the tensor ending furthest so far, in order of offsets
    for name, (_, _, (begin, end)) in sorted(entries.items(), key=lambda item: item[1][2]):
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] past the end of the "
                                  f"data section ({data_size} bytes): the file is truncated or its header corrupt")
        if covered is not None and begin < covered[2]:
            raise CheckpointError(f"{path}: corrupt header: tensors {covered[0]!r} (bytes {covered[1]}..{covered[2]})"
                                  f" and {name!r} (bytes {begin}..{end}) overlap")
        start = 0 if covered is None else covered[2]
        if begin != start:
            after = "the start of the data section" if covered is None else f"tensor {covered[0]!r}"
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} starts at data byte {begin}, leaving a "
                                  f"gap of {begin - start} bytes after {after} (byte {start}); the tensors must "
                                  "cover the data section without gaps, as the safetensors library requires")
        covered = (name, begin, end)
    end = 0 if covered is None else covered[2]
    if end != data_size:
        raise CheckpointError(f"{path}: corrupt file: {data_size - end} trailing bytes after the last tensor "
                              f"(the tensors cover {end} of the {data_size} data bytes); the safetensors library "
                              "refuses a file its tensors do not fully cover")
    return metadata, entries


def _parse_entry(path, name, entry):
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{where}: corrupt header entry {entry!r}: expected an object with 'dtype', 'shape' "
                              "and 'data_offsets'")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in STORAGE:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r}: this reader knows {sorted(STORAGE)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{where}: corrupt shape {shape!r}: expected a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: corrupt data_offsets {offsets!r}: expected [begin, end], integers >= 0")
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where}: corrupt data_offsets [{begin}, {end}]: begin is past end")
    expected = math.prod(shape) * STORAGE[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} "
                              f"of {dtype} needs {expected}")
    return dtype, tuple(shape), (begin, end)


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------------------------------- writing

def write_safetensors(path, tensors, metadata=None):
    """Write ``{name: (array, dtype_str)}`` as a safetensors file; return its path.

    Encodings: BF16 from float arrays by round-to-nearest-even (float32_to_bf16; float64 is first rounded to
    float32, so a value within 2^-24 relative of a bfloat16 tie may round twice), F16/F32/F64 by NumPy casts,
    F8_E4M3 and U8 from uint8 codes, I8/I16/I32/I64 from integers that fit, BOOL from bools. Every input is
    checked before anything is written, the file is written to a temporary name in the same folder and
    renamed into place (safe_write.atomic_file), so a failure never leaves a half-written file (nor replaces a
    good one). An existing file at ``path`` is replaced: this is the low-level writer; the commands check
    their destinations (safe_write.check_destination) before they call it.
    """
    path = Path(path)
    items = [check_item(path, name, value) for name, value in tensors.items()]
    layout = [(name, dtype, array.shape) for name, array, dtype in items]
    return write_safetensors_stream(path, layout, ((name, encode(array, dtype)) for name, array, dtype in items),
                                    metadata)


def write_safetensors_stream(path, layout, pieces, metadata=None, on_bytes=None):
    """Write a safetensors file whose data arrives a piece at a time; return its path.

    ``layout``  [(name, dtype_str, shape)] in file order: the header is written from it first (every size
                follows from a shape and a dtype), so nothing but the current piece is ever held;
    ``pieces``  (name, array) in layout order, each array already in the stored dtype (``encode``), a tensor's
                bytes in row-major order split into as many pieces as the producer likes;
    ``on_bytes`` called with the byte count of each piece once it is written (a progress bar).
    A piece out of order, of another dtype, or a tensor whose pieces do not add up to its shape raises
    CheckpointError naming the tensor, and nothing is left at ``path`` (the write is atomic, as above).
    """
    path = Path(path)
    text, sizes = _header(path, layout, metadata)
    with atomic_file(path, overwrite=True, what=str(path), error=CheckpointError) as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        k, written = 0, 0          # the tensor being written, and its bytes so far
        for name, piece in pieces:
            while k < len(layout) and name != layout[k][0] and written == sizes[k]:
                k, written = k + 1, 0
            if k == len(layout) or name != layout[k][0]:
                expected = "no more tensors" if k == len(layout) else f"tensor {layout[k][0]!r}"
                raise CheckpointError(f"{path}: got data for tensor {name!r} where the header has {expected}")
            dtype = STORAGE[layout[k][1]]
            piece = np.asarray(piece)
            if piece.dtype != dtype:
                raise CheckpointError(f"{path}: tensor {name!r}: a piece of dtype {piece.dtype}, expected the stored "
                                      f"{layout[k][1]} ({dtype})")
            written += piece.nbytes
            if written > sizes[k]:
                raise CheckpointError(f"{path}: tensor {name!r}: {written} bytes of data, more than the {sizes[k]} "
                                      f"its shape {list(layout[k][2])} holds")
            f.write(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
            if on_bytes is not None:
                on_bytes(piece.nbytes)
        while k < len(layout) and written == sizes[k]:
            k, written = k + 1, 0
        if k < len(layout):
            raise CheckpointError(f"{path}: tensor {layout[k][0]!r}: {written} bytes of data, expected {sizes[k]}")
    return path


def _header(path, layout, metadata):
    """-> (the JSON header padded to a multiple of 8 bytes, [data bytes of each tensor])."""
    header = {}
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise CheckpointError(f"{path}: metadata must map strings to strings, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    offset, sizes = 0, []
    for name, dtype, shape in layout:
        if not isinstance(name, str) or not name or name == "__metadata__" or name in header:
            raise CheckpointError(f"{path}: tensor name {name!r} is not allowed: expected a non-empty string, "
                                  "once per file")
        if dtype not in STORAGE:
            raise CheckpointError(f"{path}: tensor {name!r}: unknown safetensors dtype {dtype!r}: expected one of "
                                  f"{sorted(STORAGE)}")
        nbytes = math.prod(shape) * STORAGE[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8), sizes   # pad so the data section starts 8-byte aligned


def check_item(path, name, value):
    """Validate one (array, dtype_str) entry; return (name, array, dtype_str)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise CheckpointError(f"{path}: tensor name {name!r} is not allowed: expected a non-empty string")
    if not (isinstance(value, tuple) and len(value) == 2):
        raise CheckpointError(f"{where}: expected a pair (array, dtype string), got {type(value).__name__}")
    array, dtype = np.asarray(value[0]), value[1]
    if dtype not in STORAGE:
        raise CheckpointError(f"{where}: unknown safetensors dtype {dtype!r}: expected one of {sorted(STORAGE)}")
    kind = array.dtype.kind
    if dtype in FLOAT_TYPES and kind != "f":
        raise CheckpointError(f"{where}: {dtype} is written from a float array, got dtype {array.dtype}")
    if dtype in ("F8_E4M3", "U8") and array.dtype != np.uint8:
        raise CheckpointError(f"{where}: {dtype} is written from uint8 codes, got dtype {array.dtype}")
    if dtype == "BOOL" and kind != "b":
        raise CheckpointError(f"{where}: BOOL is written from a bool array, got dtype {array.dtype}")
    if dtype in INT_TYPES:
        if kind not in "iu":
            raise CheckpointError(f"{where}: {dtype} is written from an integer array, got dtype {array.dtype}")
        info = np.iinfo(STORAGE[dtype])
        if array.size and (int(array.min()) < info.min or int(array.max()) > info.max):
            raise CheckpointError(f"{where}: values [{int(array.min())}, {int(array.max())}] do not fit {dtype}")
    return name, array, dtype


def encode(array, dtype):  # [...] -> the stored dtype [...], C-contiguous, little-endian
    """An array as the safetensors ``dtype`` stores it (BF16: float32_to_bf16 bit patterns)."""
    if dtype == "BF16":
        return float32_to_bf16(array.astype(np.float32)).astype(STORAGE["BF16"])
    return np.ascontiguousarray(array.astype(STORAGE[dtype]))
