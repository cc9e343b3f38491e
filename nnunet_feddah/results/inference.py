"""Task models on raw images with nnU-Net's own preprocessing, sliding window and resampling.

Shared by ``nnfeddah predict`` (exported checkpoints, merged into one label map) and the evaluation
(weights straight from a coordinator snapshot). An image is read and preprocessed once and then run
through every task model — all tasks share the plans, so the preprocessed array is the same for all.
Every model has 16 outputs in AMOS channel space (:func:`nnunet_feddah.results.amos_channels.pad_heads_to_amos`), so
its label map is in AMOS ids and its probabilities can be merged channel by channel.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import re
import zlib
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
from nnunet_feddah.nnunet.case_checks import non_finite_voxels
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

    def input_channel_files(self, folder: os.PathLike | str) -> dict[str, dict[int, str]]:
        """``{case: {channel: file}}`` of an nnU-Net input folder (``CASE_0000<ending>``…, nnU-Net's naming).

        Every case is listed with whatever channel files it has, so that a caller can skip a case with
        the wrong channels (:meth:`check_case`) instead of giving up on the whole folder.
        """
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
        return channels

    def _channel_problem(self, case: str, files: Mapping[int, str]) -> str | None:
        if sorted(files) == list(range(self.input_channels)):
            return None
        return (f"case {case} has channel file(s) {sorted(files)}, the plans need channels "
                f"0..{self.input_channels - 1} (dataset.json 'channel_names'; {case}_0000{self.file_ending}…)")

    def input_cases(self, folder: os.PathLike | str) -> dict[str, list[str]]:
        """``{case: [channel files]}`` of an nnU-Net input folder; a case with the wrong channels is an error."""
        cases = {}
        for name, files in self.input_channel_files(folder).items():
            problem = self._channel_problem(name, files)
            if problem:
                raise InferenceError(f"{folder}: {problem}")
            cases[name] = [files[i] for i in range(self.input_channels)]
        return cases

    def check_case(self, case: str, files: Mapping[int, str]) -> str | None:
        """Why this case cannot be predicted (one line naming the file), or None when it can.

        nnU-Net reads whatever the image library returns: SimpleITK zero-fills a truncated ``.nii.gz``
        (a wrong segmentation, exit 0), and a garbage or 4D file fails deep in preprocessing or in the
        writer and takes the whole folder down. Checked here, in order: the channel files are exactly
        those dataset.json's ``channel_names`` ask for; a ``.gz`` file is one complete gzip stream (read
        through: truncation raises EOFError, a corrupt stream BadGzipFile or a CRC error); the plans'
        reader can read each file; each is one 3D volume of finite values; the channels agree in shape and spacing.
        Each file is read once more by :meth:`prepare` — cheap next to the sliding window.
        """
        problem = self._channel_problem(case, files)
        if problem:
            return problem
        reader = self.reader()
        first: tuple[str, tuple, np.ndarray] | None = None
        for channel in range(self.input_channels):
            path = files[channel]
            if path.endswith(".gz"):
                problem = _gzip_problem(path)
                if problem:
                    return f"{path}: {problem}"
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's readers print their complaints
                    data, properties = reader.read_images([path])
            except Exception as exc:  # noqa: BLE001 - any reader failure on an untrusted file means "unreadable"
                return f"{path}: not readable by {type(reader).__name__} ({_one_line(exc)})"
            dimension = len(properties.get("sitk_stuff", {}).get("spacing", ()))  # SimpleITK's own, else 0
            if dimension == 2:
                return f"{path}: 2D image, expected 3D (the plans are {self.configuration})"
            if dimension > 3 or data.ndim != 4 or data.shape[0] != 1:
                return (f"{path}: 4D image (reads as {data.shape[0]} volumes of {tuple(data.shape[1:])}), expected "
                        f"3D: one volume per channel file. Fix: split it into {case}_0000{self.file_ending}, "
                        f"{case}_0001{self.file_ending}… if those are channels")
            bad = max(int(np.count_nonzero(~np.isfinite(data))), non_finite_voxels(path))
            if bad:  # ITK reads a stored NaN as 0: it would be segmented as water, silently
                return f"{path}: {bad} NaN or infinite voxel(s); repair or re-export the image"
            spacing = np.asarray(properties["spacing"], dtype=float)
            if first is None:
                first = (path, tuple(data.shape[1:]), spacing)
            elif tuple(data.shape[1:]) != first[1]:
                return f"{path}: shape {tuple(data.shape[1:])} differs from {first[0]}'s {first[1]}"
            elif spacing.shape != first[2].shape or not np.allclose(spacing, first[2]):
                return f"{path}: spacing {spacing.tolist()} differs from {first[0]}'s {first[2].tolist()}"
        return None

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
        network.load_state_dict(state_dict)  # nnU-Net loads it per prediction; the sliding window here does not

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
        checkpoint = load_checkpoint(path)
        if "network_weights" not in checkpoint:
            raise InferenceError(f"{path}: field 'network_weights' is missing; not an nnU-Net checkpoint")
        return cls(shared, checkpoint["network_weights"], organs, name, device, use_mirroring)

    def logits(self, image: PreparedImage) -> torch.Tensor:
        """The 16 AMOS-slot logits in the preprocessed geometry (sliding window, on the CPU afterwards)."""
        return net.sliding_window_logits(self.predictor, image.data).cpu()

    def predict(self, image: PreparedImage, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Label map in AMOS ids (original image geometry) and, if asked, the 16-channel probabilities."""
        logits = self.logits(image)
        result = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.shared.plans_manager, self.shared.configuration_manager, self.predictor.label_manager,
            image.properties, return_probabilities=probabilities)
        return (result[0], result[1]) if probabilities else (result, None)


