"""The coordinator as a Flower ServerApp: open (or resume) the state folder, then run every remaining round.

All round logic lives in :class:`~nnunet_feddah.federation.coordinator.Coordinator`; this module only wires it to a
Flower Grid. The ServerApp's stdout is only visible through ``flwr log``, so every coordinator line is
also appended to ``<state-dir>/coordinator.log``, which the launchers tail. The state folder's lock
(:mod:`nnunet_feddah.federation.lock`) keeps a second coordinator (e.g. an orphan of a killed launcher, or an
in-process run) off the same state folder; under ``coordinate --local`` the launcher holds it and hands
the ServerApp its token (run-config key ``lock-token``).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from nnunet_feddah.federation.checkpoint import private_files
from nnunet_feddah.federation.coordinator import DEFAULT_MAX_RELATIVE_CHANGE, DEFAULT_ROUND_ATTEMPTS
from nnunet_feddah.federation.lock import state_lock
from nnunet_feddah.federation.logfile import COORDINATOR_LOG, file_logger
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.federation.plans_round import ensure_shared_plans
from nnunet_feddah.federation.start import open_coordinator, parse_case_counts
from nnunet_feddah.flower import TIMINGS_FILE
from nnunet_feddah.flower.executor import FlowerExecutor

app = ServerApp()


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
    with private_files():  # the state folder's files are owner-only, whoever writes them
        _serve(grid, context)


def _serve(grid: Grid, context: Context) -> None:
    config = run_config(context)
    state_dir = Path(str(config["state-dir"]))
    log = file_logger(state_dir / COORDINATOR_LOG)
    log(f"ServerApp started: run {getattr(context, 'run_id', '?')}, pid {os.getpid()}, state {state_dir}")
    try:
        with state_lock(state_dir, "flower ServerApp", str(config.get("lock-token", "")) or None, log):
            plan = load_plan(str(config["plan"]))
            plans_file = str(config.get("plans-file", "")) or None
            defaults = {"plan": str(Path(plan.source).resolve()), "work-dir": str(config.get("work-dir", "")),
                        "device": str(config.get("device", "cpu"))}
            executor = FlowerExecutor(grid, plan.site_names, defaults, log, float(config.get("poll-interval-s", 1.0)),
                                      state_dir / TIMINGS_FILE)
            if plans_file is None:  # no plans given: the plan's fingerprint round makes them (once per state)
                ensure_shared_plans(plan, state_dir, executor.ask, log)
            coordinator = open_coordinator(plan, state_dir, plans_file, log,
                                           float(config.get("max-relative-change", DEFAULT_MAX_RELATIVE_CHANGE)),
                                           int(config.get("round-attempts", DEFAULT_ROUND_ATTEMPTS)),
                                           parse_case_counts(str(config.get("training-cases", "")), plan))
            if coordinator.finished:
                log(f"nothing to do: all {coordinator.plan.total_rounds} rounds are committed in {state_dir}")
                return
            coordinator.run(executor)
            log(f"federation finished: {coordinator.last_round}/{coordinator.plan.total_rounds} rounds committed")
    except (KeyboardInterrupt, SystemExit):
        log("coordinator stopped (signal); the committed rounds are kept, run again to resume")
        raise
    except BaseException as exc:
        log(f"coordinator failed: {type(exc).__name__}: {exc}")
        log(traceback.format_exc())
        raise
