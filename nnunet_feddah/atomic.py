"""Atomic file writes: readers see the old file or the complete new one, never half of either.

Every artefact that another process reads (weights, metrics, round configs, coordinator checkpoints)
goes through here: write to a temporary file in the same folder, fsync, ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: os.PathLike | str, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and move it into place.

    ``mode`` (e.g. ``0o600`` for a coordinator's state) replaces the permissions ``open()`` would give.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; unless told otherwise the result gets the permissions open() would give
    os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: os.PathLike | str, data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: os.PathLike | str, payload: Any, mode: int | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode(), mode)

