"""The centralized reference: one nnU-Net per task trained on the pooled training cases of its sites.

What federated continual learning is measured against: a model that saw, at once, the data the federation
only saw site by site. For a task, :func:`pool_task_dataset` writes one preprocessed nnU-Net dataset
``DatasetNNN_FedDAHPooled-<task>`` (``+`` in task keys becomes ``-``) into ``nnUNet_preprocessed``:

* **Sites** — by default every site of the plan that *annotates all organs of the task*
  (``feddah.annotated_organs`` of its preprocessed dataset.json, :func:`~nnunet_feddah.organs.annotated_organs`),
  whether or not the task is in its stream; ``sites="stream"`` takes only the sites whose stream
  contains the task (the data the federation trained this very task on).
* **Cases** — each chosen site's preprocessed training cases (nnU-Net preprocesses only ``imagesTr``:
  test cases are never in it), hard-linked (copied where links fail) under the id ``<site>__<case>``, so
  cases of different sites never collide. nnU-Net's per-case files hold no case id, so a link is enough.
* **Split** — ``splits_final.json`` with one fold: train = union of the sites' fold-0 training keys,
  val = union of their fold-0 validation keys. A site's fold 0 is its own ``splits_final.json`` if it
  has one, else the split nnU-Net writes on its first training (``generate_crossval_split``, seed 12345),
  so the reference trains and validates on exactly the cases the federation did.
* **Plans, fingerprint and labels** — the shared plans (one site's file, ``dataset_name`` set to the
  pooled dataset; all sites must agree on architecture fingerprint, configuration and intensity
  statistics), a ``dataset_fingerprint.json`` joined from the sites' (nnU-Net's trainer copies it, see
  :func:`_write_fingerprint`), and a dataset.json whose ``labels`` are the union of the sites' AMOS
  labels (site label files keep AMOS ids, which :func:`~nnunet_feddah.organs.organs_in_dataset_json`
  enforces: a site with another id for an organ is refused naming its file, so no remapping is needed)
  and whose ``feddah.annotated_organs`` are the task's organs only: a site that does not annotate some
  other organ must not teach the reference that this organ is background.

Re-running with the same inputs (same sites, cases, source files, plans) reuses the folder; any change
rebuilds it in a hidden sibling folder that is swapped in only when complete. :func:`train_centralized`
trains one model on it with :func:`nnunet_feddah.nnunet.trainer.train_round`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.data.sites import writing_folder, written_by
from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.federation.site_data import SiteData, validate_sites
from nnunet_feddah.nnunet.datasets import folder_name, nnunet_folders
from nnunet_feddah.nnunet.round_config import RoundConfig
from nnunet_feddah.nnunet.weights import load_weights
from nnunet_feddah.organs import ORGANS, Task, annotated_organs, organs_in_dataset_json
from nnunet_feddah.paths import CONFIGURATION, NNUNET_DIR_VARS, require_nnunet_env

GENERATOR = "nnunet_feddah.centralized"  # feddah.generator of a pooled dataset.json: only such folders are replaced
FORMAT = 1  # bump when the pooled layout changes, so old folders are rebuilt
SELECTIONS = ("annotating", "stream")
SEPARATOR = "__"  # <site>__<case>
CASE_SUFFIXES = (".pkl", ".b2nd", "_seg.b2nd", ".npz", ".npy", "_seg.npy")  # nnU-Net 2.8.1 blosc2 and numpy datasets
PLANS_FIELDS = ("configurations", "foreground_intensity_properties_per_channel", "transpose_forward",
                "transpose_backward", "image_reader_writer")  # what must agree between sites to pool their cases


class PooledDatasetError(FedDAHError, ValueError):
    """Sites that cannot be pooled for a task; the message names the site, the file, the field and the fix."""


def pooled_dataset_name(dataset_id: int, task: Task | str) -> str:
    """``DatasetNNN_FedDAHPooled-<task key>`` (``+`` -> ``-``: nnU-Net names allow letters, digits, ``_.-``)."""
    return folder_name(dataset_id, f"FedDAHPooled-{Task.parse(task).key.replace('+', '-')}")


def pooled_folders(plan: FederationPlan) -> dict[str, Path]:
    """Where the reference lives: the plan's ``nnunet_root`` if it has one, else the nnUNet_* variables."""
    if plan.nnunet_root is not None:
        return {name: plan.nnunet_root / name for name in NNUNET_DIR_VARS}
    folders = require_nnunet_env("nnUNet_preprocessed", "nnUNet_results")
    if os.environ.get("nnUNet_raw"):
        folders["nnUNet_raw"] = Path(os.environ["nnUNet_raw"])
    return folders


