"""``python -m nnunet_feddah.coordinate``: run (or resume) a federation from a plan and a state folder.

Three ways, one state folder format (so each can resume the others' work):

* ``--local`` — the whole federation on this machine through real Flower (TLS SuperLink, one
  authenticated SuperNode per site); what the demo and the end-to-end tests use.
* ``--in-process`` — no Flower at all: the coordinator calls each site's round in this process. For
  debugging and for benchmarks that should not pay Flower's per-message start-up.
* neither — a real deployment: ``flwr run`` against a running SuperLink (``--superlink``,
  ``--root-certificates``); see docs/DEPLOYMENT.md.

The plan and the sites' data are checked first, so a typo is reported before anything starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from nnunet_feddah.errors import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from nnunet_feddah.federation.checkpoint import private_files
from nnunet_feddah.federation.coordinator import DEFAULT_ROUND_ATTEMPTS
from nnunet_feddah.federation.lock import Holder, state_lock
from nnunet_feddah.federation.logfile import COORDINATOR_LOG, file_logger
from nnunet_feddah.federation.plan import FederationPlan, FederationPlanError
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.federation.start import parse_case_counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnunet_feddah.coordinate", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="federation plan JSON (or a bundled plan's name)")
    p.add_argument("--state", required=True, type=Path, help="coordinator state folder; an existing one is resumed")
    p.add_argument("--work", type=Path, default=None, help="site round folders (default: <state>/sites)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="start SuperLink + one SuperNode per site here")
    mode.add_argument("--in-process", action="store_true", help="no Flower: run the sites in this process")
    p.add_argument("--device", default="cpu", help="training device for the sites (local / in-process)")
    p.add_argument("--max-relative-change", type=float, default=None, help="reject uploads that move the weights "
                                                                            "more than this (relative L2)")
    p.add_argument("--training-cases", default="", metavar="SITE=N[,SITE=N]",
                   help="each site's training cases, bounding what its uploads may claim (default: the fingerprint "
                        "round's counts, the sites' dataset.json here, else each site's first upload registers it)")
    p.add_argument("--round-attempts", type=int, default=DEFAULT_ROUND_ATTEMPTS,
                   help=f"tries of a round in which no upload is accepted before the run stops "
                        f"(default {DEFAULT_ROUND_ATTEMPTS})")
    p.add_argument("--superlink", default="127.0.0.1:9092", help="deployment: SuperLink address (Control API)")
    p.add_argument("--root-certificates", type=Path, default=None, help="deployment: CA certificate of the SuperLink")
    p.add_argument("--app-spec", default=None, help="deployment: run the signed app the SuperLink serves "
                                                    "(@nnunet-feddah/nnunet-feddah-app==VERSION) instead of sending "
                                                    "the installed app folder unsigned (docs/DEPLOYMENT.md, 2b)")
    p.add_argument("--plans-file", type=Path, default=None,
                   help="deployment: shared plans JSON when this host has no site data (skips the data check)")
    return p


def check(plan_arg: str, plans_file: Path | None, state: Path | None = None, sites_here: bool = True) -> FederationPlan:
    """Load the plan and check every site's data (unless only the shared plans file is available here).

    Before a plan's fingerprint round has run in ``state`` the sites have no plans yet: only their raw data
    is checked, and the round installs the plans. A deployment's coordinator (``sites_here=False``) with a
    fingerprint round has no site data to check: each site checks its own when its SuperNode starts.
    """
    from nnunet_feddah.federation.plans_round import round_record

    plan = load_plan(plan_arg)
    if plans_file is None and not sites_here and plan.fingerprint_round is not None:
        print(f"plan {plan.source}: {len(plan.sites)} sites, {plan.total_rounds} rounds, strategy "
              f"{plan.strategy.name}; shared plans from a fingerprint round over Flower "
              f"(template {plan.fingerprint_round.template})")
    elif plans_file is None:
        planned_here = plan.fingerprint_round is not None and (state is None or round_record(state) is None)
        found = validate_sites(plan, require_plans=not planned_here)
        print(f"plan {plan.source}: {len(found)} sites, {plan.total_rounds} rounds, strategy {plan.strategy.name}")
        if planned_here:
            print(f"  shared plans: from a fingerprint round over every site (template {plan.fingerprint_round.template})")
        for data in found.values():
            print(f"  {data.site:<10} {data.dataset_name}  {data.fingerprint or '(plans from the fingerprint round)'}")
    elif not plans_file.is_file():
        raise FederationPlanError(str(plans_file), [f"--plans-file {plans_file} does not exist"])
    return plan


def run_in_process(plan: FederationPlan, state: Path, work: Path, args: argparse.Namespace,
                   log: Callable[[str], None]) -> bool:
    from nnunet_feddah.federation.plans_round import ensure_shared_plans
    from nnunet_feddah.federation.site_round import InProcessExecutor
    from nnunet_feddah.federation.start import open_coordinator

    executor = InProcessExecutor(plan, work, args.device)
    ensure_shared_plans(plan, state, executor.ask, log)
    coordinator = open_coordinator(plan, state, log=log, max_relative_change=args.max_relative_change,
                                   round_attempts=args.round_attempts,
                                   operator_cases=parse_case_counts(args.training_cases, plan))
    coordinator.run(executor)
    return coordinator.finished


def run_local(plan: FederationPlan, state: Path, work: Path, args: argparse.Namespace, lock: Holder) -> bool:
    """The whole federation through Flower here; the ServerApp runs under this process's state lock."""
    from nnunet_feddah.flower.launch.flwr_cli import COMPLETED
    from nnunet_feddah.flower.launch.local import LocalFederation

    extra = {"lock-token": lock.token, "round-attempts": args.round_attempts}
    if args.training_cases:
        extra["training-cases"] = args.training_cases
    if args.max_relative_change is not None:
        extra["max-relative-change"] = args.max_relative_change
    with LocalFederation(plan, state, work, args.device, run_config=extra) as federation:
        federation.start()
        return federation.run() == COMPLETED and _committed(state) >= plan.total_rounds


