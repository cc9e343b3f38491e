"""One exclusive lock per state folder: two coordinators on one state would interleave their commits.

Every mode takes it before it reads anything of the state: ``coordinate --in-process`` and ``--local``
in the ``coordinate`` process, the Flower ServerApp (deployment) in its own process, the benchmark per
strategy state. The lock is an ``flock`` on ``<state>/coordinator.lock`` (released by the kernel when its
holder dies, so a lock left by a killed process is simply taken over); the file also names the holder
(pid, host, mode, start time) for the refusal message.

``--local`` starts the ServerApp in another process tree (the SuperLink spawns it), while the
``coordinate`` process that started the launcher already holds the lock: the launcher hands the
ServerApp the holder's random token in its run config, and a ServerApp whose token matches the
holder's runs under that lock (:func:`state_lock` with ``delegated_token``). Anyone else is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_feddah.errors import FedDAHError

LOCK_FILE = "coordinator.lock"


class StateBusyError(FedDAHError, RuntimeError):
    """Another live coordinator holds this state folder."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a state folder's lock."""

    pid: int
    mode: str
    host: str = field(default_factory=socket.gethostname)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def describe(self) -> str:
        return f"pid {self.pid} ({self.mode}) on {self.host}, started {self.started}"


def _read_holder(fh) -> Holder | None:
    fh.seek(0)
    try:
        data = json.loads(fh.read() or "null")
        return Holder(**data) if isinstance(data, dict) else None
    except (json.JSONDecodeError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def state_lock(state_dir: os.PathLike | str, mode: str, delegated_token: str | None = None,
               log=lambda *_: None) -> Iterator[Holder]:
    """Hold ``state_dir``'s lock for the block; refuse (:class:`StateBusyError`) while another holds it.

    Yields the :class:`Holder` this process runs under (its own, or the delegating launcher's). A lock file
    left by a process that is gone is taken over, and ``log`` is told whose it was.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fh)
            if delegated_token and holder is not None and holder.token == delegated_token:
                yield holder  # started by the holder itself (coordinate --local -> SuperLink -> ServerApp)
                return
            who = holder.describe() if holder else "an unknown process"
            raise StateBusyError(f"{path}: the state folder is in use by another coordinator: {who}. Fix: stop it, "
                                 f"or wait until it has finished, then run again (it resumes)") from None
        previous = _read_holder(fh)
        if previous is not None and previous.pid != os.getpid() and not _alive(previous.pid):
            log(f"took over the lock of {path}: its last holder, {previous.describe()}, is gone")
        me = Holder(os.getpid(), mode)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(asdict(me)))
        fh.flush()
        try:
            yield me
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
