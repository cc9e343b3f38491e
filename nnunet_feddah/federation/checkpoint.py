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

Integrity (nothing lost, nothing faked): the record holds the sha256 of the strategy file and of every
snapshot, and the record it replaces is kept as ``checkpoint.previous.json`` (its strategy file too, until
the next commit; after the first commit it is a copy of the record). On every open each committed file is checked against its hash; a missing, truncated or
altered record or file is refused with what is wrong and how to recover — never a silent restart, and a
commit never deletes a file a record names. State files are owner-only (folder 0700, files 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_path, atomic_write_json
from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.method import registry
from nnunet_feddah.method.strategy import IsHead, Strategy, StrategyFileError

RECORD = "checkpoint.json"
PREVIOUS_RECORD = "checkpoint.previous.json"
STEPS_DIR = "steps"
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


@contextmanager
def private_files() -> Iterator[None]:
    """Within the block, every file and folder this process or a process it starts creates is owner-only.

    A state folder holds more than the commits written with explicit modes here: the coordinator log, Flower's
    ``superlink.db``, ``launcher.json`` and ``shared_plans/`` (each site's released statistics), written by other
    modules and by child processes; a umask of 077 covers them all. The previous umask comes back afterwards."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
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

    def verify(self, snapshots: bool = True) -> None:
        """Check the strategy file (and, with ``snapshots``, every time-step snapshot) against the record's hashes."""
        files = {self.strategy_file: self.record.get("strategy_sha256")}
        if snapshots:
            files.update({snapshot_path(self.state_dir, int(r)): h
                          for r, h in (self.record.get("snapshots") or {}).items()})
        for path, expected in files.items():
            if expected is None:  # a record written before hashes were kept
                continue
            if not path.is_file():
                raise CheckpointError(f"{self.path}: committed file {path} is missing. {_recovery(self.state_dir)}")
            if file_sha256(path) != expected:
                raise CheckpointError(f"{path} does not match the sha256 in {self.path} (truncated or altered after "
                                      f"it was committed). {_recovery(self.state_dir)}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recovery(state_dir: Path) -> str:
    """How to recover a damaged state folder, from what is actually in it."""
    options = []
    previous = state_dir / PREVIOUS_RECORD
    if previous.is_file():
        try:
            round_index = json.loads(previous.read_text()).get("round")
        except (json.JSONDecodeError, AttributeError):
            round_index = "?"
        options.append(f"go back one round with `cp {previous} {state_dir / RECORD}` (round {round_index})")
    snapshots = sorted((state_dir / STEPS_DIR).glob("strategy-r*.safetensors"))
    if snapshots:
        options.append(f"evaluate/export from the last time-step snapshot {snapshots[-1]}")
    options.append("or start a new --state folder")
    return "Fix: " + "; ".join(options)


def read_committed(state_dir: os.PathLike | str, verify: bool = True) -> Committed | None:
    """The committed state of ``state_dir`` (every committed file checked against its hash unless ``verify``
    is off); None when no round has been committed there."""
    state_dir = Path(state_dir)
    path = state_dir / RECORD
    if not path.is_file():
        if (state_dir / PREVIOUS_RECORD).is_file():  # written after every commit: rounds were committed here
            left = sorted(p.name for p in [*state_dir.glob("strategy-r*.safetensors"),
                                           *(state_dir / STEPS_DIR).glob("*.safetensors")])
            raise CheckpointError(f"{path} is missing, but {state_dir} holds committed rounds ({PREVIOUS_RECORD}, "
                                  f"{', '.join(left[:4])}{', …' if len(left) > 4 else ''}); refusing to start the "
                                  f"federation again from scratch over them. {_recovery(state_dir)}")
        return None  # a new state folder (or one whose first commit never finished: its leftovers are replaced)
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}). {_recovery(state_dir)}") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{path}: field 'format' is {found!r}, expected {RECORD_FORMAT!r}. {_recovery(state_dir)}")
    missing = [k for k in ("round", "strategy_file", "architecture_fingerprint", "history") if k not in record]
    if missing:
        raise CheckpointError(f"{path}: field(s) {missing} missing; not a complete commit record. "
                              f"{_recovery(state_dir)}")
    if not (state_dir / record["strategy_file"]).is_file():
        raise CheckpointError(f"{path}: field 'strategy_file' names {record['strategy_file']}, which is missing. "
                              f"{_recovery(state_dir)}")
    committed = Committed(state_dir, record)
    if verify:
        committed.verify()
    return committed


def require_committed(state_dir: os.PathLike | str, snapshots: bool = True) -> Committed:
    """Like :func:`read_committed`, but a folder without a commit is an error naming the fix.

    ``snapshots=False`` checks only the final strategy file: a reader of the final model (export) is not
    stopped by damage to an old time-step snapshot it never reads."""
    committed = read_committed(state_dir, verify=False)
    if committed is None:
        raise CheckpointError(f"{Path(state_dir)} has no {RECORD}: not a coordinator state folder, or no round has "
                              f"been committed yet. Fix: pass the --state folder of `nnfeddah coordinate`")
    committed.verify(snapshots)
    return committed


def commit(state_dir: Path, round_index: int, strategy: Strategy, fingerprint: str, record: Mapping[str, Any],
           before_record: Callable[[], None] | None = None, snapshot: bool = False) -> Path:
    """Write the strategy file (and its time-step snapshot), then atomically the record naming it and their
    hashes, then keep the record it replaced as the previous record; then drop files no record names.

    The previous record is written after every commit (on the first, a copy of the record itself), so a
    state folder whose ``checkpoint.json`` was deleted is recognised and refused. ``before_record`` runs
    between the strategy file and the record (tests inject a crash there).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(PRIVATE_DIR)
    current = read_committed(state_dir, verify=False)  # verified when the coordinator opened the state
    name = strategy_file_name(round_index)
    strategy.save(state_dir / name, fingerprint)
    (state_dir / name).chmod(PRIVATE_FILE)
    digest = file_sha256(state_dir / name)
    snapshots = dict(current.record.get("snapshots") or {}) if current is not None else {}
    if snapshot:
        (state_dir / STEPS_DIR).mkdir(exist_ok=True)
        (state_dir / STEPS_DIR).chmod(PRIVATE_DIR)
        with atomic_path(snapshot_path(state_dir, round_index), PRIVATE_FILE) as tmp:
            shutil.copyfile(state_dir / name, tmp)
        snapshots[str(round_index)] = digest
    if before_record is not None:
        before_record()
    new = {"format": RECORD_FORMAT, **record, "round": round_index, "strategy_file": name,
           "strategy_sha256": digest, "snapshots": snapshots, "architecture_fingerprint": fingerprint}
    atomic_write_json(state_dir / RECORD, new, PRIVATE_FILE)
    atomic_write_json(state_dir / PREVIOUS_RECORD, dict(current.record) if current is not None else new, PRIVATE_FILE)
    keep = {name} | ({current.record["strategy_file"]} if current is not None else set())
    for stale in state_dir.glob("strategy-r*.safetensors"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return state_dir / name
