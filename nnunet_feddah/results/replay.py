"""Replaying site jobs: a site job identical to one already trained gets that job's upload instead of training.

Used by ``nnfeddah compare`` (another strategy over a finished federation's site uploads) and by the
benchmark (:mod:`nnunet_feddah.research.benchmark`). A site job is keyed by (site, round, task, round
settings incl. seed, exact bytes of the weights sent): same key, same training input, so the upload can be
reused; the replayed training time is counted so a replaying strategy is charged as if it had run alone.

**Upload replay** (``replay_uploads``, the many-task stream's cheap mode): a job is keyed without its start
weights, so each (site, round, task) is trained once per seed — by the first strategy, which should be the
exact store ``fedavg-per-task-donor`` — and every later strategy receives the site's *change* laid onto the
start it sent itself: ``upload' = start' + (upload − start)``. For the first strategy this is its live run,
bit for bit. For a strategy that sends other starts (FedDAH's 4-bit form of an idle task or donor) the
replay assumes the site's training would not repair that difference; the compression error is carried into the
upload, so the replay is pessimistic for every compressing strategy. Each replay records how far the starts
were apart (``replay_start_gap``: ‖start' − start‖ / ‖upload − start‖), reported per strategy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.federation.jobs import SiteJob, SiteResult
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.method.registry import FEDDAH_ABLATIONS
from nnunet_feddah.method.strategy import Tensors
from nnunet_feddah.nnunet.weights import load_weights, save_weights, weights_digest


def job_key(job: SiteJob) -> str:
    """Identity of a site job: same key ⇒ same training input (data, seed, settings and start weights)."""
    return weights_digest(job.weights, salt=json.dumps([job.site, job.round, job.task, job.settings],
                                                      sort_keys=True).encode())


def job_slot(job: SiteJob) -> str:
    """Identity of a site job without its start weights: the same site, round, task and settings (upload replay)."""
    return weights_digest({}, salt=json.dumps([job.site, job.round, job.task, job.settings], sort_keys=True).encode())


def relative_gap(start: Tensors, trained_from: Tensors, upload: Tensors) -> float:
    """‖start − trained_from‖ / ‖upload − trained_from‖: how far a replayed start is from the one the upload
    was trained from, in units of the site's own change (0 = the replay is exact)."""
    gap = sum(float((start[k].double() - trained_from[k].double()).square().sum()) for k in trained_from)
    change = sum(float((upload[k].double() - trained_from[k].double()).square().sum()) for k in trained_from)
    return (gap / change) ** 0.5 if change > 0 else (0.0 if gap == 0 else float("inf"))


class ReplayingExecutor:
    """Trains each distinct job once; an identical job of a later strategy gets a copy of the same upload.

    With ``store`` the trained uploads are also kept on disk (one weights file + one JSON per job key), so a
    resumed benchmark, or the default run after a ``--quick`` one, replays them instead of training again.
    With ``replay_uploads`` a job is identified without its start weights (module docstring): a replayed job
    whose start differs gets the cached change laid onto its own start, and ``start_gaps`` records the gap.
    """

    def __init__(self, inner: Callable[[Mapping[str, SiteJob], float], Mapping[str, Any]],
                 store: Path | None = None, replay_uploads: bool = False) -> None:
        self.inner = inner
        self.store = store
        self.replay_uploads = replay_uploads
        self.key = job_slot if replay_uploads else job_key
        self.cache: dict[str, SiteResult] = {}
        self.starts: dict[str, Tensors] = {}  # upload replay: the start each cached upload was trained from
        self.trained = self.replayed = 0
        self.replayed_s = 0.0  # training time that replays stood in for (charged to the replaying strategy)
        self.start_gaps: list[float] = []  # upload replay: relative_gap of every replayed job

    def _files(self, key: str) -> dict[str, Path]:
        names = {"json": f"{key}.json", "weights": f"{key}.safetensors"}
        if self.replay_uploads:
            names["start"] = f"{key}.start.safetensors"
        return {part: self.store / name for part, name in names.items()} if self.store else {}

    def _stored(self, key: str) -> SiteResult | None:
        files = self._files(key)
        if key not in self.cache and files and all(f.is_file() for f in files.values()):
            record = json.loads(files["json"].read_text())
            weights, _ = load_weights(files["weights"])
            if "start" in files:
                self.starts[key], _ = load_weights(files["start"])
            self.cache[key] = SiteResult(record["site"], record["round"], record["task"], weights,
                                         record["metrics"], record["seconds"])
        return self.cache.get(key)

    def _keep(self, key: str, job: SiteJob, result: SiteResult) -> None:
        self.cache[key] = result
        if self.replay_uploads:
            self.starts[key] = {k: v.clone() for k, v in job.weights.items()}
        files = self._files(key)
        if files:  # weights first: a JSON without its weights files is never written
            save_weights(files["weights"], result.weights, {"job": key})
            if "start" in files:
                save_weights(files["start"], self.starts[key], {"job": key})
            atomic_write_json(files["json"], {"site": result.site, "round": result.round, "task": result.task,
                                              "metrics": result.metrics, "seconds": result.seconds})

    def _replay(self, key: str, job: SiteJob) -> SiteResult:
        cached = self.cache[key]
        weights = {k: v.clone() for k, v in cached.weights.items()}
        if self.replay_uploads:
            trained_from = self.starts[key]
            self.start_gaps.append(relative_gap(job.weights, trained_from, cached.weights))
            # a tensor sent exactly as before keeps the upload's exact bytes (start + (upload − start) would round)
            weights = {k: v if k not in trained_from or torch.equal(job.weights[k], trained_from[k])
                       else job.weights[k] + (v - trained_from[k]) for k, v in weights.items()}
        return replace(cached, weights=weights, metrics=dict(cached.metrics))

    def __call__(self, jobs: Mapping[str, SiteJob], deadline_s: float) -> dict[str, Any]:
        keys = {site: self.key(job) for site, job in jobs.items()}
        fresh_jobs = {site: job for site, job in jobs.items() if self._stored(keys[site]) is None}
        fresh = dict(self.inner(fresh_jobs, deadline_s)) if fresh_jobs else {}
        results: dict[str, Any] = {}
        for site, job in jobs.items():
            if site in fresh_jobs:
                result = fresh.get(site, "no answer")
                if isinstance(result, SiteResult):
                    self._keep(keys[site], job, result)
                    self.trained += 1
                results[site] = result
                continue
            self.replayed += 1
            self.replayed_s += self.cache[keys[site]].seconds
            results[site] = self._replay(keys[site], job)
        return results


def plan_for(plan: FederationPlan, strategy: str, iterations_per_epoch: int | None = None,
             seed: int | None = None) -> FederationPlan:
    """The benchmark plan with another strategy (and optionally other iterations per epoch / another seed).

    FedDAH and its ablations keep the plan's FedDAH parameters (e.g. the CPU plan's ``rank``); every other
    strategy gets its defaults."""
    data = plan.to_json()
    family = plan.strategy.name in ("feddah", *FEDDAH_ABLATIONS) and strategy in ("feddah", *FEDDAH_ABLATIONS)
    data["strategy"] = {"name": strategy, "params": dict(plan.strategy.params) if family else {}}
    if iterations_per_epoch is not None:
        data["local"]["iterations_per_epoch"] = int(iterations_per_epoch)
    if seed is not None:
        data["seed"] = int(seed)
    return parse_plan(data, f"{plan.source} [{strategy}, seed {data['seed']}]")
