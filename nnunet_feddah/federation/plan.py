"""The federation plan: which site learns which organ task when, for how long, under which server strategy.

A FedDAH run is long and spread over several machines, so everything that decides *what happens* is one
small JSON file read before anything starts: the sites and their nnU-Net datasets, each site's ordered
*stream* of tasks (sites learn in their own order and may join late), rounds per time step, the local
nnU-Net training budget, the round deadline and the server strategy with its hyper-parameters.

Loading checks the whole file and reports **every** problem at once, each naming the file, the field path
(``sites[2].stream[1]``) and the fix — a typo found after an hour of training is an hour lost.
:func:`validate_sites` then checks the data side (datasets, annotations, shared plans, identical
architecture) against the nnU-Net folders. This module imports only the standard library and
:mod:`nnunet_feddah.organs`, so a coordinator can read a plan without paying nnU-Net's start-up cost.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from nnunet_feddah.organs import ORGANS, TASK_GROUPS, Task, UnknownOrganError

# The paper's ablations are FedDAH with one switch forced (they may still take the other parameters).
FEDDAH_ABLATIONS: dict[str, dict[str, Any]] = {
    "feddah-noLR": {"beta": 0.0},  # no historical regulariser
    "feddah-noWs": {"similarity": "fixed"},  # W_s fixed instead of the JS similarity
    "feddah-noencoder": {"layer_encoder": False},  # no inter-layer consistency encoder
}
STRATEGIES = ("feddah", *FEDDAH_ABLATIONS, "fedavg", "fedavg-per-task", "local")
STRATEGY_ALIASES = {"fedavg_per_task": "fedavg-per-task"}  # spelling of plans and states written before 2026-11-28
NNUNET_DIRS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CONFIGURATION = "3d_fullres"
DEFAULT_ROUND_DEADLINE_S = 3600.0
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # site names become folder names
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_.-]+$")
_MISSING: Any = object()


def canonical_strategy(name: str) -> str:
    """The strategy's name as :data:`STRATEGIES` spells it (older spellings accepted)."""
    return STRATEGY_ALIASES.get(name, name)


SiteRef = Union[str, "SitePlan"]


class FederationPlanError(ValueError):
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


@dataclass(frozen=True)
class StrategySpec:
    """Server strategy name plus its free-form hyper-parameters (beta, code_dim, rank, ...)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)


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
    round_deadline_s: float = DEFAULT_ROUND_DEADLINE_S
    seed: int = 0
    nnunet_root: Path | None = None
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

    def global_epoch_offset(self, site: SiteRef, round_number: int) -> int:
        """Local epochs the site has trained before this round, so the poly LR continues across rounds."""
        return self.site(site).rounds_trained_before(round_number) * self.local.epochs

    def round_settings(self, site: SiteRef, round_number: int) -> dict[str, Any] | None:
        """The plan's part of a site's :class:`RoundConfig` for one round (None when the site is idle).

        The seed differs per round and site so that nnU-Net's patch sampling and augmentation do not
        replay the same batches every round, while the whole run stays reproducible from ``seed``.
        """
        s = self.site(site)
        task = self.task_for(s, round_number)
        if task is None:
            return None
        return {
            "task": task.key,
            **asdict(self.local),
            "epoch_offset": self.global_epoch_offset(s, round_number),
            "total_epochs": self.total_epochs,
            "seed": self.seed + 1000 * round_number + self.sites.index(s),
        }

    def nnunet_folders(self, site: SiteRef) -> dict[str, Path]:
        """The site's nnU-Net folders: under its ``nnunet_root``, else from the nnUNet_* environment variables."""
        s = self.site(site)
        if s.nnunet_root is not None:
            return {name: s.nnunet_root / name for name in NNUNET_DIRS}
        missing = [n for n in NNUNET_DIRS[:2] if not os.environ.get(n)]
        if missing:
            raise FederationPlanError(self.source, [
                f"{self.source}: sites[{self.sites.index(s)}] ({s.name}): no 'nnunet_root' and environment "
                f"variable(s) {', '.join(missing)} not set. Fix: add \"nnunet_root\" to the site or the plan, or "
                f"eval \"$(nnfeddah env --root <work folder>)\""])
        return {n: Path(os.environ[n]) for n in NNUNET_DIRS if os.environ.get(n)}

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
            "round_deadline_s": self.round_deadline_s,
            "strategy": {"name": self.strategy.name, "params": dict(self.strategy.params)},
            "seed": self.seed,
            "total_epochs": self.total_epochs,
        })
        return out