def run_deployment(plan: FederationPlan, args: argparse.Namespace) -> bool:
    from nnunet_feddah.flower.launch.remote import run_remote

    finished = run_remote(plan, args.state.resolve(), args.superlink, args.root_certificates, args.plans_file,
                          args.work, args.max_relative_change, args.app_spec, args.training_cases)
    return finished and _committed(args.state) >= plan.total_rounds


def _committed(state: Path) -> int:
    from nnunet_feddah.federation import checkpoint

    committed = checkpoint.read_committed(state, verify=False)
    return 0 if committed is None else committed.round


def where(plan: FederationPlan, state: Path, work: Path | None, mode: str) -> str:
    """Where everything is, for the operator's next step (export, evaluation, debugging)."""
    from nnunet_feddah.federation import checkpoint
    from nnunet_feddah.flower import TIMINGS_FILE

    try:
        committed = checkpoint.read_committed(state, verify=False)
    except checkpoint.CheckpointError as exc:  # already reported by the run; say where, not why again
        committed = None
        lines = [f"state:       {state / checkpoint.RECORD} (unusable: {str(exc).split('. ')[0]})"]
    else:
        lines = [f"state:       {state / checkpoint.RECORD} (round {committed.round if committed else 0}/"
                 f"{plan.total_rounds})"]
    if committed:
        lines.append(f"strategy:    {committed.strategy_file}")
    lines.append(f"log:         {state / COORDINATOR_LOG}")
    if mode != "in-process":
        lines.append(f"timings:     {state / TIMINGS_FILE}")
        lines.append(f"flower logs: {state / 'flower' / 'logs'}" if mode == "local" else
                     "flower logs: flwr log <run-id> --show (on this host), SuperNode logs at each site")
    lines.append(f"site rounds: {work}/<site>/round_NNNN_<task>/" if work else
                 "site rounds: <work>/<site>/round_NNNN_<task>/ at each site (python -m nnunet_feddah.site --work)")
    return "\n".join(lines)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the launcher's cleanup


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        plan = check(args.plan, None if (args.local or args.in_process) else args.plans_file, args.state.resolve(),
                     sites_here=args.local or args.in_process)
    except FederationPlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        parse_case_counts(args.training_cases, plan)
    except FederationPlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if not (args.local or args.in_process) and args.root_certificates is None:
        print("error: a deployment needs --root-certificates (or use --local / --in-process)", file=sys.stderr)
        return EXIT_INVALID
    state = args.state.resolve()
    work = (args.work or state / "sites").resolve() if (args.local or args.in_process) else args.work
    mode = "local" if args.local else "in-process" if args.in_process else "deployment"
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.in_process or args.local:  # a deployment's ServerApp takes the lock on its own host
            with private_files():  # logs, superlink.db, launcher.json, shared_plans/: owner-only
                log = file_logger(state / COORDINATOR_LOG)
                with state_lock(state, mode, log=log) as lock:
                    ok = (run_in_process(plan, state, work, args, log) if args.in_process
                          else run_local(plan, state, work, args, lock))
        else:
            ok = run_deployment(plan, args)
    except (KeyboardInterrupt, SystemExit):
        print("stopped by a signal; everything started here has been ended", file=sys.stderr)
        ok = False
    except FederationPlanError as exc:  # e.g. a resume under a changed plan: running again would not help
        print(f"error: {exc}", file=sys.stderr)
        print(where(plan, state, work, mode))
        print("federation NOT resumed: the plan and the state disagree (see the error above)")
        return EXIT_INVALID
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        ok = False
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(where(plan, state, work, mode))
    print("federation finished" if ok else "federation NOT finished: run the same command again to resume")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
