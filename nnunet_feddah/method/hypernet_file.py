"""DAHyper checkpoints: one safetensors file (no pickle) with the registry and config as JSON metadata.

One file, written atomically, so a coordinator killed mid-save keeps the previous checkpoint intact.
The architecture fingerprint of the shared plans is stored with it; loading it for another
architecture is refused with both fingerprints named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from nnunet_feddah.atomic import atomic_path
from nnunet_feddah.method.dahyper import DAHyper

FORMAT = "nnunet-feddah-dahyper/1"


class HypernetFileError(ValueError):
    """A DAHyper checkpoint that cannot be used: unreadable, another format or another architecture."""


def save_hypernet(path: os.PathLike | str, hyper: DAHyper, architecture_fingerprint: str,
                  extra: dict | None = None) -> Path:
    """Write the hypernetwork; ``extra`` (JSON-able, e.g. the AMR settings) travels in the metadata."""
    path = Path(path)
    tensors, info = hyper.state()
    info = {**info, "extra": extra or {}}
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "architecture_fingerprint": architecture_fingerprint, "info": json.dumps(info)}
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata=metadata)
    return path


def read_hypernet_metadata(path: os.PathLike | str) -> dict:
    """Fingerprint and registry without loading the tensors (cheap: used to list tasks)."""
    path = Path(path)
    if not path.is_file():
        raise HypernetFileError(f"DAHyper checkpoint {path} does not exist; check the path (field "
                                f"'hypernet_checkpoint' of a round config, or the coordinator's state folder)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise HypernetFileError(f"DAHyper checkpoint {path} is not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise HypernetFileError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected {FORMAT!r}; "
                                f"it is not a DAHyper checkpoint written by nnunet-feddah")
    return {"architecture_fingerprint": meta.get("architecture_fingerprint", ""), **json.loads(meta["info"])}


def load_hypernet(path: os.PathLike | str, expected_fingerprint: str | None = None) -> DAHyper:
    path = Path(path)
    meta = read_hypernet_metadata(path)
    found = meta["architecture_fingerprint"]
    if expected_fingerprint is not None and found != expected_fingerprint:
        raise HypernetFileError(
            f"{path}: field 'architecture_fingerprint' is {found}, but these shared plans give "
            f"{expected_fingerprint}; the hypernetwork generates another architecture — use the federation's plans")
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return DAHyper.from_state(tensors, meta)
