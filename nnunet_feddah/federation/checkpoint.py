"""The coordinator's durable state: a strategy file per committed round and one commit record.

This module is the one reader and writer of a state folder; the coordinator, export, evaluation and
the CLIs all go through :func:`read_committed` / :func:`require_committed`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_path, atomic_write_json
from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.method import registry
from nnunet_feddah.method.strategy import IsHead, Strategy, StrategyFileError

RECORD = "checkpoint.json"
STEPS_DIR = "steps"
RECORD_FORMAT = "nnunet-feddah-coordinator/1"


class CheckpointError(FedDAHError, ValueError):
    """A state folder that cannot be resumed: corrupt, another plan or another architecture."""


def strategy_file_name(round_index: int) -> str:
    return f"strategy-r{round_index:04d}.safetensors"


def snapshot_path(state_dir: os.PathLike | str, round_index: int) -> Path:
    """Where the strategy at the end of time-step round ``round_index`` is kept."""
    return Path(state_dir) / STEPS_DIR / strategy_file_name(round_index)


def load_strategy(path: Path, fingerprint: str, is_head: IsHead) -> Strategy:
    """The strategy in a committed strategy file or time-step snapshot, for the architecture ``fingerprint``."""
    try:
        return registry.load_strategy(path, fingerprint, is_head)
    except StrategyFileError as exc:
        raise CheckpointError(str(exc)) from exc


@dataclass(frozen=True)
class Committed:
    """The last committed round of a state folder: its record and the strategy file it names."""

    state_dir: Path
    record: Mapping[str, Any]

    @property
    def path(self) -> Path:
        return self.state_dir / RECORD

    @property
    def round(self) -> int:
        return int(self.record["round"])

    @property
    def strategy_file(self) -> Path:
        return self.state_dir / self.record["strategy_file"]

    @property
    def fingerprint(self) -> str:
        return self.record["architecture_fingerprint"]

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.record["history"])

    def require_fingerprint(self, fingerprint: str, fix: str) -> None:
        """Refuse to use the state with another architecture (``fix``: what the caller should do instead)."""
        if self.fingerprint != fingerprint:
            raise CheckpointError(f"{self.path}: field 'architecture_fingerprint' is {self.fingerprint}, but {fix}")

    def load_strategy(self, is_head: IsHead) -> Strategy:
        return load_strategy(self.strategy_file, self.fingerprint, is_head)


def read_committed(state_dir: os.PathLike | str) -> Committed | None:
    """The committed state of ``state_dir``; None when no round has been committed there."""
    state_dir = Path(state_dir)
    path = state_dir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from a backup or start a new "
                              f"state folder") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{path}: field 'format' is {found!r}, expected {RECORD_FORMAT!r}")
    missing = [k for k in ("round", "strategy_file", "architecture_fingerprint", "history") if k not in record]
    if missing:
        raise CheckpointError(f"{path}: field(s) {missing} missing; not a complete commit record. Restore it from a "
                              f"backup or start a new state folder")
    if not (state_dir / record["strategy_file"]).is_file():
        raise CheckpointError(f"{path}: field 'strategy_file' names {record['strategy_file']}, which is missing")
    return Committed(state_dir, record)


def require_committed(state_dir: os.PathLike | str) -> Committed:
    """Like :func:`read_committed`, but a folder without a commit is an error naming the fix."""
    committed = read_committed(state_dir)
    if committed is None:
        raise CheckpointError(f"{Path(state_dir)} has no {RECORD}: not a coordinator state folder, or no round has "
                              f"been committed yet. Fix: pass the --state folder of `nnfeddah coordinate`")
    return committed


def commit(state_dir: Path, round_index: int, strategy: Strategy, fingerprint: str, record: Mapping[str, Any],
           before_record: Callable[[], None] | None = None, snapshot: bool = False) -> Path:
    """Write the strategy file (and its time-step snapshot), then atomically the record naming it; then drop
    unreferenced files.

    ``before_record`` runs between the two writes (tests inject a crash there).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    name = strategy_file_name(round_index)
    strategy.save(state_dir / name, fingerprint)
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
