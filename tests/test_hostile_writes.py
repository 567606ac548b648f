"""Hostile inputs, class 1: writes that cannot lose data (checkpoint/safe_write.py).

Every writer (quantize, make-random, forward --out, golden --out, write_checkpoint) refuses a destination that
is its source (also through a symlink), lies inside it or contains it, and a non-empty one without
--overwrite; with it the old directory is replaced as a whole, only once the new one is complete. Interrupted
at every low-level write and rename in turn (and by a real SIGTERM / SIGINT / SIGKILL), the destination holds
the old checkpoint byte for byte, or nothing that loads, and no temporary is left behind (or the next write
removes it). Each case checks the exit status, the one error line and what it names, and the source bytes.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hostile_helpers import TINY, assert_error, run_cli, snapshot, tiny_checkpoint

from nemo_scratch.checkpoint import load_tensors, make_random_checkpoint, random_tensors, safe_write, write_checkpoint
from nemo_scratch.checkpoint.convert import quantize_checkpoint
from nemo_scratch.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A pristine tiny checkpoint (2 shards, with a TRAINING.md) and its bytes."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", shards=2)
    (path / "TRAINING.md").write_text("how these weights were made\n")
    return path, snapshot(path)


@pytest.fixture
def ckpt(source, tmp_path):
    """A fresh copy of the source checkpoint in this test's folder."""
    path = tmp_path / "ckpt"
    shutil.copytree(source[0], path, symlinks=True)
    return path


# ---------------------------------------------------------------------------------------------- destinations

@pytest.mark.parametrize("dst, fragment", [("ckpt", "is the source"), ("link", "is the source"),
                                           ("ckpt/sub", "lies inside the source"), (".", "contains the source")])
def test_quantize_refuses_its_own_source(ckpt, capsys, dst, fragment):
    os.symlink("ckpt", ckpt.parent / "link")
    before = snapshot(ckpt)
    target = ckpt.parent / dst
    line = assert_error(run_cli(capsys, "quantize", ckpt, target, "--overwrite"), "quantize: destination", fragment)
    assert str(ckpt) in line
    assert snapshot(ckpt) == before and not (ckpt / "sub").exists()


def test_symlinked_destination_equal_to_source_through_a_chain(ckpt, capsys):
    os.symlink(ckpt, ckpt.parent / "one")
    os.symlink(ckpt.parent / "one", ckpt.parent / "two")
    before = snapshot(ckpt)
    assert_error(run_cli(capsys, "quantize", ckpt.parent / "two", ckpt, "--overwrite"), "is the source")
    assert snapshot(ckpt) == before
    with pytest.raises(InputError, match="is the source"):     # the API raises the same error
        quantize_checkpoint(ckpt, ckpt.parent / "two", overwrite=True)
    assert snapshot(ckpt) == before


@pytest.mark.parametrize("command", ["make-random", "quantize"])
def test_non_empty_destination_needs_overwrite(ckpt, tmp_path, capsys, command):
    other = tiny_checkpoint(tmp_path / "other", seed=5)
    before, theirs = snapshot(ckpt), snapshot(other)
    argv = ["make-random", other] if command == "make-random" else ["quantize", ckpt, other]
    assert_error(run_cli(capsys, *argv), str(other), "is not empty", "--overwrite", "config.json")
    assert snapshot(other) == theirs and snapshot(ckpt) == before
    assert run_cli(capsys, *argv, "--overwrite").code == 0
    assert snapshot(ckpt) == before and load_tensors(other)[1].keys()


def test_overwrite_replaces_the_whole_directory(ckpt, capsys):
    """make-random over a checkpoint with a TRAINING.md: nothing stale survives."""
    assert (ckpt / "TRAINING.md").exists()
    assert run_cli(capsys, "make-random", ckpt, "--overwrite", "--seed", 3).code == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]
    np.testing.assert_array_equal(load_tensors(ckpt)[1]["lm_head.weight"], random_tensors(TINY, 3)["lm_head.weight"])


