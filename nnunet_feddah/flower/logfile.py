"""A log function that prints and appends timestamped lines to a file (no Flower import: in-process runs use it).

The file is the durable view of a run: the ServerApp's stdout is only reachable through ``flwr log``, so
launchers tail this file instead, and the timestamps are what the measured overheads are computed from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


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


FINAL_MARKERS = ("federation finished:", "coordinator failed:", "coordinator stopped", "nothing to do:")


class LogTail:
    """Follows a log file from its current end; :meth:`poll` prints new complete lines."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def poll(self, echo: bool = True) -> bool:
        """Print what was appended since the last call; True once the coordinator wrote its final line."""
        if self._size() <= self.offset:
            return False
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        text = complete.decode(errors="replace")
        if echo and text:
            print(text, end="", flush=True)
        return any(marker in text for marker in FINAL_MARKERS)


def stamped(line: str) -> None:
    """print with the same timestamp format as the coordinator log, so launcher and coordinator lines interleave."""
    now = time.time()
    print(time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d} {line}",
          flush=True)
