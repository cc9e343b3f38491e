"""The coordinator's durable state: a strategy file per committed round and one commit record.

Commit protocol (why a crash never loses or repeats a round): the strategy of round r is written to a
new file ``strategy-r{r:04d}.safetensors``; only then is ``checkpoint.json`` atomically replaced by a
record naming that file. A crash before the replace leaves the previous record — and the previous
strategy file it names — untouched; files no record names are removed at the next commit. For FedDAH
the strategy file is a plain DAHyper checkpoint, so a trainer's round config can point at it directly.

Rounds that close a time step of the plan (:attr:`FederationPlan.time_steps`) also keep a copy under
``steps/`` (written before the record, replaced if the round is redone): the strategy as it was at
that point in time, which is what the evaluation's Dice matrix needs. Old snapshots are never removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from nnunet_feddah.atomic import atomic_path, atomic_write_json
from nnunet_feddah.method.amr import AMRConfig
from nnunet_feddah.method.hypernet_file import FORMAT as HYPERNET_FORMAT
from nnunet_feddah.method.hypernet_file import load_hypernet, save_hypernet
from nnunet_feddah.method.strategies import FedDAHStrategy, Strategy, strategy_from_state

RECORD = "checkpoint.json"
STEPS_DIR = "steps"
RECORD_FORMAT = "nnunet-feddah-coordinator/1"
STRATEGY_FORMAT = "nnunet-feddah-strategy/1"


class CheckpointError(ValueError):
    """A state folder that cannot be resumed: corrupt, another plan or another architecture."""


def strategy_file_name(round_index: int) -> str:
    return f"strategy-r{round_index:04d}.safetensors"


def save_strategy(path: Path, strategy: Strategy, fingerprint: str) -> None:
    if isinstance(strategy, FedDAHStrategy):
        save_hypernet(path, strategy.hyper, fingerprint, extra={"strategy": "feddah", "amr": asdict(strategy.amr.config)})
        return
    tensors, info = strategy.state()
    payload = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": STRATEGY_FORMAT, "strategy": strategy.name, "architecture_fingerprint": fingerprint,
                "info": json.dumps(info)}
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata=metadata)


def load_strategy(path: Path, fingerprint: str, is_head: Callable[[str], bool]) -> Strategy:
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = dict(fh.metadata() or {})
        if meta.get("format") == HYPERNET_FORMAT:
            tensors = None
        else:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("format") == HYPERNET_FORMAT:
        hyper = load_hypernet(path, fingerprint)
        extra = json.loads(meta["info"]).get("extra", {})
        return FedDAHStrategy(hyper, AMRConfig(**extra.get("amr", {})))
    if meta.get("format") != STRATEGY_FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {meta.get('format')!r}; not a strategy file")
    if meta.get("architecture_fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: field 'architecture_fingerprint' is {meta.get('architecture_fingerprint')}, "
                              f"the federation's plans give {fingerprint}")
    return strategy_from_state(meta["strategy"], tensors, json.loads(meta["info"]), is_head)


def snapshot_path(state_dir: os.PathLike | str, round_index: int) -> Path:
    """Where the strategy at the end of time-step round ``round_index`` is kept."""
    return Path(state_dir) / STEPS_DIR / strategy_file_name(round_index)


def commit(state_dir: Path, round_index: int, strategy: Strategy, fingerprint: str, record: Mapping[str, Any],
           before_record: Callable[[], None] | None = None, snapshot: bool = False) -> Path:
    """Write the strategy file (and its time-step snapshot), then atomically the record naming it; then drop
    unreferenced files.

    ``before_record`` runs between the two writes (tests inject a crash there).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    name = strategy_file_name(round_index)
    save_strategy(state_dir / name, strategy, fingerprint)
    if snapshot:
        with atomic_path(snapshot_path(state_dir, round_index)) as tmp:
            shutil.copyfile(state_dir / name, tmp)
    if before_record is not None:
        before_record()
    atomic_write_json(state_dir / RECORD, {"format": RECORD_FORMAT, **record, "round": round_index,
                                           "strategy_file": name, "architecture_fingerprint": fingerprint})
    for stale in state_dir.glob("strategy-r*.safetensors"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return state_dir / name


def read_record(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from a backup or start a new "
                              f"state folder") from exc
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {record.get('format')!r}, expected {RECORD_FORMAT!r}")
    if not (state_dir / record["strategy_file"]).is_file():
        raise CheckpointError(f"{path}: field 'strategy_file' names {record['strategy_file']}, which is missing")
    return record


def strategy_path(state_dir: os.PathLike | str) -> Path:
    """The committed strategy file (for FedDAH: the DAHyper checkpoint) of a coordinator state folder."""
    state_dir = Path(state_dir)
    record = read_record(state_dir)
    if record is None:
        raise CheckpointError(f"{state_dir} has no {RECORD}; no round has been committed there")
    return state_dir / record["strategy_file"]