def test_foreign_non_empty_directory_is_refused(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_error(run_cli(capsys, "make-random", mine), str(mine), "notes.txt", "--overwrite")
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="overwrite=True"):
        write_checkpoint(mine, TINY, {})
    assert (mine / "notes.txt").read_text() == "keep me"


def test_destination_that_is_a_file_or_holds_the_working_directory(tmp_path, capsys, monkeypatch):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    assert_error(run_cli(capsys, "make-random", f, "--overwrite"), str(f), "is not a directory")
    assert f.read_text() == "x"
    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    (work / "inner" / "data.txt").write_text("y")
    monkeypatch.chdir(work / "inner")
    assert_error(run_cli(capsys, "make-random", work, "--overwrite"), "working directory")
    assert (work / "inner" / "data.txt").read_text() == "y"


def test_forward_out_file_rules(ckpt, tmp_path, capsys):
    before = snapshot(ckpt)
    out = tmp_path / "logits.npy"
    assert run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1,2", "--out", out).code == 0
    first = out.read_bytes()
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "3", "--out", out), str(out),
                 "already exists", "--overwrite")
    assert out.read_bytes() == first
    assert run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "3", "--out", out, "--overwrite").code == 0
    assert np.load(out).shape == (1, 1, 256)
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1", "--out", ckpt / "x.npy"),
                 "lies inside the source")
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1", "--out", tmp_path / "no" / "x.npy"),
                 "does not exist", str(tmp_path / "no"))
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1", "--out", tmp_path), "is a directory")
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1", "--overwrite"), "--overwrite needs --out")
    assert snapshot(ckpt) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "logits.npy"]


