"""AMOS22 -> site datasets: nnU-Net's case selection, scanner split, partial labels, shared plans, the paper plan.

The miniature AMOS folder is made of phantom cases from two phantom scanners, renamed ``amos_XXXX``, with
an AMOS-style dataset.json (AMOS's own label spellings, ``arota`` included), AMOS's metadata CSV and two
ids above 500 that nnU-Net's conversion must drop as MRI.

The end-to-end test installs the *CPU* plans template: the AMOS template's 64x160x160 patch at
2x0.71x0.71 mm is far larger than the ~40x57x64 phantom images (preprocessing would resample them to
~160x480x540 voxels, minutes per case here). The AMOS template is exercised on the converted sites
through :func:`shared_plans.plans_from_template`, which fills it from the same fingerprint.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_feddah.data import amos
from nnunet_feddah.federation.plan import FederationPlanError
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.organs import annotated_organs
from nnunet_feddah.paths import bundled_plans_dir

#: AMOS22's dataset.json ``labels`` exactly as distributed (id -> name, with its typos and slashes).
AMOS_LABELS = {
    "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
    "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
    "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
    "15": "prostate/uterus",
}
SCANNERS = ("SOMATOM Force", "Optima CT660")
SITE_IDS = (721, 722)  # conftest's phantom federation uses 701/702 in the same nnUNet_raw
TRAIN_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 541)  # 541: MRI, dropped
VAL_IDS = (9, 10, 11, 12, 587)  # validation is merged into training; 587: MRI, dropped


def _build_amos_folder(root: Path) -> Path:
    """A miniature AMOS22 download: 12 CT + 2 MRI labelled cases, 1 unlabelled test image, metadata CSV."""
    from nnunet_feddah.data import phantom

    src = root / "phantom"
    phantom.write_cohort(src, num_sites=2, num_train=7, num_test=0, seed=11, first_dataset_id=1)
    per_scanner = [sorted((src / f"Dataset{k + 1:03d}_FedDAHPhantomSite{k + 1}" / "imagesTr").glob("*.nii.gz"))
                   for k in range(2)]
    pool = [(img, k) for pair in zip(*per_scanner, strict=True) for k, img in enumerate(pair)]  # alternate scanners
    base = root / "amos22"
    for sub in ("imagesTr", "labelsTr", "imagesVa", "labelsVa", "imagesTs"):
        (base / sub).mkdir(parents=True)
    meta = []
    entries: dict[str, list] = {"training": [], "validation": [], "test": []}
    for (image, scanner), amos_id in zip(pool, TRAIN_IDS + VAL_IDS, strict=True):
        split, tag = ("training", "Tr") if amos_id in TRAIN_IDS else ("validation", "Va")
        name = f"amos_{amos_id:04d}.nii.gz"
        shutil.copy(image, base / f"images{tag}" / name)
        shutil.copy(image.parent.parent / "labelsTr" / image.name.replace("_0000.nii.gz", ".nii.gz"),
                    base / f"labels{tag}" / name)
        entries[split].append({"image": f"./images{tag}/{name}", "label": f"./labels{tag}/{name}"})
        meta.append({"amos_id": amos_id, "Patient's Sex": "F", "Manufacturer's Model Name": SCANNERS[scanner],
                     "Manufacturer": ("SIEMENS", "GE MEDICAL SYSTEMS")[scanner], "Site": "Longgang"})
    shutil.copy(pool[0][0], base / "imagesTs" / "amos_0300.nii.gz")  # no public label: must be skipped
    entries["test"].append({"image": "./imagesTs/amos_0300.nii.gz"})
    (base / "dataset.json").write_text(json.dumps({
        "name": "AMOS", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": AMOS_LABELS,
        "numTraining": len(entries["training"]), "numValidation": len(entries["validation"]),
        "numTest": len(entries["test"]), **entries}, indent=2))
    with open(root / "labeled_data_meta_0000_0599.csv", "w", newline="") as fh:  # Zenodo ships it beside the zip
        writer = csv.DictWriter(fh, fieldnames=list(meta[0]))
        writer.writeheader()
        writer.writerows(meta)
    return base


def _two_site_plan(tmp: Path, plans_identifier: str) -> Path:
    """The shipped paper plan cut to its first two sites, pointed at the test's dataset ids."""
    data = json.loads((bundled_plans_dir() / "amos_4site.json").read_text())
    data["sites"] = data["sites"][:2]
    for site, dataset_id in zip(data["sites"], SITE_IDS, strict=True):
        site["dataset"] = dataset_id
    data["plans_identifier"] = plans_identifier
    path = tmp / "amos_2site.json"
    path.write_text(json.dumps(data))
    return path


def test_shipped_paper_plan_is_asynchronous() -> None:
    """4 sites, kidneys first everywhere, then at every step the sites train different organs."""
    plan = load_plan("amos_4site")
    assert plan.plans_identifier == "FedDAHPlansAMOS"
    assert [s.dataset for s in plan.sites] == [511, 512, 513, 514]
    assert {s.stream[0].key for s in plan.sites} == {"kidneys"}
    for step in range(1, len(plan.sites[0].stream)):
        tasks = [s.stream[step].key for s in plan.sites]
        assert len(set(tasks)) == len(tasks), f"step {step}: {tasks}"
    when = {}
    for s in plan.sites:
        for step, task in enumerate(s.stream):
            when.setdefault(task.key, set()).add(step)
    assert any(len(steps) > 1 for steps in when.values())  # the same task reaches sites at different times


