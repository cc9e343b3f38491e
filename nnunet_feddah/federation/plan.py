"""The federation plan: which site learns which organ task when, for how long, under which server strategy.

A FedDAH run is long and spread over several machines, so everything that decides *what happens* is one
small JSON file read before anything starts: the sites and their nnU-Net datasets, each site's ordered
*stream* of tasks (sites learn in their own order and may join late), rounds per time step, the local
nnU-Net training budget, the round deadline and the server strategy with its hyper-parameters.

This module is the plan *model* and its schedule (who trains what in which round). Reading and checking
a plan file is :mod:`.plan_reader`; checking the sites' data against it is :mod:`.site_data`. It imports
only the standard library and the base modules, so a coordinator reads a plan without nnU-Net's start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.organs import Task
from nnunet_feddah.paths import NNUNET_DIR_VARS

DEFAULT_ROUND_DEADLINE_S = 3600.0


SiteRef = Union[str, "SitePlan"]


class FederationPlanError(FedDAHError, ValueError):
    """A plan (or the data it points to) that cannot run; ``problems`` lists every one found."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"federation plan {source}: {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class LocalTraining:
    """A site's nnU-Net training per round; field names match :class:`nnunet_feddah.nnunet.round_config.RoundConfig`."""

    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int = 2
    initial_lr: float = 1e-2
    max_validation_cases: int | None = None
    device_augmentation: bool = False  # nnU-Net's augmentation on the training device (docs/AUGMENTATION.md)
    optimizer: str = "sgd"  # "sgd" (nnU-Net's default) or "adamw" (nnU-Net's nnUNetTrainerAdam recipe)
    lr_schedule: str = "federation"  # "federation": one poly curve over the site's stream; "per-task": one per task
    cpu_precision: str = "float32"  # "bfloat16": bfloat16 autocast when a site trains on a CPU that has it


@dataclass(frozen=True)
class StrategySpec:
    """Server strategy name plus its free-form hyper-parameters (beta, code_dim, rank, ...)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class FingerprintRound:
    """Where the shared nnU-Net plans come from when none exist yet: a fingerprint round before round 1.

    Every site sends nnU-Net fingerprint statistics of its raw training cases (no voxel leaves it), the
    coordinator merges them and fills ``template`` (a bundled name or a path) with nnU-Net's CT normalisation
    and median spacing from the merged fingerprint, and every site installs the result
    (:mod:`nnunet_feddah.federation.plans_round`). ``min_count``: the sites' histogram guard (None: the
    sites' default).
    """

    template: str
    min_count: int | None = None


@dataclass(frozen=True)
class SitePlan:
    """One site: its dataset, its task stream and when it joins. ``rounds_per_step`` is already resolved."""

    name: str
    dataset: int | str
    stream: tuple[Task, ...]
    rounds_per_step: int
    join_round: int = 1
    nnunet_root: Path | None = None  # None: the nnUNet_* environment variables

    @property
    def last_round(self) -> int:
        """The last round in which this site trains (its stream is finished afterwards)."""
        return self.join_round - 1 + len(self.stream) * self.rounds_per_step

    def step_at(self, round_number: int) -> int | None:
        """0-based index into ``stream`` trained in a round, or None before joining / after finishing."""
        offset = _check_round(round_number) - self.join_round
        if offset < 0:
            return None
        step = offset // self.rounds_per_step
        return step if step < len(self.stream) else None

    def rounds_trained_before(self, round_number: int) -> int:
        return max(0, min(_check_round(round_number) - self.join_round, len(self.stream) * self.rounds_per_step))


@dataclass(frozen=True)
class FederationPlan:
    """The whole federation; build it with :func:`load_plan` / :func:`parse_plan`, never by hand."""

    name: str
    plans_identifier: str
    sites: tuple[SitePlan, ...]
    rounds_per_step: int
    local: LocalTraining
    strategy: StrategySpec
    total_epochs: int
    round_epochs: Mapping[int, int] = field(default_factory=dict, hash=False)  # round -> local epochs (override)
    round_deadline_s: float = DEFAULT_ROUND_DEADLINE_S
    seed: int = 0
    nnunet_root: Path | None = None
    fingerprint_round: FingerprintRound | None = None  # None: the sites' plans are installed beforehand
    source: str = field(default="<in-memory>", compare=False)

    # --- schedule -------------------------------------------------------------------------------------
    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def site(self, site: SiteRef) -> SitePlan:
        """A site by name (or the SitePlan itself), with an error listing the plan's sites."""
        if isinstance(site, SitePlan):
            return site
        for s in self.sites:
            if s.name == site:
                return s
        raise ValueError(f"federation plan {self.source}: unknown site {site!r}; sites: {list(self.site_names)}")

    @property
    def total_rounds(self) -> int:
        """Rounds until the last stream is finished: max over sites of join_round-1 + len(stream)*rounds_per_step."""
        return max(s.last_round for s in self.sites)

    def site_step(self, site: SiteRef, round_number: int) -> int | None:
        """0-based step of the site's stream in round ``round_number`` (1-based), None when it is idle."""
        return self.site(site).step_at(round_number)

    def task_for(self, site: SiteRef, round_number: int) -> Task | None:
        """The task a site trains in a round, or None when it has not joined yet / has finished its stream."""
        s = self.site(site)
        step = s.step_at(round_number)
        return None if step is None else s.stream[step]

    def active_sites(self, round_number: int) -> dict[str, Task]:
        """``{site: task}`` for every site that trains in this round, in plan order."""
        out: dict[str, Task] = {}
        for s in self.sites:
            task = self.task_for(s, round_number)
            if task is not None:
                out[s.name] = task
        return out

    @property
    def tasks(self) -> tuple[Task, ...]:
        """Every distinct task, in the order the federation first meets it (round, then plan order)."""
        return self.tasks_trained_by(self.total_rounds)

    @property
    def time_steps(self) -> tuple[int, ...]:
        """Rounds that close a time step: some site finishes a task of its stream in that round.

        The federation's clock for evaluation (Dice matrix columns): after each of these rounds every
        task seen so far is evaluated. With one shared ``rounds_per_step`` and no late joiners these are
        simply ``rps, 2·rps, …``; a late joiner adds the rounds where its own steps end.
        """
        ends = {s.join_round - 1 + (k + 1) * s.rounds_per_step for s in self.sites for k in range(len(s.stream))}
        return tuple(sorted(ends))

    def tasks_trained_by(self, round_number: int) -> tuple[Task, ...]:
        """Tasks some site has trained in rounds ``1..round_number``, in the order they were first met."""
        seen: dict[str, Task] = {}
        for r in range(1, min(round_number, self.total_rounds) + 1):
            for task in self.active_sites(r).values():
                seen.setdefault(task.key, task)
        return tuple(seen.values())

    def last_trained_round(self, task: Task | str, up_to: int) -> int | None:
        """The latest round ≤ ``up_to`` in which any site trained ``task`` (None: not yet)."""
        key = task if isinstance(task, str) else task.key
        rounds = [r for r in range(1, min(up_to, self.total_rounds) + 1)
                  if any(t.key == key for t in self.active_sites(r).values())]
        return rounds[-1] if rounds else None

    def epochs_in(self, round_number: int) -> int:
        """Local epochs of every site that trains in a round: ``round_epochs`` where it names the round,
        else ``local.epochs`` (a long first round that every strategy shares, short rounds after it)."""
        return self.round_epochs.get(_check_round(round_number), self.local.epochs)

    def _epochs_over(self, first_round: int, stop_round: int) -> int:
        return sum(self.epochs_in(r) for r in range(first_round, stop_round))

    def site_epochs(self, site: SiteRef) -> int:
        """Local epochs a site trains over its whole stream."""
        s = self.site(site)
        return self._epochs_over(s.join_round, s.last_round + 1)

    def global_epoch_offset(self, site: SiteRef, round_number: int) -> int:
        """Local epochs the site has trained before this round, so the poly LR continues across rounds."""
        s = self.site(site)
        return self._epochs_over(s.join_round, s.join_round + s.rounds_trained_before(round_number))

    def lr_position(self, site: SiteRef, round_number: int) -> tuple[int, int]:
        """``(epoch_offset, total_epochs)`` of a round on its poly learning-rate curve.

        ``federation``: one curve over the site's whole stream (a second task starts part-way down it);
        ``per-task``: every task of the stream gets its own curve over its ``rounds_per_step`` rounds, so a
        new task starts at ``initial_lr`` again (see docs/TRAINER.md for the measurement behind the choice).
        """
        s = self.site(site)
        if self.local.lr_schedule == "per-task":
            done = s.rounds_trained_before(round_number) % s.rounds_per_step
            step_start = s.join_round + s.rounds_trained_before(round_number) - done
            return (self._epochs_over(step_start, step_start + done),
                    self._epochs_over(step_start, step_start + s.rounds_per_step))
        return self.global_epoch_offset(s, round_number), self.total_epochs

    def round_settings(self, site: SiteRef, round_number: int) -> dict[str, Any] | None:
        """The plan's part of a site's :class:`RoundConfig` for one round (None when the site is idle).

        The seed differs per round and site so that nnU-Net's patch sampling and augmentation do not
        replay the same batches every round, while the whole run stays reproducible from ``seed``.
        """
        s = self.site(site)
        task = self.task_for(s, round_number)
        if task is None:
            return None
        local = asdict(self.local)
        del local["lr_schedule"]  # the plan's choice; the round gets its position on the curve
        offset, total = self.lr_position(s, round_number)
        return {
            "task": task.key,
            **local,
            "epochs": self.epochs_in(round_number),
            "epoch_offset": offset,
            "total_epochs": total,
            "seed": self.seed + 1000 * round_number + self.sites.index(s),
        }

    def nnunet_folders(self, site: SiteRef) -> dict[str, Path]:
        """The site's nnU-Net folders: under its ``nnunet_root``, else from the nnUNet_* environment variables."""
        s = self.site(site)
        if s.nnunet_root is not None:
            return {name: s.nnunet_root / name for name in NNUNET_DIR_VARS}
        missing = [n for n in NNUNET_DIR_VARS[:2] if not os.environ.get(n)]
        if missing:
            raise FederationPlanError(self.source, [
                f"{self.source}: sites[{self.sites.index(s)}] ({s.name}): no 'nnunet_root' and environment "
                f"variable(s) {', '.join(missing)} not set. Fix: add \"nnunet_root\" to the site or the plan, or "
                f"eval \"$(nnfeddah env --root <work folder>)\""])
        return {n: Path(os.environ[n]) for n in NNUNET_DIR_VARS if os.environ.get(n)}

    # --- serialisation --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The fully resolved plan (defaults filled in, absolute paths): loadable again with :func:`parse_plan`."""
        out: dict[str, Any] = {"name": self.name, "plans_identifier": self.plans_identifier}
        if self.nnunet_root is not None:
            out["nnunet_root"] = str(self.nnunet_root)
        sites = []
        for s in self.sites:
            entry: dict[str, Any] = {"name": s.name, "dataset": s.dataset, "stream": [t.key for t in s.stream],
                                     "join_round": s.join_round, "rounds_per_step": s.rounds_per_step}
            if s.nnunet_root is not None:
                entry["nnunet_root"] = str(s.nnunet_root)
            sites.append(entry)
        out.update({
            "sites": sites,
            "rounds_per_step": self.rounds_per_step,
            "local": _local_json(self.local),
            **({"round_epochs": {str(r): e for r, e in sorted(self.round_epochs.items())}} if self.round_epochs else {}),
            "round_deadline_s": self.round_deadline_s,
            "strategy": {"name": self.strategy.name, "params": dict(self.strategy.params)},
            "seed": self.seed,
            "total_epochs": self.total_epochs,
        })
        if self.fingerprint_round is not None:  # left out when unset, so older plans keep their plan hash
            out["fingerprint_round"] = {k: v for k, v in asdict(self.fingerprint_round).items() if v is not None}
        return out


def _local_json(local: LocalTraining) -> dict[str, Any]:
    """The local section; options left at their defaults are left out so older plans keep their plan hash."""
    out = asdict(local)
    for name, default in (("device_augmentation", False), ("optimizer", "sgd"), ("lr_schedule", "federation"),
                          ("cpu_precision", "float32")):
        if out[name] == default:
            del out[name]
    return out


def _check_round(round_number: int) -> int:
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
        raise ValueError(f"round numbers are integers >= 1 (1-based), got {round_number!r}")
    return round_number


# ---------------------------------------------------------------------------------------------- identity
#: Where the sites' data lie and how long a round may wait: an operator may change them on resume.
OPERATIONAL_FIELDS = ("nnunet_root", "round_deadline_s")


def plan_identity(plan: FederationPlan) -> dict[str, Any]:
    """What a state folder's rounds depend on: the plan without its :data:`OPERATIONAL_FIELDS`."""
    out = {k: v for k, v in plan.to_json().items() if k not in OPERATIONAL_FIELDS}
    out["sites"] = [{k: v for k, v in s.items() if k not in OPERATIONAL_FIELDS} for s in out["sites"]]
    return out


def plan_hash(plan: FederationPlan) -> str:
    """Identity of a plan's content, so a state folder is never resumed under another plan."""
    return _digest(plan_identity(plan))


def _digest(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def plan_changes(before: Any, after: Any, where: str = "") -> list[str]:
    """The fields in which two plan identities differ, as ``field: before -> after`` lines."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        return [line for key in dict.fromkeys([*before, *after])
                for line in plan_changes(before.get(key, "(absent)"), after.get(key, "(absent)"),
                                         f"{where}.{key}" if where else str(key))]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [line for i, (b, a) in enumerate(zip(before, after, strict=True))
                for line in plan_changes(b, a, f"{where}[{i}]")]
    return [] if before == after else [f"{where}: {json.dumps(before)} -> {json.dumps(after)}"]


def check_same_plan(record: Mapping[str, Any], plan: FederationPlan, where: str) -> None:
    """Refuse a state committed under another plan, naming the fields that changed and what to do.

    A record written before operational fields were left out of the identity carries the hash of the whole
    plan; it still matches the plan it was run with."""
    if record.get("plan_hash") in (plan_hash(plan), _digest(plan.to_json())):
        return
    changed = plan_changes(record["plan_identity"], plan_identity(plan)) if "plan_identity" in record else []
    detail = ("; ".join(changed[:5]) + (f" (and {len(changed) - 5} more)" if len(changed) > 5 else "")
              if changed else "the record predates plan identities, so the changed field cannot be named")
    raise FederationPlanError(plan.source, [
        f"{where} was committed under another plan (field 'plan_hash' {record.get('plan_hash')}, this plan "
        f"{plan_hash(plan)}): {detail}. Fix: resume with the plan that started it (only "
        f"{', '.join(OPERATIONAL_FIELDS)} may change on resume), or start the changed plan in a new --state folder"])
