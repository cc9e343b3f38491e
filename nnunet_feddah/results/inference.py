"""Task models on raw images with nnU-Net's own preprocessing, sliding window and resampling.

Shared by ``nnfeddah predict`` (exported checkpoints, merged into one label map) and the evaluation
(weights straight from a coordinator snapshot). An image is read and preprocessed once and then run
through every task model — all tasks share the plans, so the preprocessed array is the same for all.
Every model has 16 outputs in AMOS channel space (:func:`nnunet_feddah.results.amos_channels.pad_heads_to_amos`), so
its label map is in AMOS ids and its probabilities can be merged channel by channel.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.nnunet import network as net
from nnunet_feddah.nnunet.validation import dice_from_counts
from nnunet_feddah.paths import CONFIGURATION
from nnunet_feddah.results.amos_channels import NUM_SLOTS, pad_heads_to_amos
from nnunet_feddah.results.nnunet_folder import TRAINER_NAME, nnunet_state_dict


class InferenceError(FedDAHError, ValueError):
    """Input that cannot be predicted: names the file or field and the fix."""


@dataclass
class PreparedImage:
    """One case after nnU-Net's preprocessing (what every task model consumes)."""

    case: str
    data: torch.Tensor
    properties: dict[str, Any]


class SharedPlans:
    """The shared plans of a federation dataset: reader, preprocessor, label manager for AMOS-space outputs."""

    def __init__(self, plans: Mapping, dataset_json: Mapping, configuration: str = CONFIGURATION) -> None:
        self.plans, self.dataset_json = dict(plans), dict(dataset_json)
        self.plans_manager = PlansManager(self.plans)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.configuration = configuration
        self.input_channels = net.num_input_channels(self.dataset_json)
        self.file_ending = self.dataset_json["file_ending"]

    def reader(self):
        return self.plans_manager.image_reader_writer_class()

    def input_cases(self, folder: os.PathLike | str) -> dict[str, list[str]]:
        """``{case: [channel files]}`` of an nnU-Net input folder (``CASE_0000<ending>``…, nnU-Net's naming)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InferenceError(f"input folder {folder} does not exist")
        pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(self.file_ending) + "$")
        channels: dict[str, dict[int, str]] = {}
        for path in sorted(folder.iterdir()):
            match = pattern.match(path.name)
            if match:
                channels.setdefault(match.group(1), {})[int(match.group(2))] = str(path)
        if not channels:
            raise InferenceError(f"{folder} holds no images named CASE_0000{self.file_ending}; nnU-Net's input "
                                 f"naming is required")
        cases = {}
        for name, files in channels.items():
            if sorted(files) != list(range(self.input_channels)):
                raise InferenceError(f"{folder}: case {name} has channel file(s) {sorted(files)}, the plans need "
                                     f"channels 0..{self.input_channels - 1} ({name}_0000{self.file_ending}…)")
            cases[name] = [files[i] for i in range(self.input_channels)]
        return cases

    def prepare(self, case: str, files: Sequence[str]) -> PreparedImage:
        """Read and preprocess one case exactly as nnU-Net's predictor does."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case(list(files), None, self.plans_manager,
                                                    self.configuration_manager, self.dataset_json)
        return PreparedImage(case, torch.from_numpy(data).float(), properties)


class TaskModel:
    """One task's network behind nnU-Net's predictor (no test-time mirroring unless asked for)."""

    def __init__(self, shared: SharedPlans, state_dict: Mapping[str, torch.Tensor], organs: Sequence[int],
                 name: str, device: torch.device, use_mirroring: bool = False) -> None:
        self.name, self.organs, self.shared = name, [int(o) for o in organs], shared
        network = net.build_network(shared.plans, NUM_SLOTS, shared.input_channels, shared.configuration,
                                    deep_supervision=False)
        mirroring = tuple(range(len(shared.configuration_manager.patch_size))) if use_mirroring else None
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a CUDA-only notice for every CPU predictor
            self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                             perform_everything_on_device=device.type == "cuda", device=device,
                                             verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.manual_initialization(network.to(device), shared.plans_manager, shared.configuration_manager,
                                             [dict(state_dict)], shared.dataset_json, TRAINER_NAME, mirroring)

    @classmethod
    def from_weights(cls, shared: SharedPlans, weights: Mapping[str, torch.Tensor], organs: Sequence[int],
                     name: str, device: torch.device) -> TaskModel:
        """From a task's unique tensors (heads = background + task organs), e.g. a coordinator snapshot."""
        padded = pad_heads_to_amos(weights, organs, net.is_head)
        state_dict = nnunet_state_dict(shared.plans, padded, shared.input_channels, shared.configuration)
        return cls(shared, state_dict, organs, name, device)

    @classmethod
    def from_checkpoint(cls, shared: SharedPlans, path: Path, name: str, organs: Sequence[int],
                        device: torch.device, use_mirroring: bool = False) -> TaskModel:
        """From an exported ``<task>.pth`` (nnU-Net checkpoint with 16 AMOS-space outputs)."""
        if not path.is_file():
            raise InferenceError(f"checkpoint {path} of task {name} does not exist; re-run `nnfeddah export`")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if "network_weights" not in checkpoint:
            raise InferenceError(f"{path}: field 'network_weights' is missing; not an nnU-Net checkpoint")
        return cls(shared, checkpoint["network_weights"], organs, name, device, use_mirroring)

    def predict(self, image: PreparedImage, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Label map in AMOS ids (original image geometry) and, if asked, the 16-channel probabilities."""
        with torch.no_grad():
            logits = self.predictor.predict_logits_from_preprocessed_data(image.data).cpu()
        result = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.shared.plans_manager, self.shared.configuration_manager, self.predictor.label_manager,
            image.properties, return_probabilities=probabilities)
        return (result[0], result[1]) if probabilities else (result, None)


def label_dice(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """nnU-Net's Dice per AMOS id (its ``compute_tp_fp_fn_tn``; NaN where neither image has the organ)."""
    if reference.shape != prediction.shape:
        raise InferenceError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    scores = {}
    for label in labels:
        tp, fp, fn, _ = compute_tp_fp_fn_tn(region_or_label_to_mask(reference, label),
                                            region_or_label_to_mask(prediction, label))
        scores[int(label)] = dice_from_counts(tp, fp, fn)
    return scores
