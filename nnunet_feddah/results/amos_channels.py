"""The AMOS channel space: every exported task network has 16 outputs, output channel == AMOS label id.

nnU-Net's predictor takes the number of outputs (and the label names) from the model *folder's*
``dataset.json``, never from the checkpoint, so tasks with different label sets cannot share one folder
as-is. Instead each task's generated head rows are placed at their AMOS ids and every other row is a copy
of the background row with its bias lowered by :data:`SUPPRESSION_MARGIN` — such a class always scores
exactly that much below background, so it can never win the argmax and its probability is
``e^-30 · p(background)``. The predicted label map therefore equals the task network's prediction,
already in AMOS ids (organs outside the task are background).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.organs import BACKGROUND, BY_LABEL, ORGANS, organs_in_dataset_json

NUM_SLOTS = max(BY_LABEL) + 1  # background + AMOS organs 1..15: output channel == AMOS id
SUPPRESSION_MARGIN = 30.0  # logit gap below background for organs outside the task (e^-30 ≈ 1e-13)


class AmosChannelError(FedDAHError, ValueError):
    """Weights or a dataset.json that cannot be put into the AMOS channel space."""


def amos_dataset_json(dataset_json: Mapping) -> dict:
    """The folder's dataset.json: the target dataset's, with labels = background + every AMOS organ (id order).

    Names the dataset itself uses for an id are kept (so nnU-Net's evaluation matches its label files).
    """
    out = json.loads(json.dumps(dict(dataset_json)))
    try:
        declared = {label: name for name, label in _label_names(dataset_json).items()}
    except ValueError as exc:
        raise AmosChannelError(f"dataset.json field 'labels': {exc}") from exc
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
            raise AmosChannelError(f"head tensor {name} has {tensor.shape[0]} rows, task organs {list(organs)} need "
                              f"{len(slots)} (background + organs)")
        padded = tensor.detach()[:1].repeat(num_slots, *([1] * (tensor.dim() - 1))).clone()
        padded[slots] = tensor.detach()
        if name.endswith(".bias"):
            others = [s for s in range(num_slots) if s not in slots]
            padded[others] -= margin
        elif name.endswith(".weight") and f"{name[:-len('.weight')]}.bias" not in weights:
            raise AmosChannelError(f"head {name} has no bias, so organs outside the task cannot be suppressed")
        out[name] = padded
    return out
