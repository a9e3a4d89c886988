"""Crash-safe file writes shared by every model writer (trainers and the device installer).

A model directory must appear whole or not at all: a power cut between two
files must never leave a half-written model that a loader later trusts.  So
files are written into a temporary sibling, fsynced with their directory, and
renamed into place; the parent is fsynced so the rename itself survives.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Mapping


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never overwrite, never follow a symlink) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomic(out_dir: str | Path, files: Mapping[str, bytes], replace: bool = False) -> Path:
    """Write ``files`` (name -> bytes) as the directory ``out_dir``, all or nothing.

    ``replace=True`` swaps an existing directory (moved aside, then removed);
    without it an existing ``out_dir`` is an error, which keeps the write atomic.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_file(tmp / name, data)
        fsync_dir(tmp)
        if out.exists():
            if not replace:
                raise FileExistsError(out)
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