def test_split_rules_are_deterministic() -> None:
    ids = [f"amos_{i:04d}" for i in range(1, 41)]
    first = amos.split_random(ids, 4, seed=3)
    assert first == amos.split_random(list(reversed(ids)), 4, seed=3)
    assert sorted(sum(first, [])) == ids and {len(c) for c in first} == {10}
    assert first != amos.split_random(ids, 4, seed=4)
    groups = {i: ("A" if n < 20 else "B" if n < 30 else "C" if n < 36 else "D") for n, i in enumerate(ids)}
    cases, values = amos.split_by_group(ids, groups, 4)
    assert values == [["A"], ["B"], ["C"], ["D"]] and [len(c) for c in cases] == [20, 10, 6, 4]
    train, test = amos.held_out(cases[3], 0.2, seed=0, site_number=4)
    assert len(test) == 1 and len(train) == 3 and amos.held_out(cases[3], 0.2, 0, 4) == (train, test)
    sites = amos.default_sites(4)
    assert [s.folder for s in sites][0] == "Dataset511_AMOSSite1"
    with pytest.raises(amos.AmosError, match="scanner group"):
        amos.plan_split(ids, sites, rule="metadata", metadata={i: "A" for i in ids})


def test_amos_conversion_to_federation(nnunet_work: Path, tmp_path: Path) -> None:
    from nnunet_feddah.nnunet import shared_plans

    base = _build_amos_folder(tmp_path)
    raw = nnunet_work / "nnUNet_raw"
    plan = load_plan(_two_site_plan(tmp_path, "FedDAHPlansCPU"))
    sites = amos.sites_from_plan(plan)
    paths = amos.convert(base, raw, sites, seed=0, test_fraction=1 / 3, log=lambda *_: None)
    assert [p.name for p in paths] == ["Dataset721_AMOSSite1", "Dataset722_AMOSSite2"]

    seen: set[str] = set()
    groups = []
    for path, site in zip(paths, plan.sites, strict=True):
        meta = json.loads((path / "dataset.json").read_text())
        assert meta["labels"]["arota"] == 8 and meta["labels"]["prostate/uterus"] == 15
        assert meta["channel_names"] == {"0": "CT"} and meta["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
        wanted = sorted({o.label for task in site.stream for o in task.organs})
        assert [o.label for o in annotated_organs(meta)] == wanted
        assert meta["feddah"]["split"]["rule"] == "metadata"
        groups += meta["feddah"]["scanner_groups"]
        train = sorted(p.name for p in (path / "labelsTr").iterdir())
        test = sorted(p.name for p in (path / "labelsTs").iterdir())
        assert (len(train), len(test), meta["numTraining"]) == (4, 2, 4)
        assert sorted(p.name for p in (path / "imagesTs").iterdir()) == [t.replace(".nii", "_0000.nii") for t in test]
        seen |= set(train) | set(test)
        labels = np.asanyarray(nib.load(str(path / "labelsTr" / train[0])).dataobj)
        assert set(np.unique(labels).tolist()) == {0, *wanted}  # kept organs keep their AMOS ids, others are 0
    assert sorted(groups) == sorted(SCANNERS)  # one phantom scanner per site
    assert seen == {f"amos_{i:04d}.nii.gz" for i in TRAIN_IDS + VAL_IDS if i <= 500}  # MRI gone, validation merged

    # `nnfeddah amos`'s default: both sites' statistics merged, the template filled from the merge, installed at
    # both (nnU-Net fingerprint + --verify_dataset_integrity + preprocessing), then the paper plan's check
    from nnunet_feddah.nnunet.federated_fingerprint import install_from_site_statistics

    fingerprints = install_from_site_statistics(list(SITE_IDS), "cpu", tmp_path / "fingerprint", log=lambda *_: None)
    assert len(set(fingerprints.values())) == 1
    with pytest.raises(FederationPlanError, match=r"4 training case\(s\); nnU-Net's 5-fold split.*splits_final"):
        validate_sites(plan)  # too few cases for nnU-Net's default split: every round would fail in it
    for path in paths:  # the fix the refusal names: the site gives nnU-Net its own split
        cases = sorted(p.name.removesuffix(".nii.gz") for p in (path / "labelsTr").iterdir())
        split = [{"train": cases[:3], "val": cases[3:]}]
        (nnunet_work / "nnUNet_preprocessed" / path.name / "splits_final.json").write_text(json.dumps(split))
    found = validate_sites(plan)
    assert set(found) == {"site1", "site2"} and len({d.fingerprint for d in found.values()}) == 1
    merged = json.loads((tmp_path / "fingerprint" / "dataset_fingerprint.json").read_text())
    assert sorted(p.name for p in (tmp_path / "fingerprint").iterdir()) == sorted(
        [f"{paths[0].name}.json", f"{paths[1].name}.json", "dataset_fingerprint.json",
         "dataset_fingerprint.merge_report.json"])
    for data in found.values():
        installed = json.loads(data.plans_file.read_text())
        assert installed["foreground_intensity_properties_per_channel"] == \
            merged["foreground_intensity_properties_per_channel"]

    amos_plans = shared_plans.plans_from_template(shared_plans.load_template("amos"), paths[0].name)
    config = amos_plans["configurations"]["3d_fullres"]
    assert amos_plans["plans_name"] == "FedDAHPlansAMOS" and config["patch_size"] == [64, 160, 160]
    assert amos_plans["image_reader_writer"] == "NibabelIOWithReorient"
    assert amos_plans["foreground_intensity_properties_per_channel"]["0"]["mean"] != 0
    assert all(s > 0 for s in config["median_image_size_in_voxels"])

    # a re-run replaces its own datasets but never someone else's
    other = raw / "Dataset723_Hospital"
    other.mkdir()
    (other / "dataset.json").write_text("{}")
    with pytest.raises(amos.AmosError, match="choose other ids"):
        amos.convert(base, raw, amos.default_sites(1, first_id=723), log=lambda *_: None)
    shutil.rmtree(other)
