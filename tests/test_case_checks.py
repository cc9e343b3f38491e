"""Bad site data is refused before planning or training, naming the file (issue 37 item 2).

A two-case phantom site, each test breaking one file: a NaN block in an image, an undeclared label value, a
label off its image's grid; and the split check nnU-Net's 5-fold cross-validation needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_feddah.data.phantom import default_profiles, write_site_dataset
from nnunet_feddah.nnunet.case_checks import CaseError, check_raw_dataset, check_split, label_values


@pytest.fixture(scope="module")
def clean_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    return write_site_dataset(root, 631, "Checks", default_profiles(1)[0], "kidneys+liver", num_train=2,
                              num_test=0, seed=3, shape_zyx=(16, 24, 24))


@pytest.fixture
def site(clean_site: Path, tmp_path: Path) -> Path:
    copy = tmp_path / clean_site.name
    shutil.copytree(clean_site, copy)
    return copy


def _edit(path: Path, change=lambda array: array, spacing_factor: float = 1.0) -> None:
    """Rewrite one NIfTI file with its voxels changed and/or its spacing scaled."""
    image = sitk.ReadImage(str(path))
    edited = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image).copy()))
    edited.CopyInformation(image)
    edited.SetSpacing(tuple(s * spacing_factor for s in image.GetSpacing()))
    sitk.WriteImage(edited, str(path))


def test_a_clean_site_passes(clean_site: Path) -> None:
    assert check_raw_dataset(clean_site) == 2
    assert label_values(json.loads((clean_site / "dataset.json").read_text())) >= {0, 2, 3, 6}


def _nan_block(array: np.ndarray) -> np.ndarray:  # the phantom writes int16 CT; a float export can hold NaN
    array = array.astype(np.float32)
    array[4:8, 4:8, 4:8] = np.nan
    return array


def _label_99(array: np.ndarray) -> np.ndarray:
    array[0, 0, 0] = 99
    return array


@pytest.mark.parametrize(("folder", "index", "edit", "expected"), [
    ("imagesTr", 1, {"change": _nan_block}, r"has 64 NaN or infinite voxel\(s\).*Fix"),
    ("labelsTr", 0, {"change": _label_99}, r"holds label value\(s\) \[99\].*'labels'"),
    ("labelsTr", 1, {"spacing_factor": 1.5}, r"has spacing .* its image .*Fix"),
], ids=["nan_block_in_an_image", "undeclared_label_value", "label_off_its_images_grid"])
def test_a_broken_file_is_named(site: Path, folder: str, index: int, edit: dict, expected: str) -> None:
    broken = sorted((site / folder).iterdir())[index]
    _edit(broken, **edit)
    with pytest.raises(CaseError, match=rf"{broken.name} {expected}"):
        check_raw_dataset(site)


def test_too_few_cases_for_nnunets_split_unless_the_site_gives_one(tmp_path: Path) -> None:
    raw, pre = tmp_path / "raw" / "Dataset632_X", tmp_path / "pre" / "Dataset632_X"
    check_split(5, raw, pre)
    with pytest.raises(CaseError, match=r"dataset.json: 4 training case\(s\).*needs at least 5.*splits_final.json"):
        check_split(4, raw, pre)
    pre.mkdir(parents=True)
    (pre / "splits_final.json").write_text("{broken")
    with pytest.raises(CaseError, match="splits_final.json: not readable JSON"):
        check_split(4, raw, pre)
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["a", "b", "c"], "val": ["d"]}]))
    check_split(4, raw, pre)  # the site's own split: nnU-Net uses it
