"""JSON read with bounds: a size limit before parsing, a nesting limit during it, one error class after.

Every JSON file nemo_scratch reads (config.json, model.safetensors.index.json, hf_quant_config.json, a
safetensors header, the JSON strings of golden metadata) goes through ``parse_json``/``read_json``, so a
hostile file ends in one ``nemo_scratch.errors`` exception naming the file, never in a RecursionError,
a MemoryError or a ValueError from an integer with a hundred thousand digits.

Rules (the safetensors library's where it has one):
- size: at most ``max_bytes`` (config 16 MiB, index and quant config 64 MiB, safetensors header 100 MB);
- depth: at most ``MAX_DEPTH`` nested arrays/objects (serde_json, which safetensors uses, stops at 128;
  the deepest legitimate file here nests 4 levels);
- text: UTF-8; integers of at most 4300 digits (Python's own default limit, turned into an error here);
- keys: no key twice in one object (json.loads would silently keep the last one).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError

MAX_DEPTH = 64
CONFIG_BYTES = 16 * 2**20
INDEX_BYTES = 64 * 2**20


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def depth_of(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, [] is 1), iteratively: no recursion to exhaust."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in item if isinstance(child, (list, dict)))
    return deepest


def parse_json(text, where: str, error=CheckpointError, max_bytes: int = CONFIG_BYTES, what: str = "JSON"):
    """``text`` (str or UTF-8 bytes) -> the JSON value; ``error(f"{where}: ...")`` on anything malformed."""
    if len(text) > max_bytes:
        raise error(f"{where}: {what} of {len(text)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not valid {what} (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid {what} ({exc})") from None
    except _DuplicateKey as exc:
        raise error(f"{where}: key {exc.args[0]!r} appears twice in one JSON object") from None
    except RecursionError:
        raise error(f"{where}: {what} nested too deeply (limit {MAX_DEPTH} levels)") from None
    except ValueError as exc:   # e.g. an integer literal past Python's 4300-digit limit
        raise error(f"{where}: not valid {what} ({exc})") from None
    if depth_of(value) > MAX_DEPTH:
        raise error(f"{where}: {what} nested {depth_of(value)} levels deep, more than the limit of {MAX_DEPTH}")
    return value


def read_json(path, error=CheckpointError, max_bytes: int = CONFIG_BYTES, expect=dict):
    """The JSON value of the file ``path`` (an object unless ``expect`` says otherwise); errors name the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: file of {size} bytes exceeds the limit of {max_bytes} bytes for a JSON file")
        raw = path.read_bytes()
    except OSError as exc:
        raise read_error(path, exc, "a JSON file", error) from None
    value = parse_json(raw, str(path), error=error, max_bytes=max_bytes)
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {_kind(expect)}, got a {type(value).__name__}")
    return value


def read_error(path, exc: OSError, expected: str, error=CheckpointError):
    """The nemo_scratch error for an OSError met reading ``path`` (missing, a directory, unreadable)."""
    if isinstance(exc, FileNotFoundError):
        return error(f"{path}: file not found")
    if isinstance(exc, IsADirectoryError):
        return error(f"{path}: is a directory, expected {expected}")
    return error(f"{path}: cannot read ({exc.strerror or exc})")


def _kind(expect) -> str:
    return {dict: "object", list: "array"}.get(expect, getattr(expect, "__name__", str(expect)))


def brief(value, limit: int = 120) -> str:
    """repr(value), cut to ``limit`` characters: a hostile value cannot make an error message huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
