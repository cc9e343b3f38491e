"""Tears a local federation down in order when its launcher dies without cleaning up (SIGKILL, OOM).

The launcher starts this process with a pipe on its stdin and keeps the write end; the kernel closes it
when the launcher dies, however it dies. Then the SuperNodes are ended first — they sign off at the
SuperLink, so restarted ones can activate at once instead of waiting up to 60 s for the SuperLink to give
up on them — and everything else that carries the launch id after them. The guardian also shares the
launcher's lock on the state folder, so a new launcher waits until the teardown is over.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from nnunet_feddah.flower.launch import procs


def teardown(state_dir: Path, launch_id: str) -> None:
    """End the processes of launch ``launch_id``: SuperNode groups first, then the rest."""
    try:
        info = json.loads((state_dir / "launcher.json").read_text())
    except (OSError, json.JSONDecodeError):
        info = {}
    if info.get("launch_id") == launch_id:
        alive = set(procs.marked(launch_id))
        nodes = [pid for name, pid in info.get("processes", {}).items() if name.startswith("supernode-")]
        for pgid in nodes:
            if pgid in alive:  # the marker check: never signal a pid that is no longer ours
                procs.end_group(pgid)
    procs.end_marked(launch_id)


def main(argv: list[str] | None = None) -> int:
    state_dir, launch_id = (argv or sys.argv[1:])[:2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    sys.stdin.buffer.read()  # returns at EOF: the launcher has exited
    teardown(Path(state_dir), launch_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
