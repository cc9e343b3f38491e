"""A site dataset seen through one task: AMOS ids in the files, background + task organs for the network.

Site datasets keep AMOS label ids on disk (so every site and every task agree on what id 6 means).
A task trains ``background + organs`` in task order, so labels are remapped *on the fly*, in front of
nnU-Net's own augmentation pipeline, and foreground oversampling is pointed at the task's organs.
nnU-Net's data loader, preprocessing and files stay untouched.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.organs import Task, annotated_organs

PADDING_LABEL = -1  # nnU-Net's marker for voxels outside the image; its pipeline turns it into 0 later


class TaskNotAvailableError(FedDAHError, ValueError):
    """The site's dataset cannot train this task (an organ is not annotated or has no labelled voxels)."""


class TaskLabelTransform(SegOnlyTransform):
    """AMOS ids -> task channels (organs outside the task become background); keeps the -1 padding marker."""

    def __init__(self, task: Task):
        super().__init__()
        lut = task.amos_to_task_lut()
        self.task_key = task.key
        self.lut = torch.tensor(lut + [0] * (256 - len(lut)), dtype=torch.int16)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params: Any) -> torch.Tensor:
        padded = segmentation < 0
        mapped = self.lut[segmentation.clamp(0, 255).long()].to(segmentation.dtype)
        mapped[padded] = PADDING_LABEL
        return mapped

    def __repr__(self) -> str:
        return f"TaskLabelTransform(task={self.task_key})"


def with_task_labels(transforms: BasicTransform, task: Task) -> BasicTransform:
    """Put the task remapping in front of an nnU-Net transform pipeline."""
    return ComposeTransforms([TaskLabelTransform(task), transforms])


class TaskFocusedDataset:
    """An nnU-Net dataset whose ``class_locations`` only list the task's organs.

    nnU-Net's loader centres its oversampled foreground patches on a random class found in
    ``properties['class_locations']``; without this filter a kidney task would spend its foreground
    patches on the liver.
    """

    def __init__(self, dataset: Any, task: Task):
        self._dataset = dataset
        self._labels = set(task.labels)

    @property
    def identifiers(self) -> list[str]:
        return self._dataset.identifiers

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        properties = dict(properties)
        properties["class_locations"] = {
            k: v for k, v in properties["class_locations"].items() if not isinstance(k, int) or k in self._labels
        }
        return data, seg, seg_prev, properties

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


def task_dataset_json(site_dataset_json: Mapping, task: Task) -> dict:
    """The dataset.json the network sees: background + task organs, consecutive ids, with provenance."""
    out = copy.deepcopy(dict(site_dataset_json))
    out["labels"] = task.nnunet_labels()
    feddah = dict(out.get("feddah", {}))
    feddah.update({"task": task.key, "task_organs": list(task.labels)})
    out["feddah"] = feddah
    return out


def organ_case_counts(preprocessed_folder: os.PathLike | str, identifiers: Sequence[str] | None = None) -> dict[int, int]:
    """How many preprocessed cases contain each label, read from nnU-Net's per-case ``class_locations``."""
    folder = Path(preprocessed_folder)
    pkls = sorted(folder.glob("*.pkl"))
    if identifiers is not None:
        wanted = set(identifiers)
        pkls = [p for p in pkls if p.stem in wanted]
    counts: dict[int, int] = {}
    for pkl in pkls:
        for label, locations in load_pickle(str(pkl)).get("class_locations", {}).items():
            if isinstance(label, int) and len(locations) > 0:
                counts[label] = counts.get(label, 0) + 1
    return counts


def check_task_available(site_dataset_json: Mapping, task: Task, dataset_json_path: str,
                         preprocessed_folder: os.PathLike | str | None = None) -> dict[str, int]:
    """Refuse a task the site cannot train; return, per organ, how many preprocessed cases contain it."""
    annotated = {o.label for o in annotated_organs(site_dataset_json)}
    missing = [o.key for o in task.organs if o.label not in annotated]
    if missing:
        raise TaskNotAvailableError(
            f"task {task.key!r} needs {missing}, but {dataset_json_path} does not annotate them "
            f"(field 'feddah.annotated_organs' / 'labels'). Fix: give this site a task of its annotated organs "
            f"({', '.join(o.key for o in annotated_organs(site_dataset_json)) or 'none'}) or add the labels."
        )
    if preprocessed_folder is None:
        return {}
    folder = Path(preprocessed_folder)
    if not folder.is_dir() or not any(folder.glob("*.pkl")):
        raise TaskNotAvailableError(
            f"no preprocessed cases in {folder}. Fix: run `nnfeddah plans install` (or nnUNetv2_preprocess with the "
            f"shared plans) for this dataset first."
        )
    counts = organ_case_counts(folder)
    empty = [o.key for o in task.organs if counts.get(o.label, 0) == 0]
    if empty:
        raise TaskNotAvailableError(
            f"task {task.key!r}: no preprocessed case in {folder} contains {empty} although {dataset_json_path} "
            f"declares them annotated. Fix: check the label files or drop these organs from the site's task stream."
        )
    return {o.key: counts[o.label] for o in task.organs}
