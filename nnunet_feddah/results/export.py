"""Export: every task of a coordinator state as an ordinary nnU-Net results folder, one ``-chk`` file per task.

Layout (one model folder per target dataset, see docs/EXPORT.md for why)::

    <nnUNet_results>/<Dataset>/FedDAHTrainer__<plans>__3d_fullres/
        plans.json            the dataset's shared plans (what every site trained)
        dataset.json          the dataset's dataset.json with *all* AMOS labels (background + ids 1-15)
        dataset_fingerprint.json   copied when the dataset has one
        feddah_export.json    manifest: state folder, round, tasks -> organs and checkpoint files
        fold_0/<task>.pth     one nnU-Net checkpoint per task

    nnUNetv2_predict -i IN -o OUT -d <Dataset> -c 3d_fullres -tr FedDAHTrainer -p <plans> -f 0 \\
        -chk <task>.pth -device cpu

Every checkpoint has 16 outputs in the AMOS channel space (:mod:`.amos_channels`); the folder format is
:mod:`.nnunet_folder`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from nnunet_feddah.atomic import atomic_path, atomic_write_json
from nnunet_feddah.errors import FedDAHError, run_cli
from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.method.strategy import Strategy
from nnunet_feddah.nnunet.datasets import DatasetNotFoundError, dataset_id, dataset_under
from nnunet_feddah.organs import BACKGROUND, Task
from nnunet_feddah.paths import CONFIGURATION
from nnunet_feddah.results.amos_channels import NUM_SLOTS, SUPPRESSION_MARGIN, amos_dataset_json, pad_heads_to_amos
from nnunet_feddah.results.nnunet_folder import (
    FOLD,
    MANIFEST,
    MANIFEST_FORMAT,
    TRAINER_NAME,
    checkpoint_name,
    model_folder_name,
    nnunet_checkpoint,
    nnunet_state_dict,
    predict_command,
    read_json,
)

PlanLike = Union[FederationPlan, str, os.PathLike, None]


class ExportError(FedDAHError, ValueError):
    """A state folder, dataset or task that cannot be exported; the message names the file, field and fix."""


@dataclass(frozen=True)
class ExportedTask:
    key: str
    organs: tuple[int, ...]
    checkpoint: Path


# ---------------------------------------------------------------------------------------------- state
def load_state(state_dir: os.PathLike | str, fingerprint: str) -> tuple[Strategy, checkpoint.Committed]:
    """The committed strategy of a coordinator state folder, refused for another architecture."""
    from nnunet_feddah.nnunet.network import is_head

    try:
        committed = checkpoint.require_committed(state_dir, snapshots=False)  # an old snapshot's damage is not ours
        committed.require_fingerprint(fingerprint, f"the shared plans give {fingerprint}. Fix: export with the plans "
                                                   f"the federation trained")
        return committed.load_strategy(is_head), committed
    except ValueError as exc:
        raise ExportError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------- folders
def _env_folder(name: str) -> Path:
    from nnunet_feddah.paths import require_nnunet_env

    try:
        return require_nnunet_env(name)[name]
    except OSError as exc:
        raise ExportError(str(exc)) from exc


def _site_folders(plan: FederationPlan | None, dataset: Union[int, str]) -> dict[str, Path] | None:
    """nnU-Net folders of the plan's site that holds ``dataset`` when it has an ``nnunet_root`` (else None)."""
    if plan is None:
        return None
    for site in plan.sites:
        if site.nnunet_root is not None and dataset_id(site.dataset) == dataset_id(dataset):
            return plan.nnunet_folders(site)
    return None


def _resolve_plans(plan_or_plans_file: PlanLike, plans_identifier: str | None
                   ) -> tuple[FederationPlan | None, dict | None, str | None]:
    """(federation plan, nnU-Net plans dict, plans identifier) from whatever the caller gave."""
    if plan_or_plans_file is None:
        return None, None, plans_identifier
    if isinstance(plan_or_plans_file, FederationPlan):
        return plan_or_plans_file, None, plans_identifier or plan_or_plans_file.plans_identifier
    path = Path(plan_or_plans_file)
    if not path.is_file():
        fed = load_plan(path)  # a bundled plan name, or a clear "file does not exist" error
        return fed, None, plans_identifier or fed.plans_identifier
    data = read_json(path, "plans or federation plan", ExportError)
    if "configurations" in data:
        return None, data, plans_identifier or data.get("plans_name")
    fed = load_plan(path)
    return fed, None, plans_identifier or fed.plans_identifier


