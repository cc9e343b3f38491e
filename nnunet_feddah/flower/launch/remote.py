"""Start a run on a SuperLink and follow it until it finishes (deployment mode of ``coordinate``).

The coordinator runs as the SuperLink's ServerApp, so it keeps going if this command is interrupted:
Ctrl-C only stops *watching* (the command to stop the run is printed). A second run on the same state
folder is refused while the first is still running — the ServerApp's state lock would refuse it anyway,
but only after Flower had started it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from nnunet_feddah.federation.logfile import COORDINATOR_LOG
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.flower import app_dir
from nnunet_feddah.flower.launch.flwr_cli import COMPLETED, FINISHED, FlwrCli, FlwrCliError
from nnunet_feddah.flower.launch.logtail import LogTail

STATUS_EVERY_S = 15.0  # `flwr ls` costs a Python start-up; the coordinator log is checked every second
REMOTE_FILE = "remote_run.json"


def stage_app(folder: Path) -> Path:
    """A clean copy of the app directory to pack (the installed package may be read-only)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(app_dir(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def watch_run(cli: FlwrCli, run_id: int, tail: LogTail, tick: Callable[[], None] = lambda: None,
              poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Print the coordinator log while the run lasts; returns Flower's final status (``finished:...``)."""
    started, last_check = time.time(), 0.0
    while True:
        tick()
        final = tail.poll()
        if final or time.time() - last_check > STATUS_EVERY_S:
            status, last_check = cli.status(run_id), time.time()
            if status.startswith(FINISHED):
                tail.poll()
                return status
        if timeout_s is not None and time.time() - started > timeout_s:
            raise TimeoutError(f"run {run_id} not finished after {timeout_s:.0f} s")
        time.sleep(poll_s)


def run_remote(plan: FederationPlan, state: Path, superlink: str, root_certificates: Path,
               plans_file: Path | None, work: Path | None, max_change: float | None) -> bool:
    cli = FlwrCli(state / "flower" / "home" / "cli", superlink, root_certificates)
    record = state / REMOTE_FILE
    previous = json.loads(record.read_text()).get("run_id") if record.is_file() else None
    if previous is not None:
        try:
            running = not cli.status(int(previous)).startswith(FINISHED)
        except FlwrCliError:  # unknown to this SuperLink (e.g. a new database): nothing is running
            running = False
        if running:
            raise RuntimeError(f"run {previous} on {superlink} is still running on this state folder; follow "
                               f"{state / COORDINATOR_LOG} or stop it: FLWR_HOME={cli.home} flwr stop {previous}")
    config: dict[str, str | float] = {"plan": str(Path(plan.source).resolve()), "state-dir": str(state),
                                      "work-dir": str(work or "")}
    if plans_file is not None:
        config["plans-file"] = str(plans_file.resolve())
    if max_change is not None:
        config["max-relative-change"] = max_change
    tail = LogTail(state / COORDINATOR_LOG)
    run_id = cli.run(stage_app(state / "flower" / "app"), config)
    record.write_text(json.dumps({"run_id": run_id, "superlink": superlink}))
    print(f"run {run_id} started on {superlink}; stop it with: FLWR_HOME={cli.home} flwr stop {run_id}", flush=True)
    try:
        status = watch_run(cli, run_id, tail, poll_s=2.0)
    except KeyboardInterrupt:
        print(f"stopped watching; run {run_id} goes on (coordinator log: {state / COORDINATOR_LOG})")
        return False
    print(f"run {run_id}: {status}")
    return status == COMPLETED
