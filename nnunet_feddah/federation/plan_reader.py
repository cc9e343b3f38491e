"""Reading a federation plan file: every problem reported at once, each naming file, field path and fix.

A typo found after an hour of training is an hour lost, so :func:`parse_plan` checks the whole file and
collects every problem (``sites[2].stream[1]: …``) into one :class:`~.plan.FederationPlanError`.
Strategy names are checked against :mod:`nnunet_feddah.method.registry`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nnunet_feddah.federation.plan import (
    DEFAULT_ROUND_DEADLINE_S,
    FederationPlan,
    FederationPlanError,
    FingerprintRound,
    LocalTraining,
    SitePlan,
    StrategySpec,
)
from nnunet_feddah.method.registry import STRATEGIES
from nnunet_feddah.organs import ORGANS, TASK_GROUPS, Task, UnknownOrganError
from nnunet_feddah.paths import bundled_plans_dir

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # site names become folder names
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_.-]+$")
_MISSING: Any = object()


TOP_FIELDS = {"name": True, "plans_identifier": True, "sites": True, "rounds_per_step": True, "local": True,
              "strategy": True, "round_deadline_s": False, "seed": False, "total_epochs": False,
              "round_epochs": False, "nnunet_root": False, "fingerprint_round": False}
SITE_FIELDS = {"name": True, "dataset": True, "stream": True, "join_round": False, "rounds_per_step": False,
               "nnunet_root": False}
#: Local-training options with a fixed set of values (the first is the default).
LOCAL_CHOICES = {"optimizer": ("sgd", "adamw"), "lr_schedule": ("federation", "per-task"),
                 "cpu_precision": ("float32", "bfloat16")}
LOCAL_FIELDS = {"epochs": True, "iterations_per_epoch": True, "val_iterations_per_epoch": False,
                "initial_lr": False, "max_validation_cases": False, "device_augmentation": False,
                "optimizer": False, "lr_schedule": False, "cpu_precision": False}
STRATEGY_FIELDS = {"name": True, "params": False}
FINGERPRINT_ROUND_FIELDS = {"template": True, "min_count": False}
TEMPLATE_NAMES = ("cpu", "amos")  # bundled as plans/template_<name>.json


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


def _choice(reader: _Reader, local: Mapping, name: str, options: Sequence[str]) -> str | None:
    """One of ``options`` for ``local.<name>`` (default: the first); a problem naming the choices otherwise."""
    value = local.get(name, options[0])
    if value not in options:
        reader.problem(f"local.{name}", f"must be one of {list(options)}, got {value!r}")
        return None
    return value


def _parse_round_epochs(reader: _Reader, data: Mapping, total_rounds: int | None) -> dict[int, int] | None:
    """``round_epochs``: ``{"<round>": local epochs}`` for rounds that train longer or shorter than ``local.epochs``."""
    raw = data.get("round_epochs", {})
    if not isinstance(raw, Mapping):
        reader.problem("round_epochs", f'must be an object mapping a round number to its local epochs, e.g. '
                                       f'{{"1": 6}}; got {raw!r}')
        return None
    out: dict[int, int] = {}
    for key in raw:
        at = f"round_epochs.{key}"
        if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
            reader.problem(at, f"{key!r} is not a round number. Fix: use a 1-based round number as the key")
            continue
        if total_rounds is not None and int(key) > total_rounds:
            reader.problem(at, f"round {key} is past the plan's last round ({total_rounds}). Fix: remove it")
            continue
        epochs = reader.integer(raw, key, "round_epochs")
        if epochs is not None:
            out[int(key)] = epochs
    return out


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


def _parse_fingerprint_round(reader: _Reader, data: Mapping) -> FingerprintRound | None:
    """``"fingerprint_round": {"template": "cpu" | "amos" | path, "min_count": 10}``, the template found here."""
    raw = data.get("fingerprint_round")
    if raw is None or not reader.section(raw, "fingerprint_round", FINGERPRINT_ROUND_FIELDS):
        return None
    template = reader.string(raw, "template", "fingerprint_round")
    min_count = reader.integer(raw, "min_count", "fingerprint_round", minimum=1, default=None)
    if template is None:
        return None
    if template not in TEMPLATE_NAMES:
        path = reader.path(raw, "template", "fingerprint_round")
        if path is None or not path.is_file():
            reader.problem("fingerprint_round.template", f"{template!r} is neither a bundled template "
                                                         f"{list(TEMPLATE_NAMES)} nor an existing file ({path}). "
                                                         f"Fix: name a bundled template or give the template's path")
            return None
        template = str(path)
    if not (bundled_plans_dir() / f"template_{template}.json").is_file() and template in TEMPLATE_NAMES:
        reader.problem("fingerprint_round.template", f"bundled template {template!r} is missing from "
                                                     f"{bundled_plans_dir()}; reinstall nnunet-feddah")
        return None
    return FingerprintRound(template, min_count)


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
        choices = {name: _choice(reader, raw_local, name, options) for name, options in LOCAL_CHOICES.items()}
        if isinstance(device_augmentation, bool) and None not in values.values() and None not in choices.values():
            # a bad max_validation_cases is reported; the plan is refused anyway
            local = LocalTraining(**values, max_validation_cases=max_val, device_augmentation=device_augmentation,
                                  **choices)

    strategy = None
    raw_strategy = data.get("strategy")
    if "strategy" in data and reader.section(raw_strategy, "strategy", STRATEGY_FIELDS):
        s_name = reader.string(raw_strategy, "name", "strategy")
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

    fingerprint_round = _parse_fingerprint_round(reader, data)
    total_rounds = max(s.last_round for s in sites) if sites and len(sites) == len(raw_sites) else None
    round_epochs = _parse_round_epochs(reader, data, total_rounds)
    total = None
    if local is not None and round_epochs is not None and total_rounds is not None:
        needed = max(sum(round_epochs.get(r, local.epochs) for r in range(s.join_round, s.last_round + 1))
                     for s in sites)
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
                          local=local, strategy=strategy, total_epochs=total, round_epochs=round_epochs,
                          round_deadline_s=deadline, seed=seed, nnunet_root=root,
                          fingerprint_round=fingerprint_round, source=source)


def load_plan(path: os.PathLike | str) -> FederationPlan:
    """Read and validate a plan file; a bare name such as ``phantom_4site`` finds a bundled plan."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1:
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
