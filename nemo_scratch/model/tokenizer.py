"""Tokenizers: the checkpoint's tokenizer.json (via the ``tokenizers`` package), or plain bytes.

A checkpoint declares the byte-level tokenizer with ``"nemo_scratch_tokenizer": "bytes"`` in config.json:
token id = byte value (vocab_size 256), text is UTF-8. A tokenizer.json symlink must resolve inside the
checkpoint directory (as index entries must), and text that is not valid Unicode (lone surrogates: what
Python makes of non-UTF-8 command-line bytes) is refused with an InputError naming the position.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def check_text(text, what="prompt") -> str:
    """``text`` as a str that encodes to UTF-8; InputError naming the first bad character otherwise."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start].encode("utf-8", "surrogateescape") if "\udc80" <= text[exc.start] <= "\udcff" else b""
        byte = f" (byte 0x{raw[0]:02x})" if raw else ""
        raise InputError(f"{what} is not valid UTF-8 text: character {exc.start}{byte} cannot be encoded; "
                         "pass UTF-8 text, or token ids") from None
    return text


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    def encode(self, text: str) -> list[int]:
        return list(check_text(text).encode("utf-8"))

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
        return self._tok.encode(check_text(text)).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(directory, cfg):
    """The checkpoint's tokenizer, or None when it has neither tokenizer.json nor a byte-level declaration."""
    path = Path(directory) / "tokenizer.json" if directory is not None else None
    if path is not None and (path.is_file() or path.is_symlink()):
        from ..checkpoint.paths import resolve_inside

        return HFTokenizer(resolve_inside(Path(directory), "tokenizer.json", str(path)))
    if cfg.extra.get("nemo_scratch_tokenizer") == "bytes":
        return ByteTokenizer()
    return None
