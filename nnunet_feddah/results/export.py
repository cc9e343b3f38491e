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

Why every checkpoint has 16 outputs although a task has only background + K organs: nnU-Net's
predictor takes the number of outputs (and the label names) from the *folder's* ``dataset.json``,
never from the checkpoint, so tasks with different label sets cannot share one folder as-is. Instead
each task's generated head rows are placed at their AMOS ids and every other row is a copy of the
background row with its bias lowered by :data:`SUPPRESSION_MARGIN` — such a class always scores
exactly that much below background, so it can never win the argmax and its probability is
``e^-30 · p(background)``. The predicted label map therefore equals the task network's prediction,
already in AMOS ids (organs outside the task are background). ``task_labels_to_amos`` maps the raw
output of a task-size network (background + task organs, e.g. from :mod:`nnunet_feddah.nnunet.validation`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from nnunet_feddah.atomic import atomic_path, atomic_write_json
from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.plan import FederationPlan, load_plan
from nnunet_feddah.method.dahyper import BACKGROUND
from nnunet_feddah.method.strategies import FedAvgStrategy, FedDAHStrategy, Strategy
from nnunet_feddah.organs import BY_LABEL, ORGANS, Task, organs_in_dataset_json

TRAINER_NAME = "FedDAHTrainer"
CONFIGURATION = "3d_fullres"
FOLD = 0
MANIFEST = "feddah_export.json"
MANIFEST_FORMAT = "nnunet-feddah-export/1"
NUM_SLOTS = max(BY_LABEL) + 1  # background + AMOS organs 1..15: output channel == AMOS id
SUPPRESSION_MARGIN = 30.0  # logit gap below background for organs outside the task (e^-30 ≈ 1e-13)
_DATASET_NAME = re.compile(r"^Dataset\d{3}_.+$")

PlanLike = Union[FederationPlan, str, os.PathLike, None]


class ExportError(ValueError):
    """A state folder, dataset or task that cannot be exported; the message names the file, field and fix."""


@dataclass(frozen=True)
class ExportedTask:
    key: str
    organs: tuple[int, ...]
    checkpoint: Path


# ---------------------------------------------------------------------------------------------- labels
def task_labels_to_amos(segmentation: Any, task: Union[Task, str, Sequence[Union[str, int]]]) -> np.ndarray:
    """A label map in a task's channel space (0 = background, i = the task's i-th organ) -> AMOS ids."""
    task = Task.parse(task)
    seg = np.asarray(segmentation)
    if seg.dtype.kind not in "iub":
        raise ValueError(f"segmentation must hold integer labels, got dtype {seg.dtype}")
    if seg.size and (seg.min() < 0 or seg.max() > len(task.organs)):
        raise ValueError(f"segmentation has labels {int(seg.min())}..{int(seg.max())}, but task {task.key!r} "
                         f"has outputs 0..{len(task.organs)} (background + {', '.join(o.key for o in task.organs)})")
    lut = np.asarray([BACKGROUND, *task.labels], dtype=np.uint8)
    return lut[seg]


def amos_dataset_json(dataset_json: Mapping) -> dict:
    """The folder's dataset.json: the target dataset's, with labels = background + every AMOS organ (id order).

    Names the dataset itself uses for an id are kept (so nnU-Net's evaluation matches its label files).
    """
    out = json.loads(json.dumps(dict(dataset_json)))
    try:
        declared = {label: name for name, label in _label_names(dataset_json).items()}
    except ValueError as exc:
        raise ExportError(f"dataset.json field 'labels': {exc}") from exc
    out["labels"] = {"background": 0, **{declared.get(o.label, o.name): o.label for o in ORGANS}}
    return out


def _label_names(dataset_json: Mapping) -> dict[str, int]:
    organs = organs_in_dataset_json(dataset_json)  # validates AMOS ids
    names = {}
    for k, v in dataset_json["labels"].items():
        name, label = (str(v), int(k)) if str(k).isdigit() else (str(k), int(v))
        if label in organs:
            names[name] = label
    return names


# ---------------------------------------------------------------------------------------------- weights
def pad_heads_to_amos(weights: Mapping[str, torch.Tensor], organs: Sequence[int],
                      is_head: Callable[[str], bool], num_slots: int = NUM_SLOTS,
                      margin: float = SUPPRESSION_MARGIN) -> dict[str, torch.Tensor]:
    """Task weights (heads with rows ``[background, *organs]``) -> weights whose head row ``o`` is AMOS id ``o``.

    Rows of organs outside the task copy the background row and lower its bias by ``margin``; the
    trunk is returned unchanged.
    """
    slots = [BACKGROUND, *organs]
    out: dict[str, torch.Tensor] = {}
    heads = [k for k in weights if is_head(k)]
    for name, tensor in weights.items():
        if name not in heads:
            out[name] = tensor.detach()
            continue
        if tensor.shape[0] != len(slots):
            raise ExportError(f"head tensor {name} has {tensor.shape[0]} rows, task organs {list(organs)} need "
                              f"{len(slots)} (background + organs)")
        padded = tensor.detach()[:1].repeat(num_slots, *([1] * (tensor.dim() - 1))).clone()
        padded[slots] = tensor.detach()
        if name.endswith(".bias"):
            others = [s for s in range(num_slots) if s not in slots]
            padded[others] -= margin
        elif name.endswith(".weight") and f"{name[:-len('.weight')]}.bias" not in weights:
            raise ExportError(f"head {name} has no bias, so organs outside the task cannot be suppressed")
        out[name] = padded
    return out


def nnunet_state_dict(plans: Mapping, weights: Mapping[str, torch.Tensor], input_channels: int,
                      configuration: str = CONFIGURATION, num_outputs: int = NUM_SLOTS) -> OrderedDict:
    """The full ``state_dict`` nnU-Net's predictor loads (aliased keys included), built with deep_supervision off.

    The predictor builds its network with ``enable_deep_supervision=False``; the decoder keeps every
    ``seg_layers.*`` either way, so the keys are the same as in training checkpoints.
    """
    from nnunet_feddah.nnunet.network import build_network, load_unique_tensors

    network = build_network(plans, num_outputs, input_channels, configuration, deep_supervision=False)
    load_unique_tensors(network, weights, "exported weights")
    return OrderedDict((k, v.detach()) for k, v in network.state_dict().items())


def nnunet_checkpoint(state_dict: Mapping[str, torch.Tensor], plans: Mapping, dataset_json: Mapping,
                      configuration: str = CONFIGURATION, current_epoch: int = 0,
                      feddah: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``nnUNetTrainer.save_checkpoint`` writes, minus optimizer/logging state (prediction never reads it)."""
    patch_size = plans["configurations"][configuration]["patch_size"]
    return {
        "network_weights": state_dict,
        "trainer_name": TRAINER_NAME,
        "init_args": {"plans": dict(plans), "configuration": configuration, "fold": FOLD,
                      "dataset_json": dict(dataset_json), "device": torch.device("cpu")},
        "inference_allowed_mirroring_axes": tuple(range(len(patch_size))),
        "current_epoch": int(current_epoch),
        "feddah": dict(feddah or {}),
    }


# ---------------------------------------------------------------------------------------------- state
def strategy_tasks(strategy: Strategy) -> dict[str, list[int]]:
    """Exportable tasks of a strategy and their organs: for FedDAH every task with an accepted upload."""
    if isinstance(strategy, FedDAHStrategy):
        return {k: list(t.organs) for k, t in strategy.hyper.tasks.items() if t.contributors}
    if isinstance(strategy, FedAvgStrategy):
        return {k: list(strategy.organs_by_task[k]) for k in strategy.last_trained}
    raise ExportError(f"strategy {strategy.name!r} cannot be exported")


def _registered_tasks(strategy: Strategy) -> dict[str, list[int]]:
    if isinstance(strategy, FedDAHStrategy):
        return {k: list(t.organs) for k, t in strategy.hyper.tasks.items()}
    return strategy_tasks(strategy)


def load_state(state_dir: os.PathLike | str, fingerprint: str) -> tuple[Strategy, dict[str, Any]]:
    """The committed strategy of a coordinator state folder, refused for another architecture."""
    from nnunet_feddah.nnunet.network import is_head

    state_dir = Path(state_dir)
    try:
        record = checkpoint.read_record(state_dir)
    except checkpoint.CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    if record is None:
        raise ExportError(f"{state_dir} has no {checkpoint.RECORD}: not a coordinator state folder, or no round "
                          f"has been committed yet. Fix: pass the --state folder of `nnfeddah coordinate`")
    found = record.get("architecture_fingerprint")
    if found != fingerprint:
        raise ExportError(f"{state_dir / checkpoint.RECORD}: field 'architecture_fingerprint' is {found}, but the "
                          f"shared plans give {fingerprint}. Fix: export with the plans the federation trained")
    try:
        strategy = checkpoint.load_strategy(state_dir / record["strategy_file"], fingerprint, is_head)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    return strategy, record


# ---------------------------------------------------------------------------------------------- folders
def model_folder_name(plans_identifier: str, configuration: str = CONFIGURATION) -> str:
    return f"{TRAINER_NAME}__{plans_identifier}__{configuration}"


def checkpoint_name(task_key: str) -> str:
    return f"{task_key}.pth"


def _env_folder(name: str) -> Path:
    from nnunet_feddah.paths import require_nnunet_env

    try:
        return require_nnunet_env(name)[name]
    except OSError as exc:
        raise ExportError(str(exc)) from exc


def _dataset_id(dataset: Union[int, str]) -> int | None:
    text = str(dataset)
    if text.isdigit():
        return int(text)
    return int(text[7:10]) if _DATASET_NAME.match(text) else None


def _site_folders(plan: FederationPlan | None, dataset: Union[int, str]) -> dict[str, Path] | None:
    """nnU-Net folders of the plan's site that holds ``dataset`` when it has an ``nnunet_root`` (else None)."""
    if plan is None:
        return None
    for site in plan.sites:
        if site.nnunet_root is not None and _dataset_id(site.dataset) == _dataset_id(dataset):
            return plan.nnunet_folders(site)
    return None


def resolve_dataset(dataset: Union[int, str], preprocessed: Path) -> str:
    """``701`` or ``Dataset701_X`` -> the folder name under ``preprocessed`` (which must hold it)."""
    text = str(dataset)
    if _DATASET_NAME.match(text):
        name = text
    elif text.isdigit():
        matches = sorted(p.name for p in preprocessed.glob(f"Dataset{int(text):03d}_*") if p.is_dir())
        if len(matches) != 1:
            what = "not found" if not matches else f"ambiguous ({matches})"
            raise ExportError(f"dataset {dataset!r} {what} in {preprocessed}. Fix: install the shared plans there "
                              f"(`nnfeddah plans install`) or give the full name (Dataset###_Name)")
        name = matches[0]
    else:
        raise ExportError(f"dataset {dataset!r} is neither an id (e.g. 701) nor a name (Dataset701_Name)")
    if not (preprocessed / name).is_dir():
        raise ExportError(f"dataset {name}: {preprocessed / name} does not exist. Fix: install the shared plans "
                          f"for it (`nnfeddah plans install --plans-file <shared plans> -d {dataset}`)")
    return name


def read_json(path: Path, what: str, error: type[ValueError] = ExportError) -> dict:
    """A JSON file the caller needs; missing or invalid raises ``error`` naming the file and what it is for."""
    if not path.is_file():
        raise error(f"{path} does not exist ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc})") from exc


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
    data = read_json(path, "plans or federation plan")
    if "configurations" in data:
        return None, data, plans_identifier or data.get("plans_name")
    fed = load_plan(path)
    return fed, None, plans_identifier or fed.plans_identifier


def _select_tasks(strategy: Strategy, tasks: Sequence[str] | None, strategy_file: Path) -> dict[str, list[int]]:
    available = strategy_tasks(strategy)
    if tasks is None:
        if not available:
            raise ExportError(f"{strategy_file}: no task has an accepted upload yet (field 'tasks'); nothing to export")
        return available
    registered = _registered_tasks(strategy)
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
    name = resolve_dataset(dataset, preprocessed)
    if plans is None:
        plans = read_json(preprocessed / name / f"{plans_identifier}.json",
                           f"shared plans {plans_identifier!r} of {name}; run `nnfeddah plans install` for it")
    if configuration not in plans.get("configurations", {}):
        raise ExportError(f"plans {plans_identifier}: field 'configurations.{configuration}' is missing")
    dataset_json_file = preprocessed / name / "dataset.json"
    raw = folders["nnUNet_raw"] if folders else Path(os.environ.get("nnUNet_raw", preprocessed))
    if not dataset_json_file.is_file() and (raw / name / "dataset.json").is_file():
        dataset_json_file = raw / name / "dataset.json"
    dataset_json = amos_dataset_json(read_json(dataset_json_file, f"dataset.json of {name}"))
    input_channels = num_input_channels(dataset_json)
    fingerprint = architecture_fingerprint(plans, input_channels, configuration)

    strategy, record = load_state(state_dir, fingerprint)
    strategy_file = Path(state_dir) / record["strategy_file"]
    chosen = _select_tasks(strategy, tasks, strategy_file)

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
            "strategy": strategy.name, "state_dir": str(Path(state_dir).resolve()), "round": record["round"],
            "architecture_fingerprint": fingerprint, "suppression_margin": SUPPRESSION_MARGIN,
        }
        ckpt = nnunet_checkpoint(nnunet_state_dict(plans, weights, input_channels, configuration), plans,
                                 dataset_json, configuration, record["round"], provenance)
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
    _write_manifest(model_folder, exported, strategy.name, state_dir, record, fingerprint, name, plans_identifier,
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
    found = architecture_fingerprint(read_json(existing, "plans of an earlier export"), input_channels, configuration)
    if found != fingerprint:
        raise ExportError(f"{existing} describes another architecture ({found}, this export: {fingerprint}); the "
                          f"checkpoints already in {model_folder} would no longer load. Fix: remove that folder or "
                          f"export to another --results folder")


def _write_manifest(model_folder: Path, exported: Sequence[ExportedTask], strategy: str, state_dir, record: Mapping,
                    fingerprint: str, dataset: str, plans_identifier: str, configuration: str) -> None:
    path = model_folder / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    tasks = dict(manifest.get("tasks", {})) if manifest.get("architecture_fingerprint") == fingerprint else {}
    for item in exported:
        tasks[item.key] = {"organs": list(item.organs), "checkpoint": f"fold_{FOLD}/{item.checkpoint.name}",
                           "amos_labels": [BACKGROUND, *item.organs], "round": record["round"]}
    atomic_write_json(path, {
        "format": MANIFEST_FORMAT, "strategy": strategy, "state_dir": str(Path(state_dir).resolve()),
        "round": record["round"], "architecture_fingerprint": fingerprint, "dataset": dataset,
        "plans_identifier": plans_identifier, "configuration": configuration, "trainer": TRAINER_NAME,
        "labels": "AMOS ids (output channel == AMOS label id; organs outside a task are never predicted)",
        "tasks": tasks,
    })


def predict_command(dataset: str, plans_identifier: str, task_key: str, input_folder: str = "IN",
                    output_folder: str = "OUT", configuration: str = CONFIGURATION, device: str = "cpu") -> list[str]:
    """The ``nnUNetv2_predict`` command line for one exported task."""
    return ["nnUNetv2_predict", "-i", input_folder, "-o", output_folder, "-d", dataset, "-c", configuration,
            "-tr", TRAINER_NAME, "-p", plans_identifier, "-f", str(FOLD), "-chk", checkpoint_name(task_key),
            "-device", device]


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
    try:
        start = time.perf_counter()
        folder = export_tasks(args.state, args.plan or args.plans_file, args.dataset, args.plans, args.tasks,
                              args.results, args.configuration, log=print)
        manifest = json.loads((folder / MANIFEST).read_text())
        print(f"[export] {len(manifest['tasks'])} task(s) in {folder} ({time.perf_counter() - start:.1f} s); "
              f"predict with:")
        for key in manifest["tasks"]:
            print("  " + " ".join(predict_command(manifest["dataset"], manifest["plans_identifier"], key,
                                                  configuration=manifest["configuration"])))
        return 0
    except (ExportError, ValueError, OSError) as exc:
        print(f"nnfeddah export: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
