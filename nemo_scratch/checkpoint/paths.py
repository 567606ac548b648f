"""File names inside a checkpoint directory: no path traversal, no odd index entries.

Every file a checkpoint names (index entries, config.json, hf_quant_config.json, tokenizer.json, the
*.safetensors found by globbing) is opened through ``resolve_inside``: absolute names, ``..`` and symlinks
leading out of the directory are refused, with one exception, the Hugging Face hub cache, whose snapshot
files are symlinks into the same repository's ``blobs`` folder. Index entries must moreover be plain file
names (``check_file_name``).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import CheckpointError

MAX_FILE_NAME = 255   # bytes of one index entry (the usual filesystem limit of a file name)


def check_file_name(file_name, what: str) -> str:
    """An index entry must be a plain file name: a string of 1..255 bytes, no NUL, no '/' or '\\', not '..'."""
    if not isinstance(file_name, str) or not file_name:
        raise CheckpointError(f"{what}: file name {str(file_name)[:100]!r} is not a non-empty string")
    if "\0" in file_name:
        raise CheckpointError(f"{what}: file name {file_name[:100]!r} holds a NUL byte")
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(file_name).drive:
        raise CheckpointError(f"{what}: file {file_name[:200]!r} is an absolute path; expected a file name inside "
                              f"the checkpoint directory")
    if ".." in posix.parts:
        raise CheckpointError(f"{what}: file {file_name[:200]!r} climbs out with '..'; expected a file name inside "
                              f"the checkpoint directory")
    if "/" in file_name or "\\" in file_name or file_name == ".":
        raise CheckpointError(f"{what}: file {file_name[:200]!r} holds a path separator; expected a plain file "
                              "name in the checkpoint directory")
    if len(file_name.encode("utf-8", "surrogateescape")) > MAX_FILE_NAME:
        raise CheckpointError(f"{what}: file name of {len(file_name)} characters is longer than the "
                              f"{MAX_FILE_NAME}-byte limit of a file name ({file_name[:60]!r}...)")
    return file_name


def resolve_inside(directory: Path, relative, what: str, error=CheckpointError) -> Path:
    """``directory / relative``, refusing path traversal: absolute names, ``..``, and symlinks leading out of
    the directory (except Hugging Face hub-cache snapshots, whose files link into the repo's ``blobs``)."""
    if not isinstance(relative, str) or not relative:
        raise error(f"{what}: file name {relative!r} is not a non-empty string")
    if "\0" in relative:
        raise error(f"{what}: file name {relative[:100]!r} holds a NUL byte")
    posix = PurePosixPath(relative.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(relative).drive or os.path.isabs(relative):
        raise error(f"{what}: file {relative!r} is an absolute path; expected a file name inside "
                    f"the checkpoint directory {directory}")
    if ".." in posix.parts:
        raise error(f"{what}: file {relative!r} climbs out with '..'; expected a file name inside "
                    f"the checkpoint directory {directory}")
    path = directory.joinpath(*posix.parts)
    try:
        root, target = directory.resolve(), path.resolve()
    except (OSError, RuntimeError) as exc:   # a symlink loop
        raise error(f"{what}: file {path} cannot be resolved ({exc})") from None
    if root not in target.parents and not _hub_cache_blob(root, target):
        raise error(f"{what}: file {relative!r} resolves to {target}, outside the checkpoint "
                    f"directory {root} (a symlink leading out of it); refused")
    if target.is_dir():
        raise error(f"{what}: {path} is a directory, expected a file")
    if not target.is_file():
        raise error(f"{what}: file {path} not found")
    return path


def _hub_cache_blob(root: Path, target: Path) -> bool:
    # <cache>/models--org--name/snapshots/<revision>/model.safetensors -> ../../blobs/<sha256>
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"
