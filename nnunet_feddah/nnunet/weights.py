"""Weight files: the unique tensors of one network for one task, plus who made them for what.

Format: safetensors (no pickle, so a file from another site cannot run code) with string metadata:
``format``, ``architecture_fingerprint``, ``task`` and ``organs`` (AMOS ids). Writes are atomic — a
temporary file in the same folder, fsync, then ``os.replace`` — so a crash never leaves half a file
under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nnunet_feddah.atomic import atomic_path

FORMAT = "nnunet-feddah-weights/1"


class WeightsFileError(ValueError):
    """A weights file that cannot be used: unreadable, wrong format or made for something else."""


def save_weights(path: os.PathLike | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Atomically write ``tensors`` (detached, contiguous, CPU) with ``metadata`` to a safetensors file."""
    path = Path(path)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, **{str(k): str(v) for k, v in metadata.items()}}
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata=meta)
    return path


def _open(path: Path):
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist; check the path in the round config")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsFileError(
            f"weights file {path} is not a readable safetensors file ({exc}); "
            f"write it with nnunet_feddah.nnunet.weights.save_weights"
        ) from exc


def read_header(path: os.PathLike | str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names, shapes and metadata of a weights file without reading the tensors."""
    path = Path(path)
    with _open(path) as fh:
        meta = dict(fh.metadata() or {})
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    if meta.get("format") != FORMAT:
        raise WeightsFileError(
            f"weights file {path}: metadata field 'format' is {meta.get('format')!r}, expected {FORMAT!r}; "
            f"it was not written by nnunet-feddah"
        )
    return shapes, meta


def load_weights(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a weights file (checked format)."""
    path = Path(path)
    _, meta = read_header(path)
    with _open(path) as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, meta