def _read_json(path: Path, site: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PooledDatasetError(f"site {site}: cannot read {path} ({exc}). Fix: reinstall the shared plans "
                                 f"(`nnfeddah plans install`)") from exc


def _choose_sites(plan: FederationPlan, task: Task, selection: str) -> list[tuple[SiteData, dict]]:
    if selection not in SELECTIONS:
        raise ValueError(f"sites must be one of {SELECTIONS}, got {selection!r}")
    found = validate_sites(plan, check_cases=False)
    chosen = []
    for site in plan.sites:
        data = found[site.name]
        dataset_json = _read_json(data.preprocessed / "dataset.json", site.name)
        if selection == "stream":
            take = any(t.key == task.key for t in site.stream)
        else:
            try:
                have = {o.label for o in annotated_organs(dataset_json)}
            except ValueError as exc:
                raise PooledDatasetError(f"site {site.name}: {data.preprocessed / 'dataset.json'}: {exc}") from exc
            take = set(task.labels) <= have
        if take:
            chosen.append((data, dataset_json))
    if not chosen:
        what = "has the task in its stream" if selection == "stream" else "annotates all of its organs"
        raise PooledDatasetError(f"task {task.key!r}: no site of plan {plan.source} {what} "
                                 f"({', '.join(o.key for o in task.organs)}); nothing to pool")
    return chosen


def _data_identifier(plans: Mapping, plans_identifier: str) -> str:
    return plans.get("configurations", {}).get(CONFIGURATION, {}).get("data_identifier",
                                                                      f"{plans_identifier}_{CONFIGURATION}")


def _site_split(data: SiteData, identifiers: list[str]) -> tuple[list[str], list[str]]:
    """Fold 0 of a site: its splits_final.json, else the seeded 5-fold split nnU-Net would write."""
    splits_file = data.preprocessed / "splits_final.json"
    if splits_file.is_file():
        splits = _read_json(splits_file, data.site)
        if not isinstance(splits, list) or not splits or not {"train", "val"} <= set(splits[0]):
            raise PooledDatasetError(f"site {data.site}: {splits_file} has no fold 0 with 'train' and 'val'. Fix: "
                                     f"delete it (nnU-Net writes its default split again) or repair fold 0")
        train, val = list(splits[0]["train"]), list(splits[0]["val"])
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        try:
            split = generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5)[0]
        except ValueError as exc:
            raise PooledDatasetError(f"site {data.site}: nnU-Net's default 5-fold split of its {len(identifiers)} "
                                     f"preprocessed cases failed ({exc}). Fix: give the site at least 5 training "
                                     f"cases or write {splits_file}") from exc
        train, val = list(split["train"]), list(split["val"])
    unknown = sorted(set(train + val) - set(identifiers))
    if unknown:
        raise PooledDatasetError(f"site {data.site}: fold 0 of {splits_file} names cases {unknown[:5]} that are "
                                 f"not preprocessed. Fix: delete the stale split or preprocess the site again")
    return train, val


def _case_files(folder: Path, case: str) -> list[str]:
    names = [case + suffix for suffix in CASE_SUFFIXES if (folder / (case + suffix)).is_file()]
    if f"{case}.pkl" not in names:
        raise PooledDatasetError(f"{folder}: case {case} has no {case}.pkl. Fix: preprocess the site again")
    return names