def _select_tasks(strategy: Strategy, tasks: Sequence[str] | None, strategy_file: Path) -> dict[str, list[int]]:
    available = strategy.tasks(trained_only=True)
    if tasks is None:
        if not available:
            raise ExportError(f"{strategy_file}: no task has an accepted upload yet (field 'tasks'); nothing to export")
        return available
    registered = strategy.tasks(trained_only=False)
    chosen: dict[str, list[int]] = {}
    for spec in tasks:
        try:
            key = Task.parse(spec).key
        except ValueError:
            key = str(spec)  # not even a valid organ spelling: reported below with the state's tasks
        if key not in registered:
            raise ExportError(f"task {spec!r} is not in the coordinator state {strategy_file} (field 'tasks' of "
                              f"{strategy.name}: {', '.join(sorted(registered)) or 'none'}). Fix: export one of those")
        chosen[key] = registered[key]
    return chosen


# ---------------------------------------------------------------------------------------------- export
def export_tasks(state_dir: os.PathLike | str, plan_or_plans_file: PlanLike, dataset: Union[int, str],
                 plans_identifier: str | None = None, tasks: Sequence[str] | None = None,
                 out_results: os.PathLike | str | None = None, configuration: str = CONFIGURATION,
                 log: Callable[[str], None] = lambda *_: None) -> Path:
    """Write ``<results>/<Dataset>/FedDAHTrainer__<plans>__<configuration>/``; returns that model folder.

    ``plan_or_plans_file``: a :class:`FederationPlan` or its JSON file (gives the plans identifier and a
    site's ``nnunet_root``), an nnU-Net plans JSON (used as the folder's plans.json), or None (then the
    dataset's ``<nnUNet_preprocessed>/<Dataset>/<plans_identifier>.json``). ``tasks`` defaults to every
    task with an accepted upload. ``out_results`` defaults to ``$nnUNet_results``.
    """
    from nnunet_feddah.nnunet.network import architecture_fingerprint, is_head, num_input_channels

    fed, plans, plans_identifier = _resolve_plans(plan_or_plans_file, plans_identifier)
    if not plans_identifier:
        raise ExportError("no plans identifier: pass -p/--plans (e.g. FedDAHPlansCPU) or a plans/federation file")
    folders = _site_folders(fed, dataset)
    preprocessed = folders["nnUNet_preprocessed"] if folders else _env_folder("nnUNet_preprocessed")
    try:
        name = dataset_under(dataset, preprocessed)
    except DatasetNotFoundError as exc:
        raise ExportError(str(exc)) from exc
    if plans is None:
        plans = read_json(preprocessed / name / f"{plans_identifier}.json",
                           f"shared plans {plans_identifier!r} of {name}; run `nnfeddah plans install` for it", ExportError)
    if configuration not in plans.get("configurations", {}):
        raise ExportError(f"plans {plans_identifier}: field 'configurations.{configuration}' is missing")
    dataset_json_file = preprocessed / name / "dataset.json"
    raw = folders["nnUNet_raw"] if folders else Path(os.environ.get("nnUNet_raw", preprocessed))
    if not dataset_json_file.is_file() and (raw / name / "dataset.json").is_file():
        dataset_json_file = raw / name / "dataset.json"
    dataset_json = amos_dataset_json(read_json(dataset_json_file, f"dataset.json of {name}", ExportError))
    input_channels = num_input_channels(dataset_json)
    fingerprint = architecture_fingerprint(plans, input_channels, configuration)

    strategy, committed = load_state(state_dir, fingerprint)
    chosen = _select_tasks(strategy, tasks, committed.strategy_file)

    results = Path(out_results) if out_results is not None else (
        folders["nnUNet_results"] if folders else _env_folder("nnUNet_results"))
    model_folder = results / name / model_folder_name(plans_identifier, configuration)
    _check_existing_plans(model_folder, fingerprint, input_channels, configuration)

    exported: list[ExportedTask] = []
    for key, organs in chosen.items():
        start = time.perf_counter()
        task = Task.parse(organs)
        weights = pad_heads_to_amos(strategy.task_weights(key), organs, is_head)
        provenance = {
            "task": key, "organs": list(organs), "output_labels": list(range(NUM_SLOTS)),
            "task_dataset_json": _task_dataset_json(dataset_json, task),
            "strategy": strategy.name, "state_dir": str(Path(state_dir).resolve()), "round": committed.round,
            "architecture_fingerprint": fingerprint, "suppression_margin": SUPPRESSION_MARGIN,
        }
        ckpt = nnunet_checkpoint(nnunet_state_dict(plans, weights, input_channels, configuration), plans,
                                 dataset_json, configuration, committed.round, provenance)
        target = model_folder / f"fold_{FOLD}" / checkpoint_name(key)
        with atomic_path(target) as tmp:
            torch.save(ckpt, tmp)
        exported.append(ExportedTask(key, tuple(organs), target))
        log(f"[export] {key}: {target} ({time.perf_counter() - start:.1f} s)")

    atomic_write_json(model_folder / "plans.json", plans)
    atomic_write_json(model_folder / "dataset.json", dataset_json)
    fingerprint_file = preprocessed / name / "dataset_fingerprint.json"
    if fingerprint_file.is_file():
        with atomic_path(model_folder / "dataset_fingerprint.json") as tmp:
            shutil.copyfile(fingerprint_file, tmp)
    _write_manifest(model_folder, exported, strategy.name, state_dir, committed.round, fingerprint, name, plans_identifier,
                    configuration)
    return model_folder


