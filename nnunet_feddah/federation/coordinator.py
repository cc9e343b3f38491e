"""The engine-agnostic round loop: whom to send what, which uploads to accept, update, checkpoint.

No Flower and no nnU-Net here: a round is ``jobs(r)`` → an *executor* (in-process sites for tests,
Flower messages in production) → ``apply(r, jobs, results)``. The order inside ``apply`` is what makes
a crash harmless: every upload is validated before the strategy sees any of them, the strategy is
updated in memory, and only the atomic commit of ``checkpoint.json`` makes the round count. A
coordinator restarted from the state folder resumes after the last committed round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.jobs import SiteJob, SiteResult
from nnunet_feddah.federation.plan import FederationPlan, check_same_plan, plan_hash, plan_identity
from nnunet_feddah.federation.upload_checks import (
    DEFAULT_MAX_RELATIVE_CHANGE,
    UploadRejected,
    measured,
    validate_upload,
)
from nnunet_feddah.method.aggregate import change_lost
from nnunet_feddah.method.registry import make_strategy
from nnunet_feddah.method.strategy import Strategy, Upload

DEFAULT_ROUND_ATTEMPTS = 3  # a round in which every site failed is tried this often before the run stops


Executor = Callable[[Mapping[str, SiteJob], float], Mapping[str, "SiteResult | BaseException | str"]]


class RoundFailed(FedDAHError, RuntimeError):
    """A round in which no upload was accepted: nothing is committed, the round is tried again or the run stops."""

    def __init__(self, summary: RoundSummary) -> None:
        self.summary = summary
        reasons = "; ".join(f"{site}: {line.get('reason', line['status'])}" for site, line in summary.sites.items())
        super().__init__(f"round {summary.round}: no upload was accepted ({reasons})")


@dataclass
class RoundSummary:
    round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    update_s: float = 0.0
    checkpoint_s: float = 0.0
    seconds: float = 0.0
    strategy: dict[str, Any] = field(default_factory=dict)  # the strategy's notes on the update

    def to_json(self) -> dict[str, Any]:
        out = {"round": self.round, "sites": self.sites, "update_s": self.update_s,
               "checkpoint_s": self.checkpoint_s, "seconds": self.seconds}
        return {**out, "strategy": self.strategy} if self.strategy else out


class Coordinator:
    """Owns the strategy and the state folder; drives rounds through any executor."""

    def __init__(self, plan: FederationPlan, state_dir: Path, strategy: Strategy, fingerprint: str,
                 log: Callable[[str], None] = print, max_relative_change: float = DEFAULT_MAX_RELATIVE_CHANGE,
                 history: list[dict[str, Any]] | None = None, last_round: int = 0,
                 training_cases: Mapping[str, int] | None = None,
                 round_attempts: int = DEFAULT_ROUND_ATTEMPTS) -> None:
        self.plan, self.state_dir, self.strategy, self.fingerprint = plan, Path(state_dir), strategy, fingerprint
        self.log, self.max_relative_change = log, max_relative_change
        self.history = history or []
        self.last_round = last_round
        self.training_cases = dict(training_cases or {})  # site -> training cases its dataset declares
        self.round_attempts = round_attempts
        self.before_commit: Callable[[], None] | None = None  # test hook: runs between update and commit
        self.mid_commit: Callable[[], None] | None = None  # test hook: runs inside the commit

    @classmethod
    def open(cls, plan: FederationPlan, state_dir: Path | str, base: Mapping[str, torch.Tensor],
             is_head: Callable[[str], bool], fingerprint: str, log: Callable[[str], None] = print,
             max_relative_change: float = DEFAULT_MAX_RELATIVE_CHANGE, **limits: Any) -> Coordinator:
        """A fresh coordinator, or the one committed in ``state_dir`` (resume).

        ``limits``: ``training_cases`` (site -> the training cases its dataset declares, the bound on an
        upload's ``num_training_cases``) and ``round_attempts``.
        """
        state_dir = Path(state_dir)
        committed = checkpoint.read_committed(state_dir)
        if committed is None:
            strategy = make_strategy(plan.strategy.name, plan.strategy.params, base, is_head)
            return cls(plan, state_dir, strategy, fingerprint, log, max_relative_change, **limits)
        check_same_plan(committed.record, plan, str(committed.path))
        committed.require_fingerprint(fingerprint, f"the sites' plans give {fingerprint}")
        strategy = committed.load_strategy(is_head)
        log(f"resuming {plan.name} after committed round {committed.round} from {state_dir}")
        # counts registered by earlier uploads stay; a count given now (fingerprint round, dataset.json, the
        # operator's --training-cases) is the coordinator's own record and takes precedence
        registered = {**(committed.record.get("training_cases") or {}), **(limits.pop("training_cases", None) or {})}
        return cls(plan, state_dir, strategy, fingerprint, log, max_relative_change, committed.history,
                   committed.round, training_cases=registered, **limits)

    def _register_cases(self, site: str, claimed: int) -> None:
        """A site without a recorded case count registers the count of its first accepted upload; later
        claims are bounded by it (:func:`validate_upload`), and only the operator can raise it."""
        if site not in self.training_cases:
            self.training_cases[site] = int(claimed)
            self.log(f"{site}: registered {claimed} training cases (its first accepted upload; no fingerprint round "
                     f"or dataset.json on this host gave a count). Later uploads may claim at most this; to change "
                     f"it, run the coordinator with --training-cases {site}=N")

    @property
    def next_round(self) -> int:
        return self.last_round + 1

    @property
    def finished(self) -> bool:
        return self.last_round >= self.plan.total_rounds

    def jobs(self, round_index: int) -> dict[str, SiteJob]:
        """One job per site that trains in this round (new tasks are allocated here)."""
        jobs = {}
        for site, task in self.plan.active_sites(round_index).items():
            organs = list(task.labels)
            weights = self.strategy.weights_for(site, task.key, organs, round_index)
            jobs[site] = SiteJob(site, round_index, task.key, organs, self.plan.site_step(site, round_index),
                                 self.plan.round_settings(site, round_index), weights)
        return jobs

    def apply(self, round_index: int, jobs: Mapping[str, SiteJob],
              results: Mapping[str, SiteResult | BaseException | str], started: float | None = None) -> RoundSummary:
        """Validate, update, commit. Rejected or missing uploads are logged and leave no trace in the state.

        A round with jobs but no accepted upload raises :class:`RoundFailed` before anything is updated or
        committed: it did not happen, so the state stays resumable at this round once the cause is fixed.
        """
        started = time.perf_counter() if started is None else started
        summary = RoundSummary(round_index)
        accepted: list[tuple[SiteJob, SiteResult]] = []
        for site, job in jobs.items():
            result = results.get(site, "no answer before the round deadline")
            line = {"task": job.task, "step": job.step + 1, "steps": len(self.plan.site(site).stream)}
            try:
                if not isinstance(result, SiteResult):
                    raise UploadRejected(f"site failed: {result}")
                validate_upload(job, result, self.max_relative_change, self.training_cases.get(site))
                accepted.append((job, result))
                self._register_cases(site, result.metrics["num_training_cases"])
                line.update(status="accepted", mean_dice=measured(result.metrics.get("mean_dice")),
                            dice={k: measured(v) for k, v in (result.metrics.get("dice") or {}).items()},
                            train_loss=result.metrics.get("train_loss"),
                            seconds=result.seconds)
            except UploadRejected as exc:
                line.update(status="rejected", reason=str(exc))
            summary.sites[site] = line
        if jobs and not accepted:
            raise RoundFailed(summary)
        start = time.perf_counter()
        uploads = [Upload(r.site, r.task, j.organs, r.weights, r.metrics["num_training_cases"],
                          (r.metrics.get("predictive_js") or {}).get("all")) for j, r in accepted]
        reports = self.strategy.update(uploads, round_index) if uploads else []
        for (job, result), report in zip(accepted, reports, strict=True):
            kept = dict(report)  # the strategy decides what its report records (Strategy.update)
            # the share of this site's own change the weights sent next lack (averaging and W_s included)
            kept["site_change_lost"] = change_lost(job.weights, result.weights, self.strategy.task_weights(job.task))
            summary.sites[job.site]["update"] = kept
        summary.strategy = self.strategy.update_notes() if uploads else {}
        summary.update_s = time.perf_counter() - start
        if self.before_commit is not None:
            self.before_commit()
        start = time.perf_counter()
        summary.seconds = start - started
        self.history.append(summary.to_json())
        record = {"plan": self.plan.name, "plan_hash": plan_hash(self.plan),
                  "plan_identity": plan_identity(self.plan), "history": self.history,
                  "training_cases": dict(self.training_cases),
                  "site_steps": {s: self.plan.site_step(s, round_index) for s in self.plan.site_names}}
        try:
            checkpoint.commit(self.state_dir, round_index, self.strategy, self.fingerprint, record, self.mid_commit,
                              snapshot=round_index in self.plan.time_steps)
        except BaseException:
            self.history.pop()
            raise
        summary.checkpoint_s = time.perf_counter() - start
        self.history[-1]["checkpoint_s"] = summary.checkpoint_s
        self.last_round = round_index
        self._print_round(summary)
        return summary

    def run(self, execute: Executor) -> list[dict[str, Any]]:
        """Run every remaining round; returns the full round history.

        A round nobody could complete is tried ``round_attempts`` times; then :class:`RoundFailed` (naming every
        site's error) ends the run with the state still at the last committed round.
        """
        attempt = 1
        while not self.finished:
            round_index = self.next_round
            started = time.perf_counter()
            jobs = self.jobs(round_index)
            results = execute(jobs, self.plan.round_deadline_s) if jobs else {}
            try:
                self.apply(round_index, jobs, results, started)
            except RoundFailed as exc:
                self.log(f"round {round_index}/{self.plan.total_rounds} NOT committed (attempt {attempt}/"
                         f"{self.round_attempts}): {exc}")
                if attempt >= self.round_attempts:
                    raise
                attempt += 1
                continue
            attempt = 1
        self.log(final_table(self.history))
        return self.history

    def _print_round(self, summary: RoundSummary) -> None:
        total = self.plan.total_rounds
        for site, line in summary.sites.items():
            if line["status"] == "accepted":
                dice = " ".join(f"{k}={v:.3f}" for k, v in (line.get("dice") or {}).items() if v is not None)
                loss = line.get("train_loss")
                update = line.get("update", {})
                lost = f" update lost {update['update_lost']:.4f}" if "update_lost" in update else ""
                if update.get("similarity") is not None:  # a new source of a task with history: W_s held some back
                    lost += f", W_s {update['similarity']:.2f} ({update['ws_measure']})"
                self.log(f"round {summary.round}/{total} {site:<8} step {line['step']}/{line['steps']} "
                         f"{line['task']:<16} dice {dice or '-'} loss {loss:.3f} {line.get('seconds', 0):.1f}s{lost}")
            else:
                self.log(f"round {summary.round}/{total} {site:<8} step {line['step']}/{line['steps']} "
                         f"{line['task']:<16} REJECTED: {line['reason']}")
        for event in summary.strategy.get("compressed", []):
            form = f"{event['bits']}-bit remainder" if event.get("bits") else "remainder dropped"
            self.log(f"round {summary.round}/{total} {event['task']} went idle: compressed ({form}), "
                     f"{event['lost_of_delta']:.1%} of its change from the base lost")
        accepted = sum(1 for v in summary.sites.values() if v["status"] == "accepted")
        self.log(f"round {summary.round}/{total} done: {accepted}/{len(summary.sites)} uploads accepted, "
                 f"update {summary.update_s:.1f}s, checkpoint {summary.checkpoint_s:.1f}s, "
                 f"round {summary.seconds + summary.checkpoint_s:.1f}s")


def final_table(history: list[dict[str, Any]]) -> str:
    """Last accepted Dice per task and site, as a small text table."""
    last: dict[tuple[str, str], tuple[int, Any]] = {}
    for entry in history:
        for site, line in entry["sites"].items():
            if line["status"] == "accepted":
                last[(line["task"], site)] = (entry["round"], line.get("mean_dice"))
    rows = ["task             site      round  mean Dice"]
    for (task, site), (round_index, dice) in sorted(last.items()):
        rows.append(f"{task:<16} {site:<8} {round_index:>6}  {dice if dice is None else f'{dice:.3f}'}")
    return "\n".join(rows)
