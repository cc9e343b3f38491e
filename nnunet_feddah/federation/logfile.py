"""The coordinator's log: a function that prints and appends timestamped lines to a file.

The file is the durable view of a run: the ServerApp's stdout is only reachable through ``flwr log``, so
launchers tail this file instead, and the timestamps are what the measured overheads are computed from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

COORDINATOR_LOG = "coordinator.log"  # in the state folder: every coordinator line, timestamped
# the coordinator's last line starts with one of these; launchers that follow the log stop there
FINAL_MARKERS = ("federation finished:", "coordinator failed:", "coordinator stopped", "nothing to do:")


def file_logger(path: Path, echo: bool = True) -> Callable[[str], None]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        if echo:
            print(line, flush=True)
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        with open(path, "a") as fh:
            for part in str(line).splitlines() or [""]:
                fh.write(f"{stamp} {part}\n")

    return log
