"""Child processes of a local federation: start them in their own process group, end them all.

Flower's processes start children of their own (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``), so ending a federation means ending process *groups* (SIGTERM, then SIGKILL after a
grace period), not single pids. A launcher that is itself SIGKILLed cannot clean up, so every child also
carries a launch id in its environment (inherited by grandchildren): a guardian process
(:mod:`.guardian`) and, failing that, the next launcher on the same state folder end exactly the
processes that carry the id, and no others.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

MARKER = "FEDDAH_LAUNCH_ID"
GRACE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(cmd: list[str], env: Mapping[str, str], log_file: Path) -> subprocess.Popen:
    """Start ``cmd`` as leader of a new process group, output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def end_group(pgid: int, grace_s: float = GRACE_S, sig: int = signal.SIGTERM) -> None:
    """SIGTERM (or ``sig``) to the whole group, SIGKILL to whatever is left after ``grace_s``."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Is any process of the group still running (zombies count as gone)?"""
    for pid in _pids():
        try:
            if os.getpgid(pid) == pgid and _state(pid) != "Z":
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def end_process(proc: subprocess.Popen, grace_s: float = GRACE_S) -> int | None:
    """End a child we started (its group included) and reap it; returns its exit code."""
    end_group(proc.pid, grace_s)
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


def marked(launch_id: str) -> list[int]:
    """Pids of live processes whose environment carries ``launch_id`` (this user's processes only)."""
    needle = f"{MARKER}={launch_id}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _state(pid) != "Z":
            found.append(pid)
    return found


def end_marked(launch_id: str, grace_s: float = GRACE_S) -> list[int]:
    """End every process left over from launch ``launch_id`` (a launcher that was killed)."""
    pids = marked(launch_id)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and marked(launch_id):
        time.sleep(0.2)
    _signal_all(marked(launch_id), signal.SIGKILL)
    return pids


def https_ready(url: str, ca_cert: Path) -> bool:
    """The SuperLink answers HTTPS (any HTTP status, e.g. 404 for ``/``) with a certificate the CA signed."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        urllib.request.urlopen(url, context=context, timeout=2)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
