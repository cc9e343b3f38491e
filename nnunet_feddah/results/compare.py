"""What another server strategy would have made of the same federation: forgetting and its absence side by side.

After a FedDAH run (e.g. the demo over Flower), this replays the same plan in-process under another
strategy (default ``fedavg``). A site job that is identical under both strategies — same site, round, task,
round settings and bit-identical start weights (every round 1 starts from the same initial network) — is
not trained again: the upload the site made in the first run, still in its round folder
(``<sites work>/<site>/round_NNNN_<task>/``), is replayed. Every other job is trained here with nnU-Net.
Both states are evaluated on the same held-out cases and one table shows, per task, the final Dice under
each strategy, with the old tasks (not trained in the last time step) marked.

CLI: ``nnfeddah compare --plan P --state S --sites-work W --out O [--strategy fedavg]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.errors import FedDAHError, run_cli
from nnunet_feddah.federation.coordinator import Coordinator, SiteJob, SiteResult
from nnunet_feddah.federation.lock import state_lock
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.results.replay import ReplayingExecutor, job_key, plan_for
from nnunet_feddah.results.stats import mean_ci95

COMPARISON_FILE = "comparison.json"


class ComparisonError(FedDAHError, ValueError):
    """The first run's state or site folders cannot be compared; the message names the path and the fix."""


def uploads_on_disk(plan: FederationPlan, sites_work: Path) -> dict[str, SiteResult]:
    """Every finished site round under ``sites_work`` as a replay cache keyed like :func:`job_key`."""
    from nnunet_feddah.nnunet.weights import load_weights

    cache: dict[str, SiteResult] = {}
    for site in plan.sites:
        for round_dir in sorted((sites_work / site.name).glob("round_*_*")):
            received, trained, metrics = (round_dir / n for n in ("received.safetensors", "trained.safetensors",
                                                                    "metrics.json"))
            if not (received.is_file() and trained.is_file() and metrics.is_file()):
                continue  # an interrupted round: trained again if needed
            round_index = int(round_dir.name.split("_")[1])
            task = plan.task_for(site, round_index)
            if task is None or round_dir.name != f"round_{round_index:04d}_{task.key}":
                continue  # a folder of another plan
            weights, _ = load_weights(received)
            job = SiteJob(site.name, round_index, task.key, list(task.labels), 0,
                          plan.round_settings(site, round_index), weights)
            info = json.loads(metrics.read_text())
            cache[job_key(job)] = SiteResult(site.name, round_index, task.key, load_weights(trained)[0], info,
                                             float(sum(info.get("wall_time_s", {}).values())))
    return cache


def compare(plan: FederationPlan, first_state: Path, sites_work: Path, out: Path, strategy: str = "fedavg",
            device: str = "cpu", first_evaluation: Path | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``strategy`` on ``plan`` in-process (replaying identical site jobs), evaluate both states.

    ``first_evaluation``: the first state's ``evaluation.json`` (``nnfeddah evaluate``), reused when it
    belongs to that state instead of evaluating it again.
    """
    from nnunet_feddah.federation.site_round import InProcessExecutor
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.results.evaluate import evaluate_state, saved_evaluation

    if not (first_state / "checkpoint.json").is_file():
        raise ComparisonError(f"--state {first_state}: no checkpoint.json; run the federation into it first")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    site = next(iter(validate_sites(plan, check_cases=False).values()))
    base = hypernet_base(json.loads(site.plans_file.read_text()))
    executor = ReplayingExecutor(InProcessExecutor(plan, out / "sites", device))
    executor.cache.update(uploads_on_disk(plan, sites_work))
    variant = plan_for(plan, strategy)
    state = out / "state"
    with open(out / "coordinator.log", "a") as coordinator_log, state_lock(state, f"comparison ({strategy})"):
        coordinator = Coordinator.open(variant, state, base, is_head, site.fingerprint,
                                       log=lambda line: print(line, file=coordinator_log, flush=True))
        coordinator.run(executor)
    log(f"[compare] {strategy}: {executor.trained} site rounds trained here, {executor.replayed} replayed from "
        f"{sites_work}")
    first = saved_evaluation(first_evaluation, first_state) or evaluate_state(plan, first_state, device,
                                                                              log=lambda *_: None)
    second = evaluate_state(variant, state, device, log=lambda *_: None)
    result = {"strategies": [plan.strategy.name, strategy], "old_tasks": first["old_tasks"],
              "final_dice": {plan.strategy.name: first["final_dice"], strategy: second["final_dice"]},
              "final_mean_dice": {plan.strategy.name: first["final_mean_dice"], strategy: second["final_mean_dice"]},
              "forgetting": {plan.strategy.name: first["forgetting"], strategy: second["forgetting"]},
              "old_task_mean_dice": {n: mean_ci95([e["final_dice"][t] for t in first["old_tasks"]])[0]
                                     for n, e in ((plan.strategy.name, first), (strategy, second))},
              "trained_here": executor.trained, "replayed": executor.replayed,
              "seconds": time.perf_counter() - started}
    atomic_write_json(out / COMPARISON_FILE, result)
    return result


def format_comparison(result: Mapping[str, Any]) -> str:
    """Per task: final Dice under each strategy (old tasks marked), then the means and forgetting."""
    first, second = result["strategies"]
    rows = [f"| task | {first} | {second} |", "|---|---|---|"]

    def cell(value: float | None, spec: str = ".3f") -> str:
        return "–" if value is None else format(value, spec)

    for task in result["final_dice"][first]:
        mark = " (old)" if task in result["old_tasks"] else ""
        rows.append(f"| {task}{mark} | {cell(result['final_dice'][first][task])} | "
                    f"{cell(result['final_dice'][second].get(task))} |")
    for label, key, spec in (("old tasks, mean", "old_task_mean_dice", ".3f"), ("all tasks, mean", "final_mean_dice",
                                                                                   ".3f"),
                             ("forgetting", "forgetting", "+.3f")):
        rows.append(f"| **{label}** | {cell(result[key][first], spec)} | {cell(result[key][second], spec)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnfeddah compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="the federation plan the first run used")
    parser.add_argument("--state", required=True, help="the first run's coordinator state folder")
    parser.add_argument("--sites-work", required=True, help="the first run's site work folder (round folders)")
    parser.add_argument("--out", required=True, help="folder for the second strategy's state, sites and result")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--evaluation", help="the first run's evaluation.json (nnfeddah evaluate), reused if it is "
                                             "of --state")
    parser.add_argument("-device", "--device", default="cpu")
    args = parser.parse_args(argv)

    def run() -> None:
        result = compare(load_plan(args.plan), Path(args.state), Path(args.sites_work), Path(args.out),
                         args.strategy, args.device, Path(args.evaluation) if args.evaluation else None)
        print(format_comparison(result))
        print(f"[compare] {Path(args.out) / COMPARISON_FILE} ({result['seconds']:.0f} s)")

    return run_cli("nnfeddah compare", run)
