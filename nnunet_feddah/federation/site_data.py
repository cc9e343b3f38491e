"""The data side of a plan: every site's nnU-Net datasets, annotations, shared plans and architecture.

:func:`validate_sites` runs before a federation starts (on the coordinator for every site, at a hospital
for its own site): datasets found by nnU-Net's own resolver, every streamed organ annotated and present
in some preprocessed case, the shared plans installed, and one architecture fingerprint for all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_feddah.federation.plan import FederationPlan, FederationPlanError, SitePlan
from nnunet_feddah.nnunet.case_checks import CaseError, check_split
from nnunet_feddah.nnunet.datasets import DatasetNotFoundError, dataset_name
from nnunet_feddah.nnunet.task_data import TaskNotAvailableError, check_task_available, organ_case_counts
from nnunet_feddah.paths import CONFIGURATION


@dataclass(frozen=True)
class SiteData:
    """What :func:`validate_sites` found for one site."""

    site: str
    dataset_name: str
    preprocessed: Path
    plans_file: Path
    fingerprint: str
    organ_cases: Mapping[str, int] = field(default_factory=dict, hash=False)  # organ -> preprocessed cases with it
    training_cases: int | None = None  # numTraining of the site's dataset.json: the bound on an upload's claim


def _check_site(plan: FederationPlan, i: int, s: SitePlan, check_cases: bool, problems: list[str],
                require_plans: bool = True) -> SiteData | None:
    where = f"{plan.source}: sites[{i}] ({s.name})"
    start = len(problems)
    try:
        folders = plan.nnunet_folders(s)
    except FederationPlanError as exc:
        problems.extend(exc.problems)
        return None
    try:  # where the data is: the site's raw and preprocessed folders (its results folder may hold old models)
        name = dataset_name(s.dataset, {k: folders[k] for k in ("nnUNet_raw", "nnUNet_preprocessed") if k in folders})
    except DatasetNotFoundError as exc:
        problems.append(f"{where}.dataset: {exc}")
        return None
    raw_json = folders["nnUNet_raw"] / name / "dataset.json"
    pre = folders["nnUNet_preprocessed"] / name
    install_fix = f"Fix: `nnfeddah plans install --plans-file <shared {plan.plans_identifier}.json> -d {s.dataset}`"
    if not raw_json.is_file():
        problems.append(f"{where}.dataset: {raw_json} does not exist (evaluation needs the raw dataset). "
                        f"Fix: write the site dataset into nnUNet_raw")
    if not require_plans:  # the fingerprint round plans and installs them: only the raw data is there yet
        return _raw_site(where, s, name, raw_json, pre / f"{plan.plans_identifier}.json", problems, start)
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
    _check_streams(where, s, dataset_json, pre / "dataset.json", counts, data_folder, problems)
    _check_split(where, dataset_json, folders["nnUNet_raw"] / name, pre, problems)
    if len(problems) > start:
        return None
    organ_cases = {o.key: counts.get(o.label, 0) for t in s.stream for o in t.organs} if counts is not None else {}
    return SiteData(s.name, name, pre, plans_file, fingerprint, organ_cases, _declared_cases(dataset_json))


def _check_streams(where: str, s: SitePlan, dataset_json: Mapping, dataset_json_file: Path,
                   counts: Mapping[int, int] | None, data_folder: Path | None, problems: list[str]) -> None:
    """Every task of the site's stream annotated in its dataset.json (and, given ``counts``, in some case)."""
    for j, task in enumerate(s.stream):
        if task in s.stream[:j]:
            continue
        try:
            check_task_available(dataset_json, task, str(dataset_json_file))
        except (TaskNotAvailableError, ValueError) as exc:
            problems.append(f"{where}.stream[{j}]: {exc}")
            continue
        empty = [o.key for o in task.organs if counts is not None and counts.get(o.label, 0) == 0]
        if empty:
            problems.append(f"{where}.stream[{j}]: task {task.key!r}: no preprocessed case in {data_folder} contains "
                            f"{empty} although the dataset declares them annotated. Fix: check the label files or "
                            f"drop these organs from the stream")


def _check_split(where: str, dataset_json: Mapping, raw: Path, preprocessed: Path, problems: list[str]) -> None:
    """Enough training cases for nnU-Net's split (else every round would fail inside nnU-Net)."""
    cases = _declared_cases(dataset_json)
    if cases is not None:
        try:
            check_split(cases, raw, preprocessed)
        except CaseError as exc:
            problems.append(f"{where}: {exc}")


def _declared_cases(dataset_json: Mapping) -> int | None:
    declared = dataset_json.get("numTraining")
    return declared if isinstance(declared, int) and not isinstance(declared, bool) else None


def _raw_site(where: str, s: SitePlan, name: str, raw_json: Path, plans_file: Path, problems: list[str],
              start: int) -> SiteData | None:
    """A site before its plans exist: its raw dataset.json readable and annotating every streamed task."""
    if len(problems) > start:
        return None
    try:
        dataset_json = json.loads(raw_json.read_text())
    except json.JSONDecodeError as exc:
        problems.append(f"{where}: {raw_json} is not valid JSON ({exc}). Fix: write the site dataset again")
        return None
    _check_streams(where, s, dataset_json, raw_json, None, None, problems)
    _check_split(where, dataset_json, raw_json.parent, plans_file.parent, problems)
    if len(problems) > start:
        return None
    return SiteData(s.name, name, plans_file.parent, plans_file, "", {}, _declared_cases(dataset_json))


def validate_sites(plan: FederationPlan, sites: Sequence[str] | None = None,
                   check_cases: bool = True, require_plans: bool = True) -> dict[str, SiteData]:
    """Check the data side before a run: datasets, annotations, shared plans and one architecture for all.

    ``sites`` restricts the check (a hospital checks only its own site; the fingerprint comparison then
    covers the sites given). ``check_cases`` also reads nnU-Net's per-case ``class_locations`` so that a
    task whose organ has no labelled voxel is refused. ``require_plans=False`` checks only the raw datasets
    (before a fingerprint round installs the plans; the sites' ``fingerprint`` is then ``""``). Imports the
    nnU-Net-side helpers lazily.
    """
    chosen = [plan.site(name) for name in sites] if sites is not None else list(plan.sites)
    problems: list[str] = []
    found: dict[str, SiteData] = {}
    for s in chosen:
        data = _check_site(plan, plan.sites.index(s), s, check_cases, problems, require_plans)
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
