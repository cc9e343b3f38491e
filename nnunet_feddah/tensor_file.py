"""Tensor files: the one writer and reader of the project's safetensors files.

Weights files, DAHyper checkpoints and strategy files are all safetensors (no pickle, so a file from
another site cannot run code) with string metadata. Writes are atomic — a temporary file in the same
folder, fsync, ``os.replace`` — so a crash never leaves half a file under the final name. Readers
raise the caller's error type with the caller's name for the file, so a bad file is reported as
"weights file X …" or "DAHyper checkpoint X …", never as a bare safetensors exception.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nnunet_feddah.atomic import atomic_path


def write_tensors(path: os.PathLike | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Atomically write ``tensors`` (detached CPU copies, so views and shared storage are fine) with ``metadata``."""
    path = Path(path)
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata={str(k): str(v) for k, v in metadata.items()})
    return path


def _open(path: Path, what: str, error: type[Exception], missing_fix: str):
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {missing_fix}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise error(f"{what} {path} is not a readable safetensors file ({exc})") from exc


def read_header(path: os.PathLike | str, what: str, error: type[Exception],
                missing_fix: str = "check the path") -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names, shapes and metadata of a tensor file without reading the tensors."""
    with _open(Path(path), what, error, missing_fix) as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}, dict(fh.metadata() or {})


def read_tensors(path: os.PathLike | str, what: str, error: type[Exception],
                 missing_fix: str = "check the path") -> dict[str, torch.Tensor]:
    """Every tensor of a tensor file; a truncated or garbled file raises ``error`` naming it."""
    path = Path(path)
    try:
        with _open(path, what, error, missing_fix) as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except error:
        raise
    except Exception as exc:  # a header that parses but a body that does not
        raise error(f"{what} {path} is not a readable safetensors file ({exc})") from exc
