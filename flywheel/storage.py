"""Crash-safe file writes: readers see the old file or the new one, never half of either, and what a pointer names
is on disk before the pointer is."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (the names of files created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, up_to: Path | None = None) -> None:
    """Flush every file and directory under ``root`` to disk, then the directories from ``root``'s parent up to
    ``up_to`` (inclusive), so that after a power loss the whole tree is still reachable by its path."""
    for directory, _subdirectories, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(directory))
    if up_to is None:
        return
    if up_to not in root.parents:
        raise ValueError(f"{up_to} does not contain {root}")
    for parent in root.parents:
        fsync_directory(parent)
        if parent == up_to:
            break


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary sibling of ``path``, fsync it, rename it over ``path``, then fsync the directory
    (without that last step a power loss can bring back the old file, or no file, after the rename returned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically and durably replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its directory) across processes until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
