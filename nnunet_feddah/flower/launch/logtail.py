"""Following the coordinator's log from a launcher, and printing with the log's timestamps."""

from __future__ import annotations

import time
from pathlib import Path

from nnunet_feddah.federation.logfile import FINAL_MARKERS


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
