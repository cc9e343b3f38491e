"""The engine-agnostic round loop: whom to send what, which uploads to accept, update, checkpoint.

No Flower and no nnU-Net here: a round is ``jobs(r)`` → an *executor* (in-process sites for tests,
Flower messages in production) → ``apply(r, jobs, results)``. The order inside ``apply`` is what makes
a crash harmless: every upload is validated before the strategy sees any of them, the strategy is
updated in memory, and only the atomic commit of ``checkpoint.json`` makes the round count. A
coordinator restarted from the state folder resumes after the last committed round.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.plan import FederationPlan, check_same_plan, plan_hash, plan_identity
from nnunet_feddah.method.aggregate import change_lost, norm
from nnunet_feddah.method.registry import make_strategy
from nnunet_feddah.method.strategy import Strategy, Tensors, Upload
from nnunet_feddah.organs import BY_LABEL
from nnunet_feddah.tensor_checks import non_finite, shape_mismatches

# Sanity bounds on an upload, not a Byzantine defence: they sit between what honest training was measured to do
# and the corruptions tests/test_faults.py sends. Measured 2026-12-06 on the phantom benchmark (bfloat16 CPU plan,
# AdamW 3e-3): a 600-iteration first round from nnU-Net's initialisation moves the weights by 0.87-0.98 (relative
# L2) and grows their norm 1.33-1.40x with the per-task LR schedule, and by up to 1.10 and 1.49x with the
# federation-wide one; later rounds (from a trained start) move them 0.2-0.6. Replacing every tensor by an
# unrelated one of the same norm moves the weights by ~1.41 (orthogonal directions); scaling them by 1.99 moves
# them by 0.99 at a norm ratio of 1.99. Until that measurement the bounds were 1.0 and 1.5, which rejected honest
# first rounds under the federation-wide schedule.
DEFAULT_MAX_RELATIVE_CHANGE = 1.25
DEFAULT_ROUND_ATTEMPTS = 3  # a round in which every site failed is tried this often before the run stops
# An upload's weight norm may differ from what was sent by at most this factor either way.
NORM_RATIO_BOUND = 1.75
# An upload's metrics, as JSON: an honest site's are ≈ 2-6 kB (per-epoch loss and LR lists, a few cases) and
# 3 levels deep; the bounds leave room for 1000-epoch rounds and refuse a metrics object that would grow
# checkpoint.json (a 100,000-key `dice` made it 5.4 MB) or exhaust the JSON encoder.
MAX_METRICS_BYTES = 1 << 20
MAX_METRICS_DEPTH = 8


@dataclass
class SiteJob:
    """What one site is asked to do in one round."""

    site: str
    round: int
    task: str
    organs: list[int]
    step: int
    settings: dict[str, Any]
    weights: Tensors


@dataclass
class SiteResult:
    """What a site sent back: trained unique tensors and the trainer's metrics."""

    site: str
    round: int
    task: str
    weights: Tensors
    metrics: dict[str, Any]
    seconds: float = 0.0


class UploadRejected(FedDAHError, ValueError):
    """An upload that must not touch the strategy; the message is the logged reason."""


