"""Shared helpers of tests/test_hostile_*.py: run the CLI, assert its one-line error, snapshot a directory.

The CLI runs in-process through ``cli.main`` (the function ``python -m nemo_scratch`` runs) with stdout and
stderr captured; ``run_subprocess`` runs the real thing where argv bytes or signals matter.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from nemo_scratch import cli
from nemo_scratch.checkpoint import random_tensors, write_checkpoint
from nemo_scratch.config import preset

TINY = preset("tiny")


class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err


def run_cli(capsys, *argv):
    """cli.main(argv) -> Result(exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Result(code, out, err)


def run_subprocess(*argv, env=None, timeout=300):
    """``python -m nemo_scratch argv`` (argv items may be bytes) -> Result."""
    args = [sys.executable, "-m", "nemo_scratch", *(a if isinstance(a, bytes) else str(a) for a in argv)]
    proc = subprocess.run(args, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


def assert_error(result, *fragments, status=2):
    """Exit ``status``, stderr exactly one line ``error: ...`` holding every fragment, no traceback."""
    lines = result.err.strip().splitlines()
    assert result.code == status, (result.code, result.out, result.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    # a fragment that is not itself a path must not match by accident inside a temporary path (whose names
    # carry the test's name), so it is looked for with those paths blanked out
    blanked = re.sub(r"{0}[^\s'\",)]*".format(re.escape(tempfile.gettempdir())), "<path>", lines[0])
    for fragment in map(str, fragments):
        assert fragment in (lines[0] if fragment.startswith(tempfile.gettempdir()) else blanked), (fragment, lines[0])
    return lines[0]


def snapshot(root):
    """{relative path: bytes (files) or ('link', target) (symlinks)} of everything under ``root``."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


def tiny_checkpoint(path, cfg=TINY, shards=1, seed=0, tensors=None, bytes_tokenizer=True, **write_options):
    """A random tiny checkpoint (optionally declaring the byte-level tokenizer) at ``path``."""
    write_checkpoint(path, cfg, random_tensors(cfg, seed) if tensors is None else tensors, shards=shards,
                     **write_options)
    if bytes_tokenizer:
        config = json.loads((Path(path) / "config.json").read_text())
        config["nemo_scratch_tokenizer"] = "bytes"
        (Path(path) / "config.json").write_text(json.dumps(config))
    return Path(path)


def edit_json(path, change):
    """Load the JSON file ``path``, apply ``change(value)`` (in place or returning a new value), write it back."""
    value = json.loads(Path(path).read_text())
    new = change(value)
    Path(path).write_text(json.dumps(value if new is None else new))