_NOT_EXPORTED = "not a checkpoint written by `nnfeddah export`"


def load_checkpoint(path: Path) -> Mapping[str, Any]:
    """An exported ``<task>.pth``, unpickled with ``weights_only=True``: a checkpoint cannot run code.

    A model folder is something users download and pass to ``nnfeddah predict -m``; a full unpickle
    would run whatever a crafted file asks for. ``nnfeddah export`` writes only tensors, plain
    containers, numbers, strings and a ``torch.device`` — all in torch's default weights-only
    allowlist — so nothing is added to it. A file that needs any other pickle global is refused
    unloaded.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found:
            raise InferenceError(f"{path}: {_NOT_EXPORTED}: it needs the pickle global {found.group(1)}, which "
                                 f"would run code when loaded, so it was not loaded. Fix: re-export the task with "
                                 f"`nnfeddah export`, or use a model folder from a source you trust") from None
        raise InferenceError(f"{path}: {_NOT_EXPORTED} (torch cannot read it: {_one_line(exc, 'error:')}). "
                             f"Fix: re-run `nnfeddah export`") from None
    except (RuntimeError, EOFError) as exc:
        raise InferenceError(f"{path}: {_NOT_EXPORTED}, or a truncated copy of one ({_one_line(exc)}). Fix: "
                             f"re-run `nnfeddah export` or copy the file again") from None
    if not isinstance(checkpoint, Mapping):
        raise InferenceError(f"{path}: {_NOT_EXPORTED} (holds a {type(checkpoint).__name__}, not a dict). "
                             f"Fix: re-run `nnfeddah export`")
    return checkpoint


def _gzip_problem(path: str) -> str | None:
    """Why ``path`` is not one complete gzip stream (read through to the CRC/length trailer), or None."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except EOFError as exc:
        return f"truncated gzip stream (EOFError: {_one_line(exc)})"
    except (gzip.BadGzipFile, zlib.error) as exc:
        return f"corrupt or not a gzip stream ({type(exc).__name__}: {_one_line(exc)})"
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {_one_line(exc)})"
    return None


def _one_line(exc: BaseException, after: str | None = None) -> str:
    """One line of an exception's message: SimpleITK's ``ERROR:`` line, else the first non-empty one (after
    ``after``, if given) — SimpleITK's and torch's messages run over many lines and bury the cause."""
    text = str(exc)
    if after and after in text:
        text = text.split(after, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.split("ERROR:", 1)[1].strip() for line in lines if "ERROR:" in line]  # SimpleITK's real cause
    return (errors or lines or [type(exc).__name__])[0]


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