def test_golden_out_file_rules(tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    assert run_cli(capsys, "golden", "--op", "rms_norm", "--out", out).code == 0
    first = out.read_bytes()
    assert_error(run_cli(capsys, "golden", "--op", "ssd_step", "--out", out), "golden: --out", "already exists")
    assert out.read_bytes() == first
    assert run_cli(capsys, "golden", "--op", "ssd_step", "--out", out, "--overwrite").code == 0
    assert out.read_bytes() != first
    assert_error(run_cli(capsys, "golden", "--op", "rms_norm", "--out", tmp_path), "is a directory")
    assert_error(run_cli(capsys, "golden", "--op", "rms_norm", "--out", tmp_path / "x" / "g"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]


def test_disk_full_is_one_line_and_changes_nothing(ckpt, capsys, monkeypatch):
    before = snapshot(ckpt)
    monkeypatch.setattr("nemo_scratch.memory.free_disk_bytes", lambda path: 1000)
    assert_error(run_cli(capsys, "make-random", ckpt, "--overwrite"), "needs about", "on disk", "only 0.0 MiB is free")
    monkeypatch.undo()

    def full(f, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safe_write, "write_bytes", full)
    assert_error(run_cli(capsys, "make-random", ckpt, "--overwrite"), str(ckpt), "No space left on device",
                 "nothing was changed")
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", 1, "--out", ckpt.parent / "l.npy"),
                 "No space left on device")
    assert snapshot(ckpt) == before and sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------------------------- interruptions

class Interrupt:
    """Patch safe_write's write_bytes / rename / exchange to count calls and raise at call number ``at``."""

    def __init__(self, monkeypatch, at=None, exchange=True):
        self.at, self.calls = at, []
        for name in ("write_bytes", "rename", "exchange"):
            real = getattr(safe_write, name)
            monkeypatch.setattr(safe_write, name, self._wrap(name, real, exchange or name != "exchange"))

    def _wrap(self, name, real, works):
        def call(*args):
            self.calls.append(name)
            if len(self.calls) == self.at:
                raise KeyboardInterrupt(f"interrupted at {name} #{len(self.calls)}")
            if not works:
                raise OSError(38, "renameat2 is not available")   # the two-rename fallback
            return real(*args)
        return call


def _every_interrupt(monkeypatch, write, exchange=True):
    """Count the low-level calls of ``write()``, then interrupt it at each of them in turn: -> [call names]."""
    with monkeypatch.context() as m:
        counter = Interrupt(m, exchange=exchange)
        write(prepare=True)
    for k in range(1, len(counter.calls) + 1):
        with monkeypatch.context() as m:
            Interrupt(m, at=k, exchange=exchange)
            with pytest.raises(KeyboardInterrupt):
                write(prepare=False, k=k)
    return counter.calls


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_interrupted_overwrite_leaves_the_old_checkpoint(source, tmp_path, monkeypatch, exchange):
    dst = tmp_path / "dst"
    old = snapshot(source[0])

    def write(prepare, k=None):
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(source[0], dst)
        try:
            make_random_checkpoint(dst, TINY, seed=9, shards=3, overwrite=True)
        finally:
            if k is not None:   # after an interruption: the old checkpoint, byte for byte, nothing else
                assert snapshot(dst) == old, f"interrupted at call {k}"
                assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"], f"temporaries left at call {k}"

    calls = _every_interrupt(monkeypatch, write, exchange)
    assert calls.count("write_bytes") > 10 and "rename" in calls
    assert calls[-1] == ("exchange" if exchange else "rename")
    assert load_tensors(dst)[1].keys() == load_tensors(source[0])[1].keys()


def test_interrupted_fresh_write_leaves_nothing(tmp_path, monkeypatch):
    dst = tmp_path / "new" / "deeper" / "dst"

    def write(prepare, k=None):
        if dst.exists():
            shutil.rmtree(tmp_path / "new")
        try:
            make_random_checkpoint(dst, TINY, shards=2)
        finally:
            if k is not None:
                assert list(tmp_path.iterdir()) == [], f"interrupted at call {k}: {list(tmp_path.rglob('*'))}"

    calls = _every_interrupt(monkeypatch, write)
    assert calls[-1] == "rename"                                # a rename, the destination being new


def test_interrupted_quantize_leaves_source_and_old_destination(source, tmp_path, monkeypatch):
    pristine = tiny_checkpoint(tmp_path / "pristine", seed=4)
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "q"
    old_dst, old_src = snapshot(pristine), snapshot(source[0])

    def write(prepare, k=None):
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(pristine, dst)
        try:
            quantize_checkpoint(source[0], dst, "nano", overwrite=True)
        finally:
            assert snapshot(source[0]) == old_src
            if k is not None:
                assert snapshot(dst) == old_dst, f"interrupted at call {k}"
                assert sorted(p.name for p in work.iterdir()) == ["q"]
        # the uninterrupted (counting) run wrote the quantized checkpoint
        assert load_tensors(dst)[2]["formats"]["backbone.layers.4.mixer.in_proj.weight"] == "nvfp4"

    assert _every_interrupt(monkeypatch, write)[-1] == "exchange"


def _wait_for_partial(parent, name, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(f".{name}.partial-") for p in parent.iterdir()):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_real_signal_during_make_random(source, tmp_path, signum, status):
    """A real `nemo-scratch make-random --overwrite` killed while it writes: the old checkpoint stays."""
    dst = tmp_path / "dst"
    shutil.copytree(source[0], dst)
    old = snapshot(dst)
    proc = subprocess.Popen([sys.executable, "-m", "nemo_scratch", "make-random", "--preset", "small", str(dst),
                             "--shards", "8", "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait_for_partial(tmp_path, "dst", proc), proc.communicate()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == status and len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert snapshot(dst) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_sigkill_leaves_a_partial_that_never_loads_and_is_cleaned(source, tmp_path, capsys):
    dst = tmp_path / "dst"
    shutil.copytree(source[0], dst)
    old = snapshot(dst)
    proc = subprocess.Popen([sys.executable, "-m", "nemo_scratch", "make-random", "--preset", "small", str(dst),
                             "--shards", "8", "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait_for_partial(tmp_path, "dst", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert snapshot(dst) == old
    (partial,) = [p for p in tmp_path.iterdir() if p.name != "dst"]
    assert (partial / safe_write.MARKER).exists()
    with pytest.raises(CheckpointError, match="interrupted write"):
        load_tensors(partial)
    assert_error(run_cli(capsys, "inspect", partial), str(partial), "incomplete")
    assert run_cli(capsys, "make-random", dst, "--overwrite").code == 0   # the next write removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