def _local_json(local: LocalTraining) -> dict[str, Any]:
    """The local section; an unset ``device_augmentation`` is left out so older plans keep their plan hash."""
    out = asdict(local)
    if not out["device_augmentation"]:
        del out["device_augmentation"]
    return out


def _check_round(round_number: int) -> int:
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
        raise ValueError(f"round numbers are integers >= 1 (1-based), got {round_number!r}")
    return round_number


# --- parsing ------------------------------------------------------------------------------------------
TOP_FIELDS = {"name": True, "plans_identifier": True, "sites": True, "rounds_per_step": True, "local": True,
              "strategy": True, "round_deadline_s": False, "seed": False, "total_epochs": False,
              "nnunet_root": False}
SITE_FIELDS = {"name": True, "dataset": True, "stream": True, "join_round": False, "rounds_per_step": False,
               "nnunet_root": False}
LOCAL_FIELDS = {"epochs": True, "iterations_per_epoch": True, "val_iterations_per_epoch": False,
                "initial_lr": False, "max_validation_cases": False, "device_augmentation": False}
STRATEGY_FIELDS = {"name": True, "params": False}


class _Reader:
    """Collects problems instead of stopping at the first, each as ``<file>: <field path>: <what>. Fix: ..."""

    def __init__(self, source: str, base_dir: Path | None):
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    def section(self, obj: Any, path: str, spec: Mapping[str, bool]) -> bool:
        """Check an object's fields: missing required ones and unknown (mistyped) ones."""
        if not isinstance(obj, Mapping):
            self.problem(path or "<top level>", f"must be a JSON object, got {type(obj).__name__}")
            return False
        for key, required in spec.items():
            if required and key not in obj:
                self.problem(_join(path, key), "missing. Fix: add this field (see docs/FEDPLAN.md)")
        for key in obj:
            if key not in spec:
                close = difflib.get_close_matches(str(key), list(spec), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.problem(_join(path, str(key)), f"unknown field. Fix: {hint}known fields here: {sorted(spec)}")
        return True

    def integer(self, obj: Mapping, key: str, path: str, minimum: int = 1, default: Any = _MISSING) -> Any:
        if key not in obj or (obj[key] is None and default is None):
            return None if default is _MISSING else default
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.problem(_join(path, key), f"must be an integer >= {minimum}, got {value!r}")
            return None
        return value

    def number(self, obj: Mapping, key: str, path: str, default: Any = _MISSING) -> Any:
        if key not in obj:
            return None if default is _MISSING else default
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            self.problem(_join(path, key), f"must be a number > 0, got {value!r}")
            return None
        return float(value)

    def string(self, obj: Mapping, key: str, path: str, pattern: re.Pattern | None = None) -> str | None:
        if key not in obj:
            return None
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            self.problem(_join(path, key), f"must be a non-empty string, got {value!r}")
            return None
        if pattern is not None and not pattern.match(value):
            self.problem(_join(path, key), f"{value!r} is not allowed: use letters, digits, '_', '-', '.' only")
            return None
        return value

    def path(self, obj: Mapping, key: str, path: str) -> Path | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.problem(_join(path, key), f"must be a folder path (string), got {value!r}")
            return None
        p = Path(value).expanduser()
        if not p.is_absolute():  # relative to the plan file, so a plan and its work folder can move together
            p = (self.base_dir or Path.cwd()) / p
        return Path(os.path.normpath(p))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_dataset(reader: _Reader, value: Any, path: str) -> int | str | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 999:
        return value
    if isinstance(value, str) and _DATASET_NAME.match(value):
        return value
    reader.problem(path, f"{value!r} is not an nnU-Net dataset. Fix: give its id (e.g. 501) or its folder name "
                         f"(e.g. 'Dataset501_Name')")
    return None


def _parse_stream(reader: _Reader, value: Any, path: str) -> tuple[Task, ...] | None:
    if not isinstance(value, list) or not value:
        reader.problem(path, f"must be a non-empty list of tasks (e.g. [\"kidneys\", \"liver\"]), got {value!r}")
        return None
    tasks: list[Task] = []
    for j, spec in enumerate(value):
        try:
            if not isinstance(spec, (str, list)):
                raise UnknownOrganError(f"a task is a string like 'spleen+pancreas', got {spec!r}")
            tasks.append(Task.parse(spec))
        except UnknownOrganError as exc:
            reader.problem(f"{path}[{j}]", f"{exc}{_suggest(spec)}")
    return tuple(tasks) if len(tasks) == len(value) else None


def _suggest(spec: Any) -> str:
    """' Did you mean ...?' for a misspelt organ or group inside a task string ('livr' -> 'liver')."""
    if not isinstance(spec, str):
        return ""
    names = [o.key for o in ORGANS] + list(TASK_GROUPS)
    fixed = [(difflib.get_close_matches(part.strip().lower(), names, n=1) or [part.strip()])[0]
             for part in spec.split("+") if part.strip()]
    guess = "+".join(fixed)
    return f". Fix: did you mean {guess!r}?" if fixed and guess != spec else ""


def _parse_site(reader: _Reader, raw: Any, i: int, default_rps: int | None,
                default_root: Path | None) -> SitePlan | None:
    path = f"sites[{i}]"
    if not reader.section(raw, path, SITE_FIELDS):
        return None
    name = reader.string(raw, "name", path, _SITE_NAME)
    dataset = _parse_dataset(reader, raw["dataset"], f"{path}.dataset") if "dataset" in raw else None
    stream = _parse_stream(reader, raw["stream"], f"{path}.stream") if "stream" in raw else None
    join_round = reader.integer(raw, "join_round", path, default=1)
    rps = reader.integer(raw, "rounds_per_step", path, default=default_rps)
    root = reader.path(raw, "nnunet_root", path) or default_root
    if None in (name, dataset, stream, join_round, rps):
        return None
    return SitePlan(name=name, dataset=dataset, stream=stream, rounds_per_step=rps, join_round=join_round,
                    nnunet_root=root)


def _check_task_spellings(reader: _Reader, sites: Sequence[SitePlan]) -> None:
    """The same organs in another order is another task (other output channels): almost always a typo."""
    where: dict[frozenset[int], dict[str, str]] = {}
    for i, s in enumerate(sites):
        for j, task in enumerate(s.stream):
            where.setdefault(frozenset(task.labels), {}).setdefault(task.key, f"sites[{i}].stream[{j}]")
    for spellings in where.values():
        if len(spellings) > 1:
            (first_key, first_at), *others = spellings.items()
            for key, at in others:
                reader.problem(at, f"task {key!r} has the organs of {first_key!r} ({first_at}) in another order, so "
                                   f"it would be learnt as a different task. Fix: spell it {first_key!r}")


def parse_plan(data: Any, source: str = "<in-memory>", base_dir: os.PathLike | str | None = None) -> FederationPlan:
    """Build and validate a plan from parsed JSON; raise one :class:`FederationPlanError` listing every problem."""
    reader = _Reader(source, Path(base_dir) if base_dir is not None else None)
    if not reader.section(data, "", TOP_FIELDS):
        raise FederationPlanError(source, reader.problems)
    name = reader.string(data, "name", "")
    plans_identifier = reader.string(data, "plans_identifier", "", _SITE_NAME)
    rps = reader.integer(data, "rounds_per_step", "")
    root = reader.path(data, "nnunet_root", "")
    seed = reader.integer(data, "seed", "", minimum=0, default=0)
    deadline = reader.number(data, "round_deadline_s", "", default=DEFAULT_ROUND_DEADLINE_S)

    local = None
    raw_local = data.get("local")
    if "local" in data and reader.section(raw_local, "local", LOCAL_FIELDS):
        values = {
            "epochs": reader.integer(raw_local, "epochs", "local"),
            "iterations_per_epoch": reader.integer(raw_local, "iterations_per_epoch", "local"),
            "val_iterations_per_epoch": reader.integer(raw_local, "val_iterations_per_epoch", "local", default=2),
            "initial_lr": reader.number(raw_local, "initial_lr", "local", default=1e-2),
        }
        max_val = reader.integer(raw_local, "max_validation_cases", "local", default=None)
        device_augmentation = raw_local.get("device_augmentation", False)
        if not isinstance(device_augmentation, bool):
            reader.problem("local.device_augmentation", f"must be true or false, got {device_augmentation!r}")
        elif None not in values.values():  # a bad max_validation_cases is reported; the plan is refused anyway
            local = LocalTraining(**values, max_validation_cases=max_val, device_augmentation=device_augmentation)

    strategy = None
    raw_strategy = data.get("strategy")
    if "strategy" in data and reader.section(raw_strategy, "strategy", STRATEGY_FIELDS):
        s_name = reader.string(raw_strategy, "name", "strategy")
        s_name = canonical_strategy(s_name) if s_name is not None else None
        params = raw_strategy.get("params", {})
        if s_name is not None and s_name not in STRATEGIES:
            close = difflib.get_close_matches(s_name, STRATEGIES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            reader.problem("strategy.name", f"unknown strategy {s_name!r}. Fix: {hint}use one of {list(STRATEGIES)}")
            s_name = None
        if not isinstance(params, Mapping):
            reader.problem("strategy.params", f"must be a JSON object of hyper-parameters, got {params!r}")
        elif s_name is not None:
            strategy = StrategySpec(s_name, dict(params))

    sites: list[SitePlan] = []
    raw_sites = data.get("sites")
    if "sites" in data and (not isinstance(raw_sites, list) or not raw_sites):
        reader.problem("sites", f"must be a non-empty list of sites, got {raw_sites!r}")
    elif isinstance(raw_sites, list):
        parsed = [_parse_site(reader, raw, i, rps, root) for i, raw in enumerate(raw_sites)]
        sites = [s for s in parsed if s is not None]
        first: dict[str, int] = {}
        for i, raw in enumerate(raw_sites):
            site_name = raw.get("name") if isinstance(raw, Mapping) else None
            if isinstance(site_name, str) and site_name in first:
                reader.problem(f"sites[{i}].name", f"duplicate site name {site_name!r} (also sites[{first[site_name]}])."
                                                   f" Fix: give every site its own name")
            elif isinstance(site_name, str):
                first[site_name] = i
        _check_task_spellings(reader, sites)

    total = None
    if local is not None and sites and len(sites) == len(raw_sites):
        needed = max(len(s.stream) * s.rounds_per_step for s in sites) * local.epochs
        total = reader.integer(data, "total_epochs", "", default=needed)
        if total is not None and total < needed:
            reader.problem("total_epochs", f"{total} is fewer than the {needed} local epochs the longest stream "
                                           f"trains, so the poly learning rate would run past zero. Fix: set it "
                                           f">= {needed} or leave it out")
    elif "total_epochs" in data:
        reader.integer(data, "total_epochs", "")  # still report a bad value

    if reader.problems:
        raise FederationPlanError(source, reader.problems)
    return FederationPlan(name=name, plans_identifier=plans_identifier, sites=tuple(sites), rounds_per_step=rps,
                          local=local, strategy=strategy, total_epochs=total, round_deadline_s=deadline, seed=seed,
                          nnunet_root=root, source=source)


def load_plan(path: os.PathLike | str) -> FederationPlan:
    """Read and validate a plan file; a bare name such as ``phantom_4site`` finds a bundled plan."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1:
        from nnunet_feddah.paths import bundled_plans_dir

        bundled = bundled_plans_dir() / f"{p.name}.json"
        p = bundled if bundled.is_file() else p
    source = str(path) if p == Path(path) else str(p)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FederationPlanError(source, [f"{source}: file does not exist. Fix: check the path "
                                           f"(bundled plans: plans/*.json)"]) from None
    except json.JSONDecodeError as exc:
        raise FederationPlanError(source, [f"{source}: line {exc.lineno} column {exc.colno}: invalid JSON "
                                           f"({exc.msg})"]) from None
    return parse_plan(data, source, p.resolve().parent)


# --- the data side ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteData:
    """What :func:`validate_sites` found for one site."""

    site: str
    dataset_name: str
    preprocessed: Path
    plans_file: Path
    fingerprint: str
    organ_cases: Mapping[str, int] = field(default_factory=dict, hash=False)  # organ -> preprocessed cases with it


def _find_dataset(folders: Mapping[str, Path], dataset: int | str) -> list[str]:
    if isinstance(dataset, str):
        return [dataset]
    bases = [folders[key] for key in NNUNET_DIRS[:2] if key in folders and folders[key].is_dir()]
    return sorted({p.name for base in bases for p in base.glob(f"Dataset{dataset:03d}_*") if p.is_dir()})


def _check_site(plan: FederationPlan, i: int, s: SitePlan, check_cases: bool, problems: list[str]) -> SiteData | None:
    from nnunet_feddah.nnunet.task_data import TaskNotAvailableError, check_task_available, organ_case_counts

    where = f"{plan.source}: sites[{i}] ({s.name})"
    start = len(problems)
    try:
        folders = plan.nnunet_folders(s)
    except FederationPlanError as exc:
        problems.extend(exc.problems)
        return None
    names = _find_dataset(folders, s.dataset)
    if len(names) != 1:
        what = "not found" if not names else f"ambiguous ({names})"
        problems.append(f"{where}.dataset: dataset {s.dataset!r} {what} in {folders['nnUNet_raw']} / "
                        f"{folders['nnUNet_preprocessed']}. Fix: write the site dataset (e.g. `nnfeddah phantom`) "
                        f"or correct the id / nnunet_root")
        return None
    name = names[0]
    raw_json = folders["nnUNet_raw"] / name / "dataset.json"
    pre = folders["nnUNet_preprocessed"] / name
    install_fix = f"Fix: `nnfeddah plans install --plans-file <shared {plan.plans_identifier}.json> -d {s.dataset}`"
    if not raw_json.is_file():
        problems.append(f"{where}.dataset: {raw_json} does not exist (evaluation needs the raw dataset). "
                        f"Fix: write the site dataset into nnUNet_raw")
    for needed in ("dataset.json", "dataset_fingerprint.json", f"{plan.plans_identifier}.json"):
        if not (pre / needed).is_file():
            problems.append(f"{where}: {pre / needed} does not exist (plans_identifier "
                            f"{plan.plans_identifier!r}). {install_fix}")
    if len(problems) > start:
        return None
    plans_file = pre / f"{plan.plans_identifier}.json"
    loaded = {}
    for file in (plans_file, pre / "dataset.json"):
        try:
            loaded[file] = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: {file} is not valid JSON ({exc}). {install_fix}")
    if len(problems) > start:
        return None
    plans, dataset_json = loaded[plans_file], loaded[pre / "dataset.json"]
    fingerprint = (plans.get("feddah") or {}).get("architecture_fingerprint")
    if not fingerprint:
        problems.append(f"{where}: {plans_file} has no 'feddah.architecture_fingerprint'. {install_fix}")
    data_id = plans.get("configurations", {}).get(CONFIGURATION, {}).get("data_identifier",
                                                                          f"{plan.plans_identifier}_{CONFIGURATION}")
    data_folder = pre / data_id
    counts: dict[int, int] | None = None
    if check_cases:
        if data_folder.is_dir() and any(data_folder.glob("*.pkl")):
            counts = organ_case_counts(data_folder)
        else:
            problems.append(f"{where}: no preprocessed cases in {data_folder}. {install_fix}")
    for j, task in enumerate(s.stream):
        if task in s.stream[:j]:
            continue
        try:
            check_task_available(dataset_json, task, str(pre / "dataset.json"))
        except (TaskNotAvailableError, ValueError) as exc:
            problems.append(f"{where}.stream[{j}]: {exc}")
            continue
        empty = [o.key for o in task.organs if counts is not None and counts.get(o.label, 0) == 0]
        if empty:
            problems.append(f"{where}.stream[{j}]: task {task.key!r}: no preprocessed case in {data_folder} contains "
                            f"{empty} although the dataset declares them annotated. Fix: check the label files or "
                            f"drop these organs from the stream")
    if len(problems) > start:
        return None
    organ_cases = {o.key: counts.get(o.label, 0) for t in s.stream for o in t.organs} if counts is not None else {}
    return SiteData(s.name, name, pre, plans_file, fingerprint, organ_cases)


def validate_sites(plan: FederationPlan, sites: Sequence[str] | None = None,
                   check_cases: bool = True) -> dict[str, SiteData]:
    """Check the data side before a run: datasets, annotations, shared plans and one architecture for all.

    ``sites`` restricts the check (a hospital checks only its own site; the fingerprint comparison then
    covers the sites given). ``check_cases`` also reads nnU-Net's per-case ``class_locations`` so that a
    task whose organ has no labelled voxel is refused. Imports the nnU-Net-side helpers lazily.
    """
    chosen = [plan.site(name) for name in sites] if sites is not None else list(plan.sites)
    problems: list[str] = []
    found: dict[str, SiteData] = {}
    for s in chosen:
        data = _check_site(plan, plan.sites.index(s), s, check_cases, problems)
        if data is not None:
            found[s.name] = data
    reference = next(iter(found.values()), None)
    for data in found.values():
        if reference is not None and data.fingerprint != reference.fingerprint:
            i, j = plan.site_names.index(reference.site), plan.site_names.index(data.site)
            problems.append(
                f"{plan.source}: sites[{j}] ({data.site}): architecture fingerprint {data.fingerprint} "
                f"({data.plans_file}) differs from sites[{i}] ({reference.site}): {reference.fingerprint} "
                f"({reference.plans_file}); DAHyper generates one network for all sites. Fix: install the same "
                f"shared plans at every site (`nnfeddah plans install --plans-file <{reference.site}'s "
                f"{plan.plans_identifier}.json> -d {plan.site(data.site).dataset}`)")
    if problems:
        raise FederationPlanError(plan.source, problems)
    return found
