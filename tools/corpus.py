"""The tiny model's training corpus: docstrings and comments of CPython's standard library.

Licence: the Python standard library is under the PSF License Agreement (version 2), which permits derivative
works, so a model trained on its text may be redistributed (TRAINING.md records the exact Python version).

Extraction is deterministic for one interpreter: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
in sorted relative-path order (no ``site-packages``, no test suites), module/class/function docstrings via
``ast`` and ``#`` comment runs via ``tokenize``, normalised to ASCII, one paragraph per entry separated by a
blank line, cut at ``max_bytes``. Token id = byte value (vocab_size 256).

    python tools/corpus.py --max-mb 4 --out /tmp/stdlib_corpus.txt   # prints size and sha256
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import re
import sys
import sysconfig
import tokenize
import unicodedata
from pathlib import Path

# Directories whose text is not prose about the library (test data, vendored packages, generated tables).
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__", "encodings", "ensurepip"}
MIN_CHARS = 24  # shorter docstrings / comment runs ("XXX", "noqa") carry no language to learn


def to_ascii(text: str) -> str:
    """NFKD-decompose, drop what is not ASCII, keep only printable characters, newlines and spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = text.replace("\t", "    ").replace("\r", "")
    return "".join(ch for ch in text if ch == "\n" or " " <= ch <= "~")


def docstrings(tree: ast.AST) -> list[str]:
    """Module, class and function docstrings, in source order, dedented (inspect.cleandoc)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append((getattr(node, "lineno", 0), doc))
    return [doc for _, doc in sorted(out, key=lambda item: item[0])]


def comment_runs(source: str) -> list[str]:
    """Consecutive ``#`` comment lines joined into one paragraph (shebang, coding and rule lines dropped)."""
    runs, current, last_row = [], [], -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        row = tok.start[0]
        if row != last_row + 1 and current:
            runs.append(" ".join(current))
            current = []
        last_row = row
        if text.startswith("!") or "coding" in text[:20] or not re.search(r"[A-Za-z]{2}", text):
            continue
        current.append(text)
    if current:
        runs.append(" ".join(current))
    return runs


def stdlib_files(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root`` outside SKIP_DIRS, sorted by relative path (deterministic)."""
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_corpus(max_bytes: int = 4_000_000, root: str | None = None) -> bytes:
    """The corpus as ASCII bytes (<= max_bytes), paragraphs separated by a blank line."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            paragraphs = docstrings(ast.parse(source)) + comment_runs(source)
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue  # a few stdlib files are deliberately invalid (bad_coding.py etc.)
        for para in paragraphs:
            para = to_ascii(para).strip()
            if len(para) < MIN_CHARS:
                continue
            chunk = para + "\n\n"
            if total + len(chunk) > max_bytes:
                return "".join(parts).encode("ascii")
            parts.append(chunk)
            total += len(chunk)
    return "".join(parts).encode("ascii")


def describe(data: bytes) -> dict:
    """What TRAINING.md records about the corpus."""
    return {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"], "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=4.0, help="size cap in MB (10^6 bytes)")
    parser.add_argument("--out", type=Path, default=None, help="write the corpus here")
    args = parser.parse_args(argv)
    data = build_corpus(int(args.max_mb * 1_000_000))
    if args.out:
        args.out.write_bytes(data)
    print(describe(data))


if __name__ == "__main__":
    main()
