"""One whole-abdomen label map from several task models, without a task id. Plain numpy.

FedDAH gives one network per task; the paper leaves open which task to run at inference time. For
segmentation the answer is: run all of them and merge. The rule (documented in docs/EXPORT.md):

1. each task model *claims* a voxel for the organ it predicts there — the argmax over its own channels
   (background + the task's organs); a task predicting background claims nothing;
2. a voxel no task claims is background;
3. where several tasks claim a voxel, the claim with the **highest probability wins** (ties: the task
   listed first). Tasks that share an organ therefore never conflict on it, and a confident
   liver model beats an unsure spleen model at their common border.

Probabilities are in AMOS channel space (channel ``c`` = AMOS id ``c``, what exported checkpoints give).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class MergedSegmentation:
    labels: np.ndarray  # AMOS ids, uint8
    claims: dict[str, int]  # task -> voxels it claimed (before conflicts were resolved)
    won: dict[str, int]  # task -> voxels whose label it gave
    contested: int  # voxels claimed by more than one task


def merge_task_probabilities(probabilities: Mapping[str, np.ndarray],
                             organs_by_task: Mapping[str, Sequence[int]]) -> MergedSegmentation:
    """Merge per-task probability maps ``(channels, *spatial)`` (AMOS channel space) by the module's rule."""
    if not probabilities:
        raise ValueError("no task probabilities to merge")
    shape = None
    best_prob = best_label = claim_count = None
    claims, won = {}, {}
    winner = None
    for index, (task, probs) in enumerate(probabilities.items()):
        if task not in organs_by_task:
            raise ValueError(f"task {task!r} has probabilities but no organ list")
        organs = [int(o) for o in organs_by_task[task]]
        probs = np.asarray(probs)
        if probs.ndim < 2 or probs.shape[0] <= max(organs, default=0):
            raise ValueError(f"task {task!r}: probabilities of shape {probs.shape} have no channel for AMOS id "
                             f"{max(organs)}; expected (channels, *spatial) in AMOS channel space")
        if shape is None:
            shape = probs.shape[1:]
            best_prob = np.full(shape, -1.0, dtype=np.float32)
            best_label = np.zeros(shape, dtype=np.uint8)
            claim_count = np.zeros(shape, dtype=np.uint8)
            winner = np.full(shape, -1, dtype=np.int16)
        elif probs.shape[1:] != shape:
            raise ValueError(f"task {task!r}: probabilities have spatial shape {probs.shape[1:]}, the first task "
                             f"has {shape}; all tasks must be predicted on the same image")
        channels = np.asarray([0, *organs])
        own = probs[channels]
        pick = own.argmax(axis=0)
        confidence = np.take_along_axis(own, pick[None], axis=0)[0].astype(np.float32)
        claimed = pick > 0
        claims[task] = int(claimed.sum())
        claim_count += claimed
        better = claimed & (confidence > best_prob)
        best_prob[better] = confidence[better]
        best_label[better] = channels[pick[better]]
        winner[better] = index
    tasks = list(probabilities)
    for index, task in enumerate(tasks):
        won[task] = int(np.sum(winner == index))
    return MergedSegmentation(best_label, claims, won, int(np.sum(claim_count > 1)))
