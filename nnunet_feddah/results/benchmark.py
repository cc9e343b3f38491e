"""The strategy comparison: the same phantom stream and seed under every chosen server strategy.

Runs each strategy's federation in this process (real nnU-Net training at every site, no Flower: the
benchmark compares server strategies, not transports), evaluates every state with
:mod:`nnunet_feddah.results.evaluate` and writes one ``report.json`` + ``report.md`` + plots.

Training is shared where it is provably identical: a site job is keyed by (site, round, task, round
settings incl. seed, exact bytes of the weights sent). Strategies that send the same weights for the
same job (round 1 of every strategy starts from the same initial network) reuse the first strategy's
trained upload instead of training again; the replayed training time is added to the reusing
strategy's ``wall_s`` so every strategy is charged as if it had run alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.federation.coordinator import Coordinator, SiteJob, SiteResult
from nnunet_feddah.federation.lock import state_lock
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.method.registry import STRATEGIES

QUICK_STRATEGIES = ("feddah", "fedavg", "fedavg-per-task")


def job_key(job: SiteJob) -> str:
    """Identity of a site job: same key ⇒ same training input (data, seed, settings and start weights)."""
    digest = hashlib.sha256(json.dumps([job.site, job.round, job.task, job.settings], sort_keys=True).encode())
    for name in sorted(job.weights):
        tensor = job.weights[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class ReplayingExecutor:
    """Trains each distinct job once; an identical job of a later strategy gets a copy of the same upload."""

    def __init__(self, inner: Callable[[Mapping[str, SiteJob], float], Mapping[str, Any]]) -> None:
        self.inner = inner
        self.cache: dict[str, SiteResult] = {}
        self.trained = self.replayed = 0
        self.replayed_s = 0.0  # training time that replays stood in for (charged to the replaying strategy)

    def __call__(self, jobs: Mapping[str, SiteJob], deadline_s: float) -> dict[str, Any]:
        keys = {site: job_key(job) for site, job in jobs.items()}
        fresh_jobs = {site: job for site, job in jobs.items() if keys[site] not in self.cache}
        fresh = dict(self.inner(fresh_jobs, deadline_s)) if fresh_jobs else {}
        results: dict[str, Any] = {}
        for site in jobs:
            if site in fresh_jobs:
                result = fresh.get(site, "no answer")
                if isinstance(result, SiteResult):
                    self.cache[keys[site]] = result
                    self.trained += 1
                results[site] = result
                continue
            cached = self.cache[keys[site]]
            self.replayed += 1
            self.replayed_s += cached.seconds
            results[site] = replace(cached, weights={k: v.clone() for k, v in cached.weights.items()},
                                    metrics=dict(cached.metrics))
        return results


def plan_for(plan: FederationPlan, strategy: str, iterations_per_epoch: int | None = None) -> FederationPlan:
    """The benchmark plan with another strategy (and optionally another number of iterations per epoch)."""
    data = plan.to_json()
    data["strategy"] = {"name": strategy, "params": {}}
    if iterations_per_epoch is not None:
        data["local"]["iterations_per_epoch"] = int(iterations_per_epoch)
    return parse_plan(data, f"{plan.source} [{strategy}]")


def prepare_phantom_sites(plan: FederationPlan, log: Callable[[str], None] = print) -> None:
    """Write the phantom datasets the plan names (consecutive ids) and install the shared CPU plans, once."""
    from nnunet_feddah.data import phantom
    from nnunet_feddah.nnunet import shared_plans

    ids = sorted(int(s.dataset) for s in plan.sites)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"{plan.source}: the benchmark writes phantom sites with consecutive dataset ids; got {ids}")
    raw, preprocessed = (Path(os.environ[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed"))
    if not all(any(raw.glob(f"Dataset{i:03d}_*")) for i in ids):
        start = time.perf_counter()
        phantom.write_cohort(raw, num_sites=len(ids), num_train=6, num_test=2, seed=plan.seed, first_dataset_id=ids[0])
        log(f"[bench] phantom cohort {ids}: {time.perf_counter() - start:.0f} s")
    if not all(any(preprocessed.glob(f"Dataset{i:03d}_*/{plan.plans_identifier}.json")) for i in ids):
        start = time.perf_counter()
        shared_plans.install(ids, template="cpu", num_processes=2, log=lambda *_: None)
        log(f"[bench] shared plans + preprocessing: {time.perf_counter() - start:.0f} s")


def run_benchmark(plan: FederationPlan, strategies: Sequence[str], work: Path, out: Path,
                  iterations_per_epoch: int | None = None, device: str = "cpu",
                  log: Callable[[str], None] = print, **report_extra: Any) -> Path:
    """Run, evaluate and report every strategy; returns the report.json path. Resumes finished strategies."""
    from nnunet_feddah.federation.site_round import InProcessExecutor
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.results.evaluate import evaluate_state, run_stats, write_evaluation
    from nnunet_feddah.results.report import format_metric, markdown_table, write_report

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    started = time.perf_counter()
    site = next(iter(validate_sites(plan, check_cases=False).values()))
    base = hypernet_base(json.loads(site.plans_file.read_text()))
    executor = ReplayingExecutor(InProcessExecutor(plan, work / "sites", device))
    results = {}
    work.mkdir(parents=True, exist_ok=True)
    for name in strategies:
        variant = plan_for(plan, name, iterations_per_epoch)
        state = work / "states" / name
        with open(work / f"{name}.log", "a") as coordinator_log, state_lock(state, f"benchmark ({name})"):
            coordinator = Coordinator.open(variant, state, base, is_head, site.fingerprint,
                                           log=lambda line, fh=coordinator_log: print(line, file=fh, flush=True))
            resumed_finished = coordinator.finished
            replayed_before, run_start = executor.replayed_s, time.perf_counter()
            coordinator.run(executor)
        run_s = time.perf_counter() - run_start
        evaluation = evaluate_state(variant, state, device, log=lambda *_: None)
        write_evaluation(out / name, evaluation)
        stats = run_stats(state)
        wall_file = work / "states" / f"{name}.wall.json"  # the measured wall time survives a re-run of the bench
        if not resumed_finished:
            atomic_write_json(wall_file, {"wall_s": run_s + (executor.replayed_s - replayed_before)})
        if wall_file.is_file():
            stats["wall_s"] = json.loads(wall_file.read_text())["wall_s"]
        stats["evaluation_s"] = evaluation["seconds"]
        results[name] = (evaluation, stats)
        log(f"[bench] {name:<17} final Dice {format_metric(evaluation['final_mean_dice'])} forgetting "
            f"{format_metric(evaluation['forgetting'])} BWT {format_metric(evaluation['bwt'])}  run {run_s:.0f} s "
            f"(+{executor.replayed_s - replayed_before:.0f} s replayed), evaluation {evaluation['seconds']:.0f} s")
    report = write_report(out, results, plan.name, plan.seed, iterations_per_epoch=variant.local.iterations_per_epoch,
                          epochs=variant.local.epochs, device=device, trained_jobs=executor.trained,
                          replayed_jobs=executor.replayed, bench_wall_s=time.perf_counter() - started, **report_extra)
    log(markdown_table(json.loads(report.read_text())))
    return report


def check_targets(report: Mapping[str, Any]) -> list[str]:
    """The issue's targets as PASS/FAIL lines (only those whose strategies were run)."""
    s = report["strategies"]
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    def val(name: str, key: str) -> float:
        value = s[name][key]
        return float("nan") if value is None else value

    if "feddah" in s and "fedavg-per-task" in s:
        ratio = val("feddah", "final_mean_dice") / max(val("fedavg-per-task", "final_mean_dice"), 1e-9)
        line(ratio >= 0.97, f"feddah final mean Dice = {ratio:.3f} × fedavg-per-task (target ≥ 0.97)")
        line(s["feddah"]["server_bytes"] < s["fedavg-per-task"]["server_bytes"],
             f"feddah server memory {s['feddah']['server_bytes'] / 1e6:.2f} MB vs fedavg-per-task "
             f"{s['fedavg-per-task']['server_bytes'] / 1e6:.2f} MB")
    if "feddah" in s:
        line(val("feddah", "forgetting") <= 0.01, f"feddah forgetting {val('feddah', 'forgetting'):+.3f} (target ≤ 0.01)")
    if "fedavg" in s:
        line(val("fedavg", "forgetting") > 0.05, f"fedavg forgetting {val('fedavg', 'forgetting'):+.3f} (must be clear, "
                                                 f"> 0.05)")
    if "feddah" in s and "feddah-noWs" in s:
        line(val("feddah", "final_mean_dice") >= val("feddah-noWs", "final_mean_dice"),
             f"full ≥ −Ws: {val('feddah', 'final_mean_dice'):.3f} vs {val('feddah-noWs', 'final_mean_dice'):.3f}")
    if "feddah" in s and "feddah-noLR" in s:
        old = s["feddah"].get("old_tasks", [])
        line(_old_mean(s["feddah"], old) > _old_mean(s["feddah-noLR"], old),
             f"full > −LR on old tasks {old}: {_old_mean(s['feddah'], old):.3f} vs "
             f"{_old_mean(s['feddah-noLR'], old):.3f}")
    return lines


def _old_mean(entry: Mapping[str, Any], old: Sequence[str]) -> float:
    matrix = entry["dice_matrix"]
    values = [matrix["values"][matrix["tasks"].index(t)][-1] for t in old if t in matrix["tasks"]]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")
