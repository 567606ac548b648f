"""tools/gpu_check.sh, the one prepared command a GPU session runs: it lists its steps, refuses nothing on a
machine without a GPU, and every step it names exists (test files, bench scripts and their flags)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import gpu_harness
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def steps():
    """[(name, limit, argv)] parsed from the STEPS array of the script."""
    text = SCRIPT.read_text()
    body = re.search(r"^STEPS=\(\n(.*?)^\)", text, flags=re.M | re.S).group(1)
    out = []
    for line in re.findall(r'^\s*"([^"]+)"', body, flags=re.M):
        name, limit, cmd = line.split("|", 2)
        out.append((name, int(limit), shlex.split(cmd.replace("$PY", "python"))))
    return out


def test_dry_run_lists_every_step():
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name, limit, _ in steps():
        assert re.search(rf"^\s+{name}\s+{limit}s\s", proc.stdout, flags=re.M), name


def test_the_steps_fit_the_device_budget():
    """Under 8 minutes on one H200 even when every step runs to its limit."""
    assert sum(limit for _, limit, _ in steps()) + 10 * len(steps()) <= 8 * 60


def test_every_named_file_exists_and_every_flag_parses():
    for name, _, argv in steps():
        files = [a for a in argv if a.endswith(".py")]
        assert files, name
        for f in files:
            assert (ROOT / f).is_file(), f"step {name} names {f}, which does not exist"
        if argv[1:2] == ["-m"]:
            continue
        # the bench scripts parse their flags before they look for a GPU: an unknown flag is argparse's exit 2
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert "unrecognized arguments" not in proc.stderr and "invalid" not in proc.stderr, (name, proc.stderr)


@pytest.mark.skipif(gpu_harness.gpu_available(), reason="a CUDA GPU is present: the script would run every step")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --frobnicate" in proc.stderr
