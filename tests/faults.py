"""Real faults for tests: a small filesystem that fills up, and filling it."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(path: Path, size_kib: int = 512) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` KiB mounted on ``path`` (created), unmounted on exit; skips the test without root."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], check=False, capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small filesystem, and mounting a tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file in ``directory`` until its filesystem has no space left; returns it (delete it to free)."""
    ballast = directory / "ballast"
    chunk = b"\0" * 4096
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    # A few bytes may still fit after the last whole chunk: take them too.
    with contextlib.suppress(OSError), open(ballast, "ab", buffering=0) as handle:
        while handle.write(b"\0"):
            pass
    return ballast
