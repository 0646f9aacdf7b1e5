"""Atomic file writes shared by checkpoints, cluster assignments and exports.

A file written in place can be left truncated by a crash or a ``kill -9``, and a
resume or a reader then fails on it. ``atomic_torch_save`` writes to a temporary
file in the destination folder, fsyncs it and ``os.replace``-s it over the target
(atomic within one filesystem), then fsyncs the folder so the rename survives a
power loss: readers see the old file or the complete new one, never a mixture.
Imports nothing of facecluster, so every package may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _fsync_dir(directory: Path) -> None:
    # Not every platform can open a folder (Windows); os.replace must do there.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically; parent folders are created.

    On any failure the temporary file is removed and a previous file at ``path`` is
    left unchanged.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A dot name not ending like the target, so nothing that lists checkpoints sees it.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target
