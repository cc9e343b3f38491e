"""One exclusive lock per state folder: two coordinators on one state would interleave their commits.

Every mode takes it before it reads anything of the state: ``coordinate --in-process`` and ``--local``
in the ``coordinate`` process, the Flower ServerApp (deployment) in its own process, the benchmark per
strategy state. The lock is an ``flock`` (released by the kernel when its
holder dies, so a lock left by a killed process is simply taken over) on the state folder itself — deleting
``<state>/coordinator.lock`` does not free it; that file only names the holder (pid, host, mode, start time)
for the refusal message.

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
import threading
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


def _read_holder_file(path: Path) -> Holder | None:
    try:
        with open(path) as fh:
            return _read_holder(fh)
    except OSError:
        return None


def _lock_folder(state_dir: Path) -> int | None:
    """An fd of ``state_dir`` holding its exclusive flock, or None when another open description holds it."""
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


#: How often a delegated ServerApp checks whether its launcher's lock is free (the gap a killed launcher leaves).
FOLLOW_INTERVAL_S = 0.05


@contextmanager
def _inherit_lock(state_dir: Path, log) -> Iterator[None]:
    """Run under a delegating holder's lock, and take the lock over the moment that holder is gone.

    A ``--local`` launcher killed with SIGKILL frees its lock at once, while the ServerApp it delegated to
    may still commit for seconds; a thread here tries the lock every :data:`FOLLOW_INTERVAL_S` and, once the
    launcher is gone, holds the folder until this block ends, so no second coordinator opens the state between."""
    done = threading.Event()
    taken: list[int] = []

    def follow() -> None:
        while not done.wait(FOLLOW_INTERVAL_S):
            fd = _lock_folder(state_dir)
            if fd is not None:
                taken.append(fd)
                log(f"{state_dir}: the delegating coordinator is gone; this process holds the state folder's lock")
                return

    follower = threading.Thread(target=follow, name="state-lock-follower", daemon=True)
    follower.start()
    try:
        yield
    finally:
        done.set()
        follower.join()
        for fd in taken:
            os.close(fd)


@contextmanager
def state_lock(state_dir: os.PathLike | str, mode: str, delegated_token: str | None = None,
               log=lambda *_: None) -> Iterator[Holder]:
    """Hold ``state_dir``'s lock for the block; refuse (:class:`StateBusyError`) while another holds it.

    The lock is an ``flock`` on the state folder itself, so deleting ``coordinator.lock`` does not free it;
    the file only names the holder. Yields the :class:`Holder` this process runs under (its own, or the
    delegating launcher's). A lock left by a process that is gone is taken over, and ``log`` is told whose it was.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = _lock_folder(state_dir)
    if fd is None:
        holder = _read_holder_file(path)
        if delegated_token and holder is not None and holder.token == delegated_token:
            with _inherit_lock(state_dir, log):  # started by the holder itself (coordinate --local -> ServerApp)
                yield holder
            return
        who = holder.describe() if holder else "an unknown process (its coordinator.lock was removed)"
        raise StateBusyError(f"{path}: the state folder is in use by another coordinator: {who}. Fix: stop it, "
                             f"or wait until it has finished, then run again (it resumes)")
    try:
        previous = _read_holder_file(path)
        if previous is not None and previous.pid != os.getpid() and not _alive(previous.pid):
            log(f"took over the lock of {path}: its last holder, {previous.describe()}, is gone")
        me = Holder(os.getpid(), mode)
        holder_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(holder_fd, "w") as fh:
            fh.write(json.dumps(asdict(me)))
        yield me
    finally:
        os.close(fd)  # closing the only open description releases the flock
