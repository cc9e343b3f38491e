"""The centralized reference: pooled preprocessed datasets per task and a short training run on one.

Uses the session's two-site phantom (conftest: site 701 annotates every organ, 702 kidneys + liver; 5
training + 1 test case each) read-only; pooled datasets are written into this test's own folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.federation.site_data import SiteData
from nnunet_feddah.research import centralized
from nnunet_feddah.research.centralized import PooledDatasetError, pool_task_dataset, pooled_dataset_name

POOLED_ID = 961


@pytest.fixture
def plan(phantom_federation):
    # "full" trains liver, "partial" trains kidneys: for kidneys the two site selections differ
    return parse_plan({
        "name": "central", "plans_identifier": phantom_federation["plans"], "rounds_per_step": 1,
        "local": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "max_validation_cases": 1},
        "sites": [{"name": "full", "dataset": phantom_federation["full"], "stream": ["liver"]},
                  {"name": "partial", "dataset": phantom_federation["partial"], "stream": ["kidneys"]}],
        "strategy": {"name": "fedavg-per-task"}})


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    return {"nnUNet_preprocessed": tmp_path / "pre", "nnUNet_results": tmp_path / "res"}


def site_cases(fed, key: str) -> tuple[set[str], set[str], dict]:
    """Training and test case ids of a phantom site (raw folder) and its fold 0 (as nnU-Net makes it)."""
    raw = Path(os.environ["nnUNet_raw"]) / fed[key]
    train = {p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz")}
    test = {p.name[: -len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz")}
    splits_file = Path(os.environ["nnUNet_preprocessed"]) / fed[key] / "splits_final.json"
    if splits_file.is_file():
        fold0 = json.loads(splits_file.read_text())[0]
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        fold0 = generate_crossval_split(sorted(train), seed=12345, n_splits=5)[0]
    return train, test, fold0


def pooled_ids(folder: Path) -> set[str]:
    return {p.stem for p in (folder / "FedDAHPlansCPU_3d_fullres").glob("*.pkl")}


def test_pooled_dataset_holds_exactly_the_annotating_sites_training_cases(plan, folders, phantom_federation):
    fed = phantom_federation
    full_train, full_test, full_fold = site_cases(fed, "full")
    part_train, part_test, part_fold = site_cases(fed, "partial")
    assert full_test and part_test

    spleen = pool_task_dataset(plan, "spleen", POOLED_ID, folders=folders)  # only "full" annotates the spleen
    assert spleen.name == pooled_dataset_name(POOLED_ID, "spleen") == "Dataset961_FedDAHPooled-spleen"
    assert pooled_ids(spleen) == {f"full__{c}" for c in full_train}

    kidneys = pool_task_dataset(plan, "kidneys", POOLED_ID + 1, folders=folders)  # both annotate the kidneys
    expected = {f"full__{c}" for c in full_train} | {f"partial__{c}" for c in part_train}
    assert pooled_ids(kidneys) == expected
    assert not {f"{s}__{c}" for s, t in (("full", full_test), ("partial", part_test)) for c in t} & pooled_ids(kidneys)
    data = kidneys / "FedDAHPlansCPU_3d_fullres"
    assert {p.name.split(".")[0].removesuffix("_seg") for p in data.iterdir()} == expected  # nothing else in there
    source = Path(os.environ["nnUNet_preprocessed"]) / fed["partial"] / "FedDAHPlansCPU_3d_fullres"
    case = sorted(part_train)[0]
    for suffix in (".pkl", ".b2nd", "_seg.b2nd"):
        assert os.stat(data / f"partial__{case}{suffix}").st_ino == os.stat(source / f"{case}{suffix}").st_ino

    splits = json.loads((kidneys / "splits_final.json").read_text())
    assert len(splits) == 1
    assert splits[0]["train"] == [f"full__{c}" for c in full_fold["train"]] + [f"partial__{c}" for c in part_fold["train"]]
    assert splits[0]["val"] == [f"full__{c}" for c in full_fold["val"]] + [f"partial__{c}" for c in part_fold["val"]]

    meta = json.loads((kidneys / "dataset.json").read_text())
    assert meta["feddah"]["annotated_organs"] == [2, 3] and meta["numTraining"] == len(expected)
    assert meta["labels"]["right kidney"] == 2 and meta["labels"]["liver"] == 6
    plans = json.loads((kidneys / "FedDAHPlansCPU.json").read_text())
    assert plans["dataset_name"] == kidneys.name
    assert plans["feddah"]["architecture_fingerprint"] == next(iter(fed["fingerprints"].values()))
    assert {p["site"] for p in meta["feddah"]["sites"]} == {"full", "partial"}
    fingerprint = json.loads((kidneys / "dataset_fingerprint.json").read_text())  # nnU-Net's trainer copies it
    assert len(fingerprint["spacings"]) == len(fingerprint["shapes_after_crop"]) == len(expected)
    assert fingerprint["foreground_intensity_properties_per_channel"] == plans["foreground_intensity_properties_per_channel"]


def test_rerun_reuses_and_other_inputs_rebuild_atomically(plan, folders, monkeypatch):
    first = pool_task_dataset(plan, "kidneys", POOLED_ID, folders=folders)
    stamp = os.stat(first / "dataset.json")
    again = pool_task_dataset(plan, "kidneys", POOLED_ID, folders=folders)
    assert again == first and os.stat(again / "dataset.json").st_mtime_ns == stamp.st_mtime_ns
    assert os.stat(again / "dataset.json").st_ino == stamp.st_ino

    # another site set: a rebuild that fails half-way leaves the old folder whole and no temp folder behind
    def broken(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(centralized, "_link", broken)
    with pytest.raises(OSError, match="disk full"):
        pool_task_dataset(plan, "kidneys", POOLED_ID, sites="stream", folders=folders)
    assert os.stat(first / "dataset.json").st_ino == stamp.st_ino and len(pooled_ids(first)) == 10
    assert sorted(p.name for p in folders["nnUNet_preprocessed"].iterdir()) == [first.name]
    monkeypatch.undo()

    rebuilt = pool_task_dataset(plan, "kidneys", POOLED_ID, sites="stream", folders=folders)  # only "partial"
    assert rebuilt == first and {i.split("__")[0] for i in pooled_ids(rebuilt)} == {"partial"}
    assert sorted(p.name for p in folders["nnUNet_preprocessed"].iterdir()) == [first.name]


def test_clear_refusals(plan, folders, tmp_path):
    with pytest.raises(PooledDatasetError, match="no site .* has the task in its stream"):
        pool_task_dataset(plan, "spleen", POOLED_ID, sites="stream", folders=folders)
    (folders["nnUNet_preprocessed"] / "Dataset961_Other").mkdir(parents=True)
    with pytest.raises(PooledDatasetError, match="already has dataset id 961"):
        pool_task_dataset(plan, "kidneys", POOLED_ID, folders=folders)
    bad = SiteData("x", "Dataset1_X", tmp_path, tmp_path / "p.json", "fp")
    good = SiteData("y", "Dataset2_Y", tmp_path, tmp_path / "p.json", "fp")
    with pytest.raises(PooledDatasetError, match=r"site x: .*dataset.json: .*field 'labels': 'liver' has id 7"):
        centralized._pooled_labels([(bad, {"labels": {"background": 0, "liver": 7}})])
    with pytest.raises(PooledDatasetError, match="field 'channel_names'"):
        centralized._pooled_labels([(good, {"labels": {"liver": 6}, "channel_names": {"0": "CT"}}),
                                    (bad, {"labels": {"liver": 6}, "channel_names": {"0": "MR"}})])


@pytest.mark.slow  # 18-22 s measured on two busy cores
def test_train_centralized_runs_a_few_iterations(plan, folders, tmp_path):
    """Two iterations of nnU-Net on the pooled kidneys (mostly trainer start-up)."""
    from nnunet_feddah.research.centralized import train_centralized

    with pytest.raises(ValueError, match="multiple of the plan's local.iterations_per_epoch"):
        train_centralized(plan, "kidneys", 3, dataset_id=POOLED_ID, work_dir=tmp_path, folders=folders)
    weights, metrics = train_centralized(plan, "kidneys", 2, dataset_id=POOLED_ID, work_dir=tmp_path / "w",
                                         seed=1, folders=folders)
    assert metrics["iterations"] == 2 and metrics["epochs"] == 1 and metrics["task"] == "kidneys"
    assert metrics["num_training_cases"] == 8 and metrics["pooled_dataset"] == pooled_dataset_name(POOLED_ID, "kidneys")
    assert weights["decoder.seg_layers.0.weight"].shape[0] == 3  # background + 2 kidneys
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
