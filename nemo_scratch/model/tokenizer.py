"""Tokenizers: the checkpoint's tokenizer.json (via the ``tokenizers`` package), or plain bytes.

A checkpoint declares the byte-level tokenizer with ``"nemo_scratch_tokenizer": "bytes"`` in config.json:
token id = byte value (vocab_size 256), text is UTF-8.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json read by the ``tokenizers`` package."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InputError(f"{path}: reading tokenizer.json needs the 'tokenizers' package") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the package raises its own exception types
            raise InputError(f"{path}: not a valid tokenizer.json ({exc})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(directory, cfg):
    """The checkpoint's tokenizer, or None when it has neither tokenizer.json nor a byte-level declaration."""
    path = Path(directory) / "tokenizer.json" if directory is not None else None
    if path is not None and path.is_file():
        return HFTokenizer(path)
    if cfg.extra.get("nemo_scratch_tokenizer") == "bytes":
        return ByteTokenizer()
    return None
