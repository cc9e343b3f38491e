"""DAHyper checkpoints: one tensor file (no pickle) with the registry and config as JSON metadata.

One file, written atomically (:mod:`nnunet_feddah.tensor_file`), so a coordinator killed mid-save keeps
the previous checkpoint intact. The architecture fingerprint of the shared plans is stored with it;
loading it for another architecture is refused with both fingerprints named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.method.dahyper import DAHyper
from nnunet_feddah.tensor_file import read_header, read_tensors, write_tensors

FORMAT = "nnunet-feddah-dahyper/1"
WHAT = "DAHyper checkpoint"
MISSING_FIX = ("check the path (field 'hypernet_checkpoint' of a round config, or the coordinator's state "
               "folder)")


class HypernetFileError(FedDAHError, ValueError):
    """A DAHyper checkpoint that cannot be used: unreadable, another format or another architecture."""


def save_hypernet(path: os.PathLike | str, hyper: DAHyper, architecture_fingerprint: str,
                  extra: dict | None = None) -> Path:
    """Write the hypernetwork; ``extra`` (JSON-able, e.g. the AMR settings) travels in the metadata."""
    tensors, info = hyper.state()
    info = {**info, "extra": extra or {}}
    return write_tensors(path, tensors, {"format": FORMAT, "architecture_fingerprint": architecture_fingerprint,
                                         "info": json.dumps(info)})


def read_hypernet_metadata(path: os.PathLike | str) -> dict:
    """Fingerprint and registry without loading the tensors (cheap: used to list tasks)."""
    path = Path(path)
    _, meta = read_header(path, WHAT, HypernetFileError, MISSING_FIX)
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
    return DAHyper.from_state(read_tensors(path, WHAT, HypernetFileError, MISSING_FIX), meta)
