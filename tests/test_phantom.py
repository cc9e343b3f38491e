"""The AMOS-like phantom cohort: determinism, nnU-Net validity, partial annotation, anatomy, sites, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_feddah.data import phantom
from nnunet_feddah.data.anatomy import synthesize
from nnunet_feddah.data.phantom import (
    DEFAULT_SHAPE,
    case_rng,
    default_profiles,
    main,
    make_case,
    write_site_dataset,
)
from nnunet_feddah.organs import BY_LABEL, annotated_organs, organ, organs_in_dataset_json

PROFILE = default_profiles(1)[0]


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def _hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


@pytest.fixture(scope="module")
def twin_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same site (same seed, same scanner) written twice: all organs annotated vs kidneys only."""
    root = tmp_path_factory.mktemp("raw")
    full = write_site_dataset(root / "full", 601, "Site1", PROFILE, "all", num_train=2, num_test=1, seed=7)
    kidneys = write_site_dataset(root / "kid", 602, "Site1", PROFILE, ["right kidney", "lk"], 2, 1, seed=7)
    return full, kidneys


def test_same_seed_same_case_other_seed_other_anatomy() -> None:
    image_a, labels_a = make_case(case_rng(3, "Site1", 0), PROFILE)
    image_b, labels_b = make_case(case_rng(3, "Site1", 0), PROFILE)
    assert image_a.dtype == np.float32 and labels_a.dtype == np.uint8
    assert np.array_equal(image_a, image_b) and np.array_equal(labels_a, labels_b)
    _, labels_c = make_case(case_rng(4, "Site1", 0), PROFILE)
    assert (labels_a != labels_c).mean() > 0.01


def test_written_site_passes_nnunet_integrity_check(twin_sites: tuple[Path, Path]) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    full, _ = twin_sites
    assert full.name == "Dataset601_FedDAHPhantomSite1"
    verify_dataset_integrity(str(full), num_processes=1)


def test_layout_case_ids_and_geometry(twin_sites: tuple[Path, Path]) -> None:
    full, _ = twin_sites
    subs = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
    names = {sub: sorted(p.name for p in (full / sub).iterdir()) for sub in subs}
    assert names["imagesTr"] == ["site1_0000_0000.nii.gz", "site1_0001_0000.nii.gz"]
    assert names["labelsTr"] == ["site1_0000.nii.gz", "site1_0001.nii.gz"]
    assert names["imagesTs"] == ["site1_0002_0000.nii.gz"] and names["labelsTs"] == ["site1_0002.nii.gz"]
    image, itk_image = _read(full / "imagesTr" / "site1_0000_0000.nii.gz")
    labels, itk_labels = _read(full / "labelsTr" / "site1_0000.nii.gz")
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    assert image.shape == labels.shape == DEFAULT_SHAPE
    assert image.min() >= -1024 and image.max() <= 3071
    for img in (itk_image, itk_labels):  # SimpleITK reports (x, y, z)
        assert img.GetSpacing() == pytest.approx(tuple(reversed(PROFILE.spacing_zyx)))
        assert img.GetOrigin() == (0.0, 0.0, 0.0)
        assert img.GetDirection() == pytest.approx(np.eye(3).ravel())
    assert set(np.unique(labels)) == set(range(16))