def _check_plans(chosen: Sequence[tuple[SiteData, dict]]) -> dict:
    reference, ref_plans = chosen[0][0], _read_json(chosen[0][0].plans_file, chosen[0][0].site)
    for data, _ in chosen[1:]:
        plans = _read_json(data.plans_file, data.site)
        differ = [f for f in PLANS_FIELDS if plans.get(f) != ref_plans.get(f)]
        if data.fingerprint != reference.fingerprint:
            differ.insert(0, "feddah.architecture_fingerprint")
        if differ:
            raise PooledDatasetError(
                f"site {data.site}: {data.plans_file} differs from {reference.plans_file} (site {reference.site}) in "
                f"field(s) {differ}; cases preprocessed with different plans cannot be pooled. Fix: install the same "
                f"shared plans at every site (`nnfeddah plans install --plans-file ...`)")
    return ref_plans


def _pooled_labels(chosen: Sequence[tuple[SiteData, dict]]) -> dict[str, int]:
    """Union of the sites' AMOS labels (ids are AMOS everywhere; anything else is refused, naming the file)."""
    ids: set[int] = set()
    ref_json = chosen[0][1]
    for data, dataset_json in chosen:
        try:
            ids |= set(organs_in_dataset_json(dataset_json))
        except ValueError as exc:
            raise PooledDatasetError(f"site {data.site}: {data.preprocessed / 'dataset.json'}: {exc}") from exc
        for key in ("channel_names", "file_ending"):
            if dataset_json.get(key) != ref_json.get(key):
                raise PooledDatasetError(
                    f"site {data.site}: {data.preprocessed / 'dataset.json'} field '{key}' is "
                    f"{dataset_json.get(key)!r} but site {chosen[0][0].site} has {ref_json.get(key)!r}; "
                    f"cases with different inputs cannot be pooled")
    return {"background": 0, **{o.amos_spelling: o.label for o in ORGANS if o.label in ids}}


def _collect(plan: FederationPlan, task: Task, selection: str) -> dict[str, Any]:
    """Everything the pooled dataset is made of, as JSON (its hash decides whether a folder can be reused)."""
    chosen = _choose_sites(plan, task, selection)
    plans = _check_plans(chosen)
    data_id = _data_identifier(plans, plan.plans_identifier)
    sites: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for data, _ in chosen:
        folder = data.preprocessed / data_id
        identifiers = sorted(p.stem for p in folder.glob("*.pkl"))
        if not identifiers:
            raise PooledDatasetError(f"site {data.site}: no preprocessed cases in {folder}. Fix: "
                                     f"`nnfeddah plans install --plans-file <shared plans> -d {data.dataset_name}`")
        train, val = _site_split(data, identifiers)
        cases = {}
        for case in sorted(set(train) | set(val)):
            pooled = f"{data.site}{SEPARATOR}{case}"
            if pooled in seen:
                raise PooledDatasetError(f"case id {pooled} comes from site {seen[pooled]} and site {data.site}; "
                                         f"rename one of the sites in {plan.source}")
            seen[pooled] = data.site
            cases[case] = {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns]
                           for name in _case_files(folder, case)}
        fingerprint = data.preprocessed / "dataset_fingerprint.json"
        sites.append({"site": data.site, "dataset": data.dataset_name, "preprocessed": str(data.preprocessed),
                      "data_folder": str(folder), "train": train, "val": val, "files": cases,
                      "fingerprint_file": [fingerprint.stat().st_size, fingerprint.stat().st_mtime_ns]})
    return {"format": FORMAT, "task": task.key, "organs": list(task.labels), "selection": selection,
            "plans_identifier": plan.plans_identifier, "data_identifier": data_id,
            "plans": {k: plans.get(k) for k in PLANS_FIELDS}, "fingerprint": chosen[0][0].fingerprint,
            "labels": _pooled_labels(chosen), "dataset_json": {k: chosen[0][1].get(k) for k in
                                                               ("channel_names", "file_ending")},
            "sites": sites, "_plans_file": str(chosen[0][0].plans_file)}


