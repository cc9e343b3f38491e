"""The coordinator as a Flower ServerApp: open (or resume) the state folder, then run every remaining round.

All round logic lives in :class:`~nnunet_feddah.federation.coordinator.Coordinator`; this module only wires it to a
Flower Grid. The ServerApp's stdout is only visible through ``flwr log``, so every coordinator line is
also appended to ``<state-dir>/coordinator.log``, which the launchers tail. A lock file keeps a second
coordinator (e.g. an orphan of a killed launcher) off the same state folder.
"""

from __future__ import annotations

import fcntl
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation.coordinator import DEFAULT_MAX_RELATIVE_CHANGE
from nnunet_feddah.federation.logfile import COORDINATOR_LOG, file_logger
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.federation.start import open_coordinator
from nnunet_feddah.flower import TIMINGS_FILE
from nnunet_feddah.flower.executor import FlowerExecutor

LOCK_FILE = "coordinator.lock"

app = ServerApp()


class StateBusyError(FedDAHError, RuntimeError):
    """Another coordinator process holds the state folder."""


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking: two coordinators on one state folder would interleave commits."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise StateBusyError(f"{state_dir / LOCK_FILE}: another coordinator (pid {fh.read().strip() or '?'}) "
                                 f"is running on this state folder; stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def run_config(context: Context) -> dict[str, Any]:
    """The run config with defaults, and the errors a missing key would otherwise cause much later."""
    config = dict(context.run_config)
    for key in ("plan", "state-dir"):
        if not str(config.get(key, "")):
            raise ValueError(f"run config key {key!r} is empty. Fix: flwr run <app> <federation> -c "
                             f"\"{key}='/abs/path'\" (python -m nnunet_feddah.coordinate sets it)")
    return config


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = run_config(context)
    state_dir = Path(str(config["state-dir"]))
    log = file_logger(state_dir / COORDINATOR_LOG)
    log(f"ServerApp started: run {getattr(context, 'run_id', '?')}, pid {os.getpid()}, state {state_dir}")
    try:
        with state_lock(state_dir):
            coordinator = open_coordinator(load_plan(str(config["plan"])), Path(str(config["state-dir"])),
                                           str(config.get("plans-file", "")) or None, log,
                                           float(config.get("max-relative-change", DEFAULT_MAX_RELATIVE_CHANGE)))
            if coordinator.finished:
                log(f"nothing to do: all {coordinator.plan.total_rounds} rounds are committed in {state_dir}")
                return
            defaults = {"plan": str(Path(coordinator.plan.source).resolve()), "work-dir": str(config.get("work-dir", "")),
                        "device": str(config.get("device", "cpu"))}
            executor = FlowerExecutor(grid, coordinator.plan.site_names, defaults, log,
                                      float(config.get("poll-interval-s", 1.0)), state_dir / TIMINGS_FILE)
            coordinator.run(executor)
            log(f"federation finished: {coordinator.last_round}/{coordinator.plan.total_rounds} rounds committed")
    except (KeyboardInterrupt, SystemExit):
        log("coordinator stopped (signal); the committed rounds are kept, run again to resume")
        raise
    except BaseException as exc:
        log(f"coordinator failed: {type(exc).__name__}: {exc}")
        log(traceback.format_exc())
        raise