def test_dataset_json_declares_all_amos_labels(twin_sites: tuple[Path, Path]) -> None:
    full, kidneys = twin_sites
    meta = json.loads((kidneys / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 2
    assert meta["labels"] == {"background": 0, **{o.amos_spelling: o.label for o in BY_LABEL.values()}}
    assert meta["labels"]["arota"] == 8
    block = meta["feddah"]
    assert block["annotated_organs"] == [2, 3] and block["site"] == "Site1" and block["seed"] == 7
    assert block["generator"] == "nnunet_feddah.phantom" and block["num_test"] == 1
    assert block["scanner"]["spacing_zyx"] == list(PROFILE.spacing_zyx)
    assert sorted(organs_in_dataset_json(meta)) == list(range(1, 16))
    assert annotated_organs(meta) == (organ("right_kidney"), organ("left_kidney"))
    full_meta = json.loads((full / "dataset.json").read_text())
    assert full_meta["feddah"]["annotated_organs"] == list(range(1, 16))


def test_partial_annotation_keeps_the_image(twin_sites: tuple[Path, Path]) -> None:
    full, kidneys = twin_sites
    for images, labels, case in (("imagesTr", "labelsTr", "site1_0001"), ("imagesTs", "labelsTs", "site1_0002")):
        image_full, _ = _read(full / images / f"{case}_0000.nii.gz")
        image_kid, _ = _read(kidneys / images / f"{case}_0000.nii.gz")
        labels_full, _ = _read(full / labels / f"{case}.nii.gz")
        labels_kid, _ = _read(kidneys / labels / f"{case}.nii.gz")
        assert np.array_equal(image_full, image_kid), "images must not depend on the annotation set"
        assert set(np.unique(labels_kid)) == {0, 2, 3}
        assert np.array_equal(labels_kid, np.where(np.isin(labels_full, [2, 3]), labels_full, 0))
        liver = labels_full == 6
        assert liver.sum() > 1000 and not labels_kid[liver].any()
        fat_and_bowel = (labels_full == 0) & (image_full > -300) & (image_full < 300)
        assert np.median(image_kid[liver]) > 60 > np.median(image_kid[fat_and_bowel])  # a bright, unlabelled liver


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("site", [0, 1, 2, 3])
def test_anatomy_is_plausible(site: int, seed: int) -> None:
    spacing = default_profiles(4)[site].spacing_zyx
    anatomy = synthesize(np.random.default_rng([seed, site]), spacing)
    labels, voxel_ml = anatomy.labels, float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=16)
    # every organ present and > 1.2 mL (the adrenals, ~4 mL, are 14-17 voxels of 0.29 mL at the cpu size)
    assert counts[1:].min() * voxel_ml > 1.2, f"missing or tiny organs: {dict(enumerate(counts))}"
    assert not (labels > 0)[~anatomy.body].any(), "organs must lie inside the body"
    centroid = {k: np.array(ndimage.center_of_mass(labels == k)) * spacing for k in range(1, 16)}  # (z, y, x) mm
    body_x = np.array(ndimage.center_of_mass(anatomy.body))[2] * spacing[2]
    assert centroid[2][2] < body_x < centroid[3][2], "right kidney on the patient's right (low x), left on the left"
    assert centroid[6][2] < body_x < centroid[1][2], "liver right, spleen left"
    assert centroid[2][0] < centroid[3][0] + 20, "the right kidney is not clearly higher than the left"
    assert all(centroid[14][0] < centroid[k][0] for k in range(1, 14)), "bladder is the most caudal organ but one"
    assert centroid[8][1] > centroid[10][1], "pancreas lies in front of the aorta"
    assert 0.9 < counts[6] * voxel_ml / 1000 < 2.5, "liver volume (L)"
    assert all(80 < counts[k] * voxel_ml < 300 for k in (2, 3)), "kidney volume (mL)"
    assert 60 < counts[1] * voxel_ml < 500, "spleen volume (mL)"


def test_sites_look_different() -> None:
    site_a, site_b = default_profiles(2)
    assert site_a.spacing_zyx != site_b.spacing_zyx
    assert site_a.noise_sigma != site_b.noise_sigma
    assert (site_a.hu_scale, site_a.hu_offset) != (site_b.hu_scale, site_b.hu_offset)
    stats = []
    for profile in (site_a, site_b):
        image, labels = make_case(case_rng(0, "SiteX", 0), profile)
        liver = ndimage.binary_erosion(labels == 6, iterations=2)
        residual = image - ndimage.gaussian_filter(image, 1.5)  # anatomy is smooth in there: this is noise
        stats.append((image[liver].mean(), residual[liver].std(), image.shape))
    (mean_a, noise_a, shape_a), (mean_b, noise_b, shape_b) = stats
    assert abs(mean_a - mean_b) > 5 and shape_a != shape_b
    assert (noise_a < noise_b) == (site_a.noise_sigma < site_b.noise_sigma) and abs(noise_a - noise_b) > 1


def test_cli_writes_the_cohort_and_rewrites_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--sites", "2", "--train", "1", "--test", "1", "--first-id", "700",
            "--annotate", "1=kidneys+liver", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["Dataset700_FedDAHPhantomSite1", "Dataset701_FedDAHPhantomSite2"]
    assert out.count("Dataset70") == 2 and "wrote 2 site dataset(s)" in out
    meta = json.loads((tmp_path / folders[0] / "dataset.json").read_text())
    assert meta["feddah"]["annotated_organs"] == [2, 3, 6]
    meta = json.loads((tmp_path / folders[1] / "dataset.json").read_text())
    assert meta["feddah"]["annotated_organs"] == list(range(1, 16))
    assert (tmp_path / folders[1] / "imagesTr" / "site2_0000_0000.nii.gz").is_file()
    assert main(argv) == 0, "a phantom dataset may be replaced by a new phantom"
    assert sorted(p.name for p in tmp_path.iterdir()) == folders


def test_cli_uses_nnunet_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    assert main(["--sites", "1", "--train", "1", "--test", "0"]) == 0
    assert (tmp_path / "raw" / "Dataset501_FedDAHPhantomSite1" / "dataset.json").is_file()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--annotate", "1=kidneyz"], "--annotate"),
        (["--annotate", "kidneys"], "--annotate"),
        (["--annotate", "3=liver", "--sites", "2"], "--annotate"),
        (["--first-id", "999", "--sites", "2"], "--first-id"),
        (["--train", "0"], "--train"),
    ],
)
def test_cli_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    out = tmp_path / "raw"
    assert main(["--out", str(out), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), "nothing may be written on bad input"


def test_cli_needs_an_output_folder(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "nnUNet_raw" in err


def test_foreign_datasets_are_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "Dataset700_FedDAHPhantomSite1"
    mine.mkdir()
    (mine / "dataset.json").write_text('{"labels": {"background": 0}}')
    assert main(["--out", str(tmp_path), "--sites", "1", "--first-id", "700"]) == 2
    assert "not written by" in capsys.readouterr().err
    other = tmp_path / "Dataset801_RealAMOS"
    other.mkdir()
    assert main(["--out", str(tmp_path), "--sites", "1", "--first-id", "801"]) == 2
    assert "801" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset700_FedDAHPhantomSite1", "Dataset801_RealAMOS"]
    assert (mine / "dataset.json").read_text() == '{"labels": {"background": 0}}'


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_make_case = phantom.make_case

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_make_case(*args, **kwargs)

    monkeypatch.setattr(phantom, "make_case", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        write_site_dataset(tmp_path, 650, "Site1", dataclasses.replace(PROFILE, noise_sigma=5.0), "all", 2, 0, seed=0)
    assert list(tmp_path.iterdir()) == [], f"left behind: {_hidden_entries(tmp_path)}"
