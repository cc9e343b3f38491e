"""Tensor files: the one writer and reader of the project's safetensors files.

Weights files, DAHyper checkpoints and strategy files are all safetensors (no pickle, so a file from
another site cannot run code) with string metadata. Writes are atomic — a temporary file in the same
folder, fsync, ``os.replace`` — so a crash never leaves half a file under the final name. Readers
raise the caller's error type with the caller's name for the file, so a bad file is reported as
"weights file X …" or "DAHyper checkpoint X …", never as a bare safetensors exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from nnunet_feddah.atomic import atomic_path


def write_tensors(path: os.PathLike | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Atomically write ``tensors`` (detached CPU copies, so views and shared storage are fine) with ``metadata``.

    The same tensors and metadata give the same bytes in every process (:func:`canonical_bytes`), so two
    identical coordinator states hash identically."""
    path = Path(path)
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_bytes(save(payload, metadata={str(k): str(v) for k, v in metadata.items()})))
    return path


def canonical_bytes(data: bytes) -> bytes:
    """A safetensors file with its metadata keys sorted.

    safetensors keeps the metadata in a hash map whose order changes from process to process (the tensors'
    entries are already sorted), so the same state would hash differently on every write. Offsets in the header
    are relative to the data section, so the rewritten header only needs its own length and 8-byte padding."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


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