def _signature(inputs: Mapping[str, Any]) -> str:
    text = json.dumps({k: v for k, v in inputs.items() if not k.startswith("_")}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _write(tmp: Path, name: str, inputs: Mapping[str, Any], signature: str) -> None:
    data_folder = tmp / inputs["data_identifier"]
    data_folder.mkdir()
    gt_folder = tmp / "gt_segmentations"
    ending = inputs["dataset_json"]["file_ending"]
    train, val = [], []
    for site in inputs["sites"]:
        source = Path(site["data_folder"])
        source_gt = Path(site["preprocessed"]) / "gt_segmentations"
        for case, files in site["files"].items():
            pooled = f"{site['site']}{SEPARATOR}{case}"
            for file in files:
                _link(source / file, data_folder / (pooled + file[len(case):]))
            if ending and (source_gt / f"{case}{ending}").is_file():
                gt_folder.mkdir(exist_ok=True)
                _link(source_gt / f"{case}{ending}", gt_folder / f"{pooled}{ending}")
        train += [f"{site['site']}{SEPARATOR}{c}" for c in site["train"]]
        val += [f"{site['site']}{SEPARATOR}{c}" for c in site["val"]]
    _write_fingerprint(tmp, inputs)
    (tmp / "splits_final.json").write_text(json.dumps([{"train": train, "val": val}], indent=2) + "\n")
    plans = json.loads(Path(inputs["_plans_file"]).read_text())
    plans["dataset_name"] = name
    (tmp / f"{inputs['plans_identifier']}.json").write_text(json.dumps(plans, indent=2) + "\n")
    dataset_json = {
        "name": name,
        "description": f"Pooled training cases of {', '.join(s['site'] for s in inputs['sites'])} for task "
                       f"{inputs['task']} (centralized reference)",
        **copy.deepcopy(inputs["dataset_json"]),
        "labels": inputs["labels"],
        "numTraining": len(train) + len(val),
        "feddah": {"annotated_organs": inputs["organs"], "generator": GENERATOR, "task": inputs["task"],
                   "site_selection": inputs["selection"], "source_signature": signature,
                   "sites": [{"site": s["site"], "dataset": s["dataset"], "train": len(s["train"]),
                              "val": len(s["val"])} for s in inputs["sites"]]},
    }
    (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")


def _write_fingerprint(tmp: Path, inputs: Mapping[str, Any]) -> None:
    """nnU-Net's dataset_fingerprint.json of the pool (the trainer copies it into its output folder).

    Per-case spacings and shapes are the sites' lists joined (every training case is pooled); the intensity
    statistics are those of the shared plans, i.e. what CT normalisation of every pooled case used; the
    relative size after cropping is the median of the sites' values (nnU-Net keeps no per-case value).
    """
    parts = [json.loads((Path(s["preprocessed"]) / "dataset_fingerprint.json").read_text()) for s in inputs["sites"]]
    fingerprint = {
        "foreground_intensity_properties_per_channel": inputs["plans"]["foreground_intensity_properties_per_channel"],
        "median_relative_size_after_cropping": float(statistics.median(
            p.get("median_relative_size_after_cropping", 1.0) for p in parts)),
        "shapes_after_crop": [shape for p in parts for shape in p.get("shapes_after_crop", [])],
        "spacings": [spacing for p in parts for spacing in p.get("spacings", [])],
        "feddah": {"pooled_from": [s["dataset"] for s in inputs["sites"]],
                   "intensity_properties": "the shared plans' (used to normalise every pooled case)"},
    }
    (tmp / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")


def _reusable(target: Path, signature: str, inputs: Mapping[str, Any]) -> bool:
    """The folder was written from exactly these inputs and still holds every case."""
    try:
        meta = json.loads((target / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {f"{s['site']}{SEPARATOR}{c}" for s in inputs["sites"] for c in s["files"]}
    present = {p.stem for p in (target / inputs["data_identifier"]).glob("*.pkl")}
    return (meta.get("feddah", {}).get("source_signature") == signature
            and (target / "splits_final.json").is_file() and present == expected)


def _check_id(folders: Mapping[str, Path], dataset_id: int, name: str) -> None:
    """Refuse an id that another dataset already uses (nnU-Net finds datasets by id) or a foreign folder."""
    for variable, root in folders.items():
        clash = sorted(p.name for p in Path(root).glob(folder_name(dataset_id, "*")) if p.name != name)
        if clash:
            raise PooledDatasetError(f"{variable} {root} already has dataset id {dataset_id:03d} ({', '.join(clash)}); "
                                     f"nnU-Net finds datasets by id. Fix: choose another dataset_id for the pooled "
                                     f"dataset of this task")
    target = Path(folders["nnUNet_preprocessed"]) / name
    if target.exists() and not written_by(target, GENERATOR):
        raise PooledDatasetError(f"{target} exists and was not written by {GENERATOR}; move it away or choose "
                                 f"another dataset_id")


def pool_task_dataset(plan: FederationPlan, task_key: str, dataset_id: int, *, sites: str = "annotating",
                      folders: Mapping[str, Path] | None = None) -> Path:
    """Write (or reuse) the pooled preprocessed dataset of a task; returns its folder (see the module doc).

    ``sites``: ``"annotating"`` (default: every plan site annotating all the task's organs) or ``"stream"``
    (the sites whose stream contains the task). ``folders`` are the nnU-Net folders to write into
    (default :func:`pooled_folders`). The sites are checked with
    :func:`~nnunet_feddah.federation.site_data.validate_sites` first.
    """
    task = Task.parse(task_key)
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999 (nnU-Net's range), got {dataset_id!r}")
    folders = dict(folders or pooled_folders(plan))
    name = pooled_dataset_name(dataset_id, task)
    _check_id(folders, dataset_id, name)
    inputs = _collect(plan, task, sites)
    signature = _signature(inputs)
    target = Path(folders["nnUNet_preprocessed"]) / name
    if _reusable(target, signature, inputs):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with writing_folder(target) as tmp:
        _write(tmp, name, inputs, signature)
    return target


def train_centralized(plan: FederationPlan, task_key: str, iterations: int, *, dataset_id: int, work_dir: Path,
                      initial_weights: os.PathLike | str | None = None, seed: int = 0, sites: str = "annotating",
                      device: str = "cpu", folders: Mapping[str, Path] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the task's centralized reference for ``iterations`` iterations; returns (weights, metrics).

    ``iterations`` must be a multiple of the plan's ``local.iterations_per_epoch`` (epochs = the quotient;
    the poly learning rate runs over these epochs alone); every other round-config field of the plan's
    ``local`` section (validation batches and cases, learning rate, augmentation, ...) is the plan's.
    Starts from ``initial_weights`` (a weights file) or nnU-Net's initialisation; ``seed`` seeds the
    initialisation, sampling and augmentation. The pooled dataset is made (or reused) by
    :func:`pool_task_dataset`; the round files go to ``work_dir/centralized_<task>/``; the metrics are
    the trainer's plus ``pooled_dataset`` and ``pooled_sites``.
    """
    from nnunet_feddah.nnunet.trainer import train_round

    task = Task.parse(task_key)
    per_epoch = plan.local.iterations_per_epoch
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1 or iterations % per_epoch:
        raise ValueError(f"iterations must be a positive multiple of the plan's local.iterations_per_epoch "
                         f"({per_epoch}), got {iterations!r}")
    folders = dict(folders or pooled_folders(plan))
    pooled = pool_task_dataset(plan, task.key, dataset_id, sites=sites, folders=folders)
    out = Path(work_dir) / f"centralized_{task.key}"
    out.mkdir(parents=True, exist_ok=True)
    epochs = iterations // per_epoch
    # the plan's local settings that a round config takes (a plan-only choice such as the LR schedule is not one:
    # the reference has one poly curve over its own epochs)
    known = {f.name for f in fields(RoundConfig)}
    local = {k: v for k, v in asdict(plan.local).items() if k in known}
    config = RoundConfig.from_mapping({
        **local, "task": task.key, "output_weights": str(out / "weights.safetensors"),
        "output_metrics": str(out / "metrics.json"), "initial_weights": str(initial_weights) if initial_weights else None,
        "epochs": epochs, "iterations_per_epoch": per_epoch, "epoch_offset": 0, "total_epochs": epochs,
        "seed": seed}, source=str(out / "round.json"))
    config.save(out / "round.json")
    with nnunet_folders(folders):
        metrics = train_round(pooled.name, plan.plans_identifier, config, device=device)
    weights, _ = load_weights(out / "weights.safetensors")
    meta = json.loads((pooled / "dataset.json").read_text())["feddah"]
    metrics = {**metrics, "pooled_dataset": pooled.name, "pooled_sites": meta["sites"]}
    return weights, metrics
