"""Checks of a site's raw training cases before anything is planned or trained on them, each naming its file.

nnU-Net's NIfTI reader returns a NaN block of a CT as 0 and nnU-Net trains on it without a word;
its own integrity check finds a label value outside ``dataset.json`` or a label whose geometry differs from
its image's, but prints the file on stdout, where a child process's output may be lost; and a dataset of
fewer than five training cases passes every check until the first round fails in nnU-Net's 5-fold split.
These checks run where a site's data is first read — the fingerprint round's statistics
(:mod:`.federated_fingerprint`) and ``nnfeddah plans install`` (:mod:`.shared_plans`) — and say which file,
which field and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_feddah.errors import FedDAHError

#: nnU-Net's default split (``nnUNetTrainer.do_split``) is 5-fold cross-validation over the training cases.
NNUNET_FOLDS = 5
SPLITS_FILE = "splits_final.json"
#: Relative tolerance on a label's spacing and origin against its image's (header rounding, not resampling).
GEOMETRY_RTOL = 1e-3


class CaseError(FedDAHError, ValueError):
    """A raw training case nnU-Net must not plan or train on."""


def label_values(dataset_json: Mapping[str, Any]) -> set[int]:
    """The label values ``dataset.json`` declares (region-based labels list several values each)."""
    values: set[int] = set()
    for value in (dataset_json.get("labels") or {}).values():
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values


def check_case(case: str, image_files: Sequence[str], label_file: str, images: np.ndarray,
               image_properties: Mapping[str, Any], segmentation: np.ndarray, label_properties: Mapping[str, Any],
               allowed_labels: set[int]) -> None:
    """Refuse a case whose label does not lie on its image, whose image is not finite, or whose label holds a
    value ``dataset.json`` does not declare (arrays and properties as nnU-Net's reader returns them)."""
    where = f"case {case!r}"
    if images.shape[1:] != segmentation.shape[1:]:
        raise CaseError(f"{where}: {label_file} has shape {segmentation.shape[1:]}, its image "
                        f"{image_files[0]} {images.shape[1:]}. Fix: the label must be drawn on its image's grid")
    image_spacing, label_spacing = image_properties.get("spacing"), label_properties.get("spacing")
    if image_spacing is not None and label_spacing is not None and not np.allclose(
            image_spacing, label_spacing, rtol=GEOMETRY_RTOL):
        raise CaseError(f"{where}: {label_file} has spacing {list(label_spacing)}, its image {image_files[0]} "
                        f"{list(image_spacing)}. Fix: re-export the label on its image's grid")
    image_itk, label_itk = image_properties.get("sitk_stuff") or {}, label_properties.get("sitk_stuff") or {}
    for field in ("origin", "direction"):
        if field in image_itk and field in label_itk and not np.allclose(
                image_itk[field], label_itk[field], rtol=GEOMETRY_RTOL, atol=1e-3):
            raise CaseError(f"{where}: {label_file} has {field} {list(label_itk[field])}, its image "
                            f"{image_files[0]} {list(image_itk[field])}. Fix: re-export the label on its image's grid")
    for channel, file in enumerate(image_files):
        bad = max(int(np.count_nonzero(~np.isfinite(images[channel]))), non_finite_voxels(file))
        if bad:
            raise CaseError(f"{where}: {file} has {bad} NaN or infinite voxel(s) of {images[channel].size}. "
                            f"Fix: repair or re-export the image, or remove the case from imagesTr/labelsTr")
    unknown = sorted(set(np.unique(segmentation).astype(int).tolist()) - allowed_labels)
    if unknown:
        raise CaseError(f"{where}: {label_file} holds label value(s) {unknown[:10]}, which dataset.json's field "
                        f"'labels' does not declare ({sorted(allowed_labels)}). Fix: relabel the case or declare "
                        f"the label in dataset.json")


def non_finite_voxels(file: str | Path) -> int:
    """NaN/Inf voxels stored in an image file, as the file holds them.

    ITK's NIfTI reader — and with it nnU-Net's ``SimpleITKIO`` — returns a stored NaN as 0, so a NaN block of a
    CT would be trained on as water without a word; NIfTI files are therefore read once more with nibabel,
    which keeps what is stored. Integer-typed files cannot hold NaN and are not read."""
    name = str(file)
    if not name.endswith((".nii", ".nii.gz")):
        return 0  # other formats: the reader's own array is checked by the caller
    import nibabel

    image = nibabel.load(name)
    slope = image.header.get_slope_inter()[0]
    if np.issubdtype(image.get_data_dtype(), np.integer) and (slope is None or np.isfinite(slope)):
        return 0
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))


def check_split(num_cases: int, raw_dataset: Path, preprocessed: Path | None) -> None:
    """nnU-Net's 5-fold split needs five training cases, unless the site gives its own ``splits_final.json``."""
    if num_cases >= NNUNET_FOLDS:
        return
    splits = preprocessed / SPLITS_FILE if preprocessed is not None else None
    if splits is not None and splits.is_file():
        try:
            folds = json.loads(splits.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CaseError(f"{splits}: not readable JSON ({exc}). Fix: rewrite it as nnU-Net's list of "
                            f"{{'train': [...], 'val': [...]}} folds") from None
        if isinstance(folds, list) and folds and all(isinstance(f, Mapping) and f.get("train") for f in folds):
            return
        raise CaseError(f"{splits}: expected nnU-Net's list of {{'train': [...], 'val': [...]}} folds, fold 0 "
                        f"with training cases")
    raise CaseError(f"{raw_dataset / 'dataset.json'}: {num_cases} training case(s); nnU-Net's 5-fold split "
                    f"needs at least {NNUNET_FOLDS}. Fix: add training cases, or write your own split to "
                    f"{splits or '<nnUNet_preprocessed>/<dataset>/' + SPLITS_FILE}")


def check_raw_dataset(raw_dataset: Path) -> int:
    """Every training case of a raw nnU-Net dataset through :func:`check_case`; returns the number of cases.

    The split is checked where a federation starts (:func:`check_split` in ``validate_sites``): plans may be
    installed on a dataset too small to train on.

    Reads every case once with nnU-Net's own reader (the cost of one more pass over the raw data, paid where
    plans are installed, never per round)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_feddah.nnunet.shared_plans import image_reader_class

    dataset_json = json.loads((raw_dataset / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    reader_class = image_reader_class(dataset_json, cases)
    allowed = label_values(dataset_json)
    for case, files in sorted((str(k), v) for k, v in cases.items()):
        missing = [f for f in [*files["images"], files["label"]] if not Path(f).is_file()]
        if missing:
            raise CaseError(f"case {case!r}: {missing[0]} does not exist. Fix: add the file or remove the case")
        reader = reader_class()
        try:
            images, image_properties = reader.read_images(list(files["images"]))
            segmentation, label_properties = reader.read_seg(files["label"])
        except Exception as exc:  # nnU-Net's readers raise anything from RuntimeError to ITK errors
            raise CaseError(f"case {case!r}: cannot read {list(files['images'])} / {files['label']}: "
                            f"{type(exc).__name__}: {exc}. Fix: re-export the case or remove it") from exc
        check_case(case, files["images"], files["label"], images, image_properties, segmentation, label_properties,
                   allowed)
    return len(cases)
