"""Weight files: the unique tensors of one network for one task, plus who made them for what.

Format: a tensor file (:mod:`nnunet_feddah.tensor_file`: safetensors, atomic) with string metadata
``format``, ``architecture_fingerprint``, ``task`` and ``organs`` (AMOS ids).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.tensor_file import read_header as read_tensor_header
from nnunet_feddah.tensor_file import read_tensors, write_tensors

FORMAT = "nnunet-feddah-weights/1"
WHAT = "weights file"
MISSING_FIX = "check the path in the round config"


class WeightsFileError(FedDAHError, ValueError):
    """A weights file that cannot be used: unreadable, wrong format or made for something else."""


def weights_digest(tensors: Mapping[str, torch.Tensor], salt: bytes = b"") -> str:
    """SHA-256 of names, dtypes and exact bytes (sorted by name): equal digests mean bit-identical weights.

    The benchmark keys its replayed site jobs on it and the evaluation its predictions, so identical work is
    done once."""
    digest = hashlib.sha256(salt)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def save_weights(path: os.PathLike | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Atomically write ``tensors`` with ``metadata`` (and this format's tag) to a safetensors file."""
    return write_tensors(path, tensors, {"format": FORMAT, **{str(k): str(v) for k, v in metadata.items()}})


def read_header(path: os.PathLike | str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names, shapes and metadata of a weights file without reading the tensors."""
    path = Path(path)
    shapes, meta = read_tensor_header(path, WHAT, WeightsFileError, MISSING_FIX)
    if meta.get("format") != FORMAT:
        raise WeightsFileError(
            f"weights file {path}: metadata field 'format' is {meta.get('format')!r}, expected {FORMAT!r}; "
            f"it was not written by nnunet-feddah"
        )
    return shapes, meta


def load_weights(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a weights file (checked format)."""
    _, meta = read_header(path)
    return read_tensors(path, WHAT, WeightsFileError, MISSING_FIX), meta
