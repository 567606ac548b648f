"""Writes that cannot lose data: the one mechanism every nemo_scratch writer goes through.

    with atomic_directory(dst, overwrite=False, sources=[src]) as tmp:   # a checkpoint: many files
        write_safetensors(tmp / "model.safetensors", ...)                # (stream as many as you like)
    with atomic_file(dst, overwrite=False, sources=[ckpt]) as f:        # one file (.npy, golden)
        f.write(data)

Rules, checked before a byte is written (``check_destination``):
- paths are resolved (symlinks included) and the destination may not be a source, lie inside one or
  contain one; nor the filesystem root, the home directory or a directory holding the working directory;
- an existing non-empty destination is refused unless ``overwrite=True`` (CLI ``--overwrite``); with it,
  the destination is replaced as a whole: every file of the old directory goes (no stale shard, index or
  TRAINING.md survives to describe weights that no longer exist);
- a directory's missing parents are created (and removed again on failure); a file's must exist.

Atomicity: everything is written into a temporary sibling ``.<name>.partial-<pid>-<random>`` (holding the
marker file ``.nemo-scratch-incomplete`` until it is complete, which open_checkpoint refuses), and only
then moved into place: a rename when the destination is absent or empty, else an atomic exchange of the
two directories (Linux renameat2 RENAME_EXCHANGE; elsewhere two renames, the first undone if the second
fails), after which the old tree is deleted. Interrupted at any point (an exception, Ctrl-C, SIGTERM in the
CLI), the destination holds either the old files, byte for byte, or the new ones, complete; the temporary
is removed on the way out, and one left by a killed process (its pid no longer alive) is removed by the
next write to the same destination.

Every byte goes through ``write_bytes`` and every rename through ``rename`` / ``exchange``: the tests
interrupt the writers at each of these calls in turn.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

MARKER = ".nemo-scratch-incomplete"
OVERWRITE_HINT = "pass --overwrite (overwrite=True from Python) to replace it and everything in it"
_STALE = re.compile(r"\.(?P<name>.+)\.(?:partial|replaced)-(?P<pid>\d+)-[0-9a-f]+(?:\.tmp)?")


# ---------------------------------------------------------------------------------------------- low level

def write_bytes(f, data) -> None:
    """The one low-level write of every writer (tests make it raise at the k-th call)."""
    f.write(data)


def rename(src, dst) -> None:
    """The one low-level rename (os.replace: atomic on one filesystem)."""
    os.replace(src, dst)


def exchange(a, b) -> None:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    fn = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if fn is None:
        raise OSError(38, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- checks

def resolved(path) -> Path:
    """The absolute path with every symlink followed (also for a path that does not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_destination(dst, overwrite=False, sources=(), what="destination", kind="directory", error=InputError):
    """Refuse a destination that would lose data (see the module docstring); -> its resolved path."""
    if not isinstance(dst, (str, os.PathLike)) or "\0" in os.fspath(dst) or not os.fspath(dst):
        raise error(f"{what}: {dst!r} is not a usable path")
    if isinstance(sources, (str, os.PathLike)):
        raise error(f"{what}: sources must be a list of paths, got {sources!r}")
    if not isinstance(overwrite, bool):
        raise error(f"{what}: overwrite={overwrite!r}; expected True or False")
    final = resolved(dst)
    shown = f"{dst}" + (f" (= {final})" if str(final) != os.path.abspath(os.fspath(dst)) else "")
    if kind == "directory" and final.exists() and not final.is_dir():
        raise error(f"{what}: {shown} exists and is not a directory")
    if kind == "file" and final.is_dir():
        raise error(f"{what}: {shown} is a directory, expected a file path")
    for src in sources:
        source = resolved(src)
        if final == source:
            raise error(f"{what}: {shown} is the source {src} itself; write to another path")
        if source in final.parents:
            raise error(f"{what}: {shown} lies inside the source {src}; write outside it")
        if final in source.parents:
            raise error(f"{what}: {shown} contains the source {src}; replacing it would delete the source")
    cwd = resolved(os.getcwd())
    if final == Path(final.anchor) or final == resolved("~") or (kind == "directory" and final in (cwd, *cwd.parents)):
        raise error(f"{what}: {shown} is the filesystem root, the home directory or holds the working "
                    "directory; refusing to write a checkpoint over it")
    if kind == "directory":
        if final.is_dir():
            try:
                entries = sorted(p.name for p in final.iterdir())
            except OSError as exc:
                raise error(f"{what}: cannot list {shown} ({exc.strerror})") from None
            if entries and not overwrite:
                listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                raise error(f"{what}: {shown} is not empty ({len(entries)} entries: {listed}); {OVERWRITE_HINT}")
    else:
        if not final.parent.is_dir():
            raise error(f"{what}: cannot write {shown}: its folder {final.parent} does not exist")
        if final.exists() and not overwrite:
            raise error(f"{what}: {shown} already exists; {OVERWRITE_HINT.replace(' and everything in it', '')}")
    return final


def clean_stale(final: Path) -> None:
    """Remove temporaries that a killed writer left next to ``final`` (their pid is no longer alive)."""
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        m = _STALE.fullmatch(path.name)
        if m is None or m["name"] != final.name or _alive(int(m["pid"])):
            continue
        _remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _temp_name(final: Path, tag: str, suffix: str = "") -> Path:
    return final.parent / f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _make_parents(parent: Path, what: str, error) -> list:
    """mkdir -p ``parent``; -> the folders it created (deepest last), to remove again on failure."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_empty(missing)
            raise error(f"{what}: cannot create the folder {p} ({exc.strerror})") from None
    return missing


def _remove_empty(folders) -> None:
    for p in reversed(list(folders)):
        try:
            p.rmdir()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------- writers

@contextmanager
def atomic_directory(dst, overwrite=False, sources=(), what="write_checkpoint: out_dir", error=InputError):
    """Yield an empty temporary directory; on success it becomes ``dst`` (see the module docstring)."""
    final = check_destination(dst, overwrite, sources, what, "directory", error)
    created = _make_parents(final.parent, what, error)
    clean_stale(final)
    tmp = _temp_name(final, "partial")
    try:
        tmp.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise error(f"{what}: cannot write in {final.parent} ({exc.strerror})") from None
    try:
        with open(tmp / MARKER, "wb") as f:
            write_bytes(f, b"an interrupted nemo_scratch write; safe to delete\n")
        yield tmp
        check_destination(dst, overwrite, sources, what, "directory", error)   # still true after the writing?
        _fsync_dir(tmp)
        (tmp / MARKER).unlink()
        _commit(tmp, final)
    except OSError as exc:   # e.g. the disk filled up: the old directory is intact, the temporary goes
        _remove(tmp)
        _remove_empty(created)
        raise error(f"{what}: cannot write {final} ({exc.strerror or exc}); nothing was changed there") from None
    except BaseException:
        _remove(tmp)
        _remove_empty(created)
        raise


def _commit(tmp: Path, final: Path) -> None:
    """Move the complete ``tmp`` to ``final``; an existing non-empty ``final`` goes only once tmp is there."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        rename(tmp, final)
        _fsync_dir(final.parent)
        return
    try:
        exchange(tmp, final)              # atomic: final is new, tmp holds the old tree
        old = tmp
    except OSError:
        old = _temp_name(final, "replaced")
        rename(final, old)
        try:
            rename(tmp, final)
        except BaseException:
            rename(old, final)            # put the old directory back before giving up
            raise
    _fsync_dir(final.parent)
    _remove(old)


class _Writer:
    """The binary file ``atomic_file`` yields: ``write`` goes through write_bytes."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        write_bytes(self._f, data)
        return memoryview(data).nbytes

    def flush(self):
        self._f.flush()


@contextmanager
def atomic_file(dst, overwrite=False, sources=(), what="output", error=InputError):
    """Yield a binary file object; on success its bytes become the file ``dst``, atomically."""
    final = check_destination(dst, overwrite, sources, what, "file", error)
    clean_stale(final)
    tmp = _temp_name(final, "partial", ".tmp")
    try:
        f = open(tmp, "xb")
    except OSError as exc:
        raise error(f"{what}: cannot write in {final.parent} ({exc.strerror})") from None
    try:
        with f:
            yield _Writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        rename(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise error(f"{what}: cannot write {final} ({exc.strerror or exc}); nothing was changed there") from None
    except BaseException:
        _remove(tmp)
        raise


def copy_file(src, dst_file) -> None:
    """Copy the bytes of ``src`` into an open atomic_file writer, 1 MiB at a time."""
    with open(src, "rb") as f:
        while chunk := f.read(2**20):
            dst_file.write(chunk)