Executor = Callable[[Mapping[str, SiteJob], float], Mapping[str, "SiteResult | BaseException | str"]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(value: Any, field: str, allow_nan: bool = True) -> None:
    """A value in [0, 1] or null; NaN only where it means "not measured" (a Dice of an absent organ)."""
    if value is not None and not (_is_number(value) and ((allow_nan and math.isnan(value)) or 0 <= value <= 1)):
        raise UploadRejected(f"metrics field '{field}' is {value!r}, expected a{'' if allow_nan else ' finite'} "
                             f"value in [0, 1] (or null)")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counted no further than ``limit + 1``."""
    if limit < 0 or not isinstance(value, (Mapping, list, tuple)):
        return 0
    children = value.values() if isinstance(value, Mapping) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def measured(value: Any) -> float | None:
    """A validated Dice as the state records it: NaN ("not measured") becomes null, which JSON can hold."""
    return float(value) if _is_number(value) and math.isfinite(value) else None


def validate_metrics(metrics: Any, max_training_cases: int | None = None,
                     organ_keys: Collection[str] | None = None) -> None:
    """Every metric the coordinator reads, stores or weights by, typed and bounded (a site is not trusted).

    ``organ_keys``: the organs of the task the site was sent; ``dice`` may name no other."""
    if not isinstance(metrics, Mapping):
        raise UploadRejected(f"metrics must be a JSON object, got {type(metrics).__name__}")
    if _depth(metrics, MAX_METRICS_DEPTH) > MAX_METRICS_DEPTH:
        raise UploadRejected(f"metrics are nested deeper than {MAX_METRICS_DEPTH} levels")
    try:
        size = len(json.dumps(metrics))
    except (TypeError, ValueError) as exc:
        raise UploadRejected(f"metrics are not plain JSON ({exc})") from None
    if size > MAX_METRICS_BYTES:
        raise UploadRejected(f"metrics are {size} bytes as JSON, more than the {MAX_METRICS_BYTES} allowed")
    loss = metrics.get("train_loss")
    if not _is_number(loss) or not math.isfinite(loss):
        raise UploadRejected(f"metrics field 'train_loss' is {loss!r}, expected a finite number")
    iterations = metrics.get("iterations")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise UploadRejected(f"metrics field 'iterations' is {iterations!r}, expected an integer ≥ 1")
    cases = metrics.get("num_training_cases")
    if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
        raise UploadRejected(f"metrics field 'num_training_cases' is {cases!r}, expected an integer ≥ 1")
    if max_training_cases is not None and cases > max_training_cases:
        raise UploadRejected(f"metrics field 'num_training_cases' is {cases}, but the site's dataset declares only "
                             f"{max_training_cases} training cases")
    dice = metrics.get("dice")
    if dice is not None and not isinstance(dice, Mapping):
        raise UploadRejected(f"metrics field 'dice' is {dice!r}, expected an object organ -> Dice")
    unknown = [k for k in (dice or {}) if organ_keys is not None and k not in organ_keys]
    if unknown:
        raise UploadRejected(f"metrics field 'dice' names {len(unknown)} organ(s) outside the task "
                             f"({', '.join(map(repr, unknown[:3]))}); expected only {sorted(organ_keys or [])}")
    for organ, value in (dice or {}).items():
        _check_fraction(value, f"dice.{organ}")
    _check_fraction(metrics.get("mean_dice"), "mean_dice")
    js = metrics.get("predictive_js")
    if js is not None and not isinstance(js, Mapping):
        raise UploadRejected(f"metrics field 'predictive_js' is {js!r}, expected an object or null")
    for part in ("foreground", "all"):  # it steers W_s: a NaN is refused
        _check_fraction((js or {}).get(part), f"predictive_js.{part}", allow_nan=False)


def validate_upload(job: SiteJob, result: SiteResult, max_relative_change: float,
                    max_training_cases: int | None = None) -> None:
    """Raise :class:`UploadRejected` naming the problem; nothing is modified.

    The change bound has three parts: an upload may move the weights by at most ``max_relative_change``
    (relative L2); its norm must stay within :data:`NORM_RATIO_BOUND` of the norm sent (all-zero is a
    relative change of exactly 1 and weights x 1.99 one of 0.99: both pass the first part alone); and no
    tensor the coordinator sent non-zero may come back all zero.
    """
    if result.site != job.site or result.round != job.round or result.task != job.task:
        raise UploadRejected(f"answers site={result.site} round={result.round} task={result.task}, but "
                             f"{job.site} was sent round {job.round} task {job.task}")
    if not isinstance(result.weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in result.weights.values()):
        raise UploadRejected("weights are not a mapping of tensor name -> tensor")
    mismatches = shape_mismatches({k: tuple(v.shape) for k, v in job.weights.items()},
                                  {k: tuple(v.shape) for k, v in result.weights.items()})
    if mismatches:
        raise UploadRejected(f"tensor names/shapes differ from what was sent: {'; '.join(mismatches)}")
    wrong_dtype = [k for k, v in job.weights.items() if result.weights[k].dtype != v.dtype]
    if wrong_dtype:
        raise UploadRejected(f"tensor dtypes differ from what was sent: {wrong_dtype[:3]}")
    bad = non_finite(result.weights)
    if bad:
        raise UploadRejected(f"NaN/Inf in {bad[:3]}")
    change = norm({k: result.weights[k].double() - job.weights[k].double() for k in job.weights}) / max(
        norm(job.weights), 1e-12)
    if change > max_relative_change:
        raise UploadRejected(f"relative change {change:.3f} of the weights exceeds the bound {max_relative_change} "
                             f"(if the site trained honestly, e.g. a long first round from nnU-Net's initialisation, "
                             f"raise the coordinator's --max-relative-change)")
    ratio = norm(result.weights) / max(norm(job.weights), 1e-12)
    if not 1 / NORM_RATIO_BOUND <= ratio <= NORM_RATIO_BOUND:
        raise UploadRejected(f"the weights' norm is {ratio:.3f}× what was sent, outside [1/{NORM_RATIO_BOUND}, "
                             f"{NORM_RATIO_BOUND}] (a collapsed or scaled upload)")
    collapsed = [k for k, v in job.weights.items() if v.is_floating_point() and v.numel() > 1
                 and bool(v.abs().sum() > 0) and not bool(result.weights[k].abs().sum() > 0)]
    if collapsed:
        raise UploadRejected(f"{len(collapsed)} tensor(s) sent non-zero came back all zero (e.g. {collapsed[:3]})")
    if not _is_number(result.seconds) or not math.isfinite(result.seconds) or result.seconds < 0:
        raise UploadRejected(f"field 'seconds' is {result.seconds!r}, expected a finite number ≥ 0")
    validate_metrics(result.metrics, max_training_cases, [BY_LABEL[label].key for label in job.organs
                                                          if label in BY_LABEL])


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
        return cls(plan, state_dir, strategy, fingerprint, log, max_relative_change, committed.history,
                   committed.round, **limits)

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
            kept = {k: v for k, v in report.items() if k in (
                "seconds", "similarity", "fidelity_rel_l2", "upload_rel_l2", "rebased", "drift", "update_lost",
                "generator_lost", "case_weight", "keep", "contributions", "js_divergence", "predictive_js",
                "ws_measure")}
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
