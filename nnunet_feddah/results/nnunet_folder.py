"""nnU-Net's results-folder format: model folder names, checkpoint dicts, the export manifest, predict commands.

What ``nnUNetv2_predict -d D -tr FedDAHTrainer -p PLANS -f 0 -chk <task>.pth`` expects to find: a
``FedDAHTrainer__<plans>__3d_fullres`` folder with ``plans.json``, ``dataset.json`` and ``fold_0/<task>.pth``
holding what ``nnUNetTrainer.save_checkpoint`` writes (prediction reads only ``network_weights``,
``trainer_name``, ``init_args.configuration`` and ``inference_allowed_mirroring_axes``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.paths import CONFIGURATION
from nnunet_feddah.results.amos_channels import NUM_SLOTS

TRAINER_NAME = "FedDAHTrainer"
FOLD = 0
MANIFEST = "feddah_export.json"
MANIFEST_FORMAT = "nnunet-feddah-export/1"


class ModelFolderError(FedDAHError, ValueError):
    """A model folder file that is missing or unreadable; the message names the file and what it is for."""


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


def model_folder_name(plans_identifier: str, configuration: str = CONFIGURATION) -> str:
    return f"{TRAINER_NAME}__{plans_identifier}__{configuration}"


def checkpoint_name(task_key: str) -> str:
    return f"{task_key}.pth"


def predict_command(dataset: str, plans_identifier: str, task_key: str, input_folder: str = "IN",
                    output_folder: str = "OUT", configuration: str = CONFIGURATION, device: str = "cpu") -> list[str]:
    """The ``nnUNetv2_predict`` command line for one exported task."""
    return ["nnUNetv2_predict", "-i", input_folder, "-o", output_folder, "-d", dataset, "-c", configuration,
            "-tr", TRAINER_NAME, "-p", plans_identifier, "-f", str(FOLD), "-chk", checkpoint_name(task_key),
            "-device", device]


def read_json(path: Path, what: str, error: type[Exception] = ModelFolderError) -> dict:
    """A JSON file the caller needs; missing or invalid raises ``error`` naming the file and what it is for."""
    if not path.is_file():
        raise error(f"{path} does not exist ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc})") from exc