def _task_dataset_json(dataset_json: Mapping, task: Task) -> dict:
    from nnunet_feddah.nnunet.task_data import task_dataset_json

    return task_dataset_json(dataset_json, task)


def _check_existing_plans(model_folder: Path, fingerprint: str, input_channels: int, configuration: str) -> None:
    """Refuse to mix checkpoints of two architectures in one folder (they share its plans.json)."""
    from nnunet_feddah.nnunet.network import architecture_fingerprint

    existing = model_folder / "plans.json"
    if not existing.is_file():
        return
    found = architecture_fingerprint(read_json(existing, "plans of an earlier export", ExportError), input_channels, configuration)
    if found != fingerprint:
        raise ExportError(f"{existing} describes another architecture ({found}, this export: {fingerprint}); the "
                          f"checkpoints already in {model_folder} would no longer load. Fix: remove that folder or "
                          f"export to another --results folder")


def _write_manifest(model_folder: Path, exported: Sequence[ExportedTask], strategy: str, state_dir, round_index: int,
                    fingerprint: str, dataset: str, plans_identifier: str, configuration: str) -> None:
    path = model_folder / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    tasks = dict(manifest.get("tasks", {})) if manifest.get("architecture_fingerprint") == fingerprint else {}
    for item in exported:
        tasks[item.key] = {"organs": list(item.organs), "checkpoint": f"fold_{FOLD}/{item.checkpoint.name}",
                           "amos_labels": [BACKGROUND, *item.organs], "round": round_index}
    atomic_write_json(path, {
        "format": MANIFEST_FORMAT, "strategy": strategy, "state_dir": str(Path(state_dir).resolve()),
        "round": round_index, "architecture_fingerprint": fingerprint, "dataset": dataset,
        "plans_identifier": plans_identifier, "configuration": configuration, "trainer": TRAINER_NAME,
        "labels": "AMOS ids (output channel == AMOS label id; organs outside a task are never predicted)",
        "tasks": tasks,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnfeddah export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", required=True, help="coordinator state folder (holds checkpoint.json)")
    parser.add_argument("-d", "--dataset", required=True, help="target nnU-Net dataset id or name; its results "
                                                               "folder receives the model folder")
    parser.add_argument("-p", "--plans", help="plans identifier, e.g. FedDAHPlansCPU (default: from --plan)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--plan", help="federation plan JSON (gives the plans identifier and nnunet_root)")
    source.add_argument("--plans-file", help="shared nnU-Net plans JSON to write as plans.json")
    parser.add_argument("-t", "--tasks", nargs="+", help="task keys (default: every task with an accepted upload)")
    parser.add_argument("--results", help="nnU-Net results root (default: $nnUNet_results)")
    parser.add_argument("-c", "--configuration", default=CONFIGURATION)
    args = parser.parse_args(argv)

    def run() -> None:
        start = time.perf_counter()
        folder = export_tasks(args.state, args.plan or args.plans_file, args.dataset, args.plans, args.tasks,
                              args.results, args.configuration, log=print)
        manifest = json.loads((folder / MANIFEST).read_text())
        print(f"[export] {len(manifest['tasks'])} task(s) in {folder} ({time.perf_counter() - start:.1f} s); "
              f"predict with:")
        for key in manifest["tasks"]:
            print("  " + " ".join(predict_command(manifest["dataset"], manifest["plans_identifier"], key,
                                                  configuration=manifest["configuration"])))

    return run_cli("nnfeddah export", run)


if __name__ == "__main__":
    raise SystemExit(main())
