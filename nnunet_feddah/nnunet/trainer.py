"""FedDAHTrainer: nnU-Net's trainer for one FedDAH round — a handful of small overrides, no copied loops.

Driven by a :class:`~nnunet_feddah.nnunet.round_config.RoundConfig` (handed over by :func:`train_round` in-process,
or the file named by ``$FEDDAH_ROUND_CONFIG`` under ``nnUNetv2_train``):

* start from the round's weights file, or from the weights a DAHyper checkpoint generates for the task
  (unique tensors, checked against the architecture and the task's organs);
* train only the task's organs: outputs are background + task organs, labels are remapped on the fly
  in front of nnU-Net's augmentation and foreground oversampling looks at the task's organs only;
* run the round's epochs/iterations at its place on a poly learning-rate curve, with nnU-Net's SGD or
  (``optimizer: adamw``) the AdamW of nnU-Net's own ``nnUNetTrainerAdam``;
* optionally (``device_augmentation`` / ``$FEDDAH_DEVICE_AUGMENTATION``) run nnU-Net's training augmentation
  on the training device on whole batches: the loader workers then only crop and remap labels;
* draw nnU-Net's progress plot once, when the round's training has ended, not after every epoch;
* write the trained unique tensors and a metrics JSON (per-organ validation Dice, loss, times).

Importing it also lets nnU-Net's loader take its per-batch thread-pool limits from threadpoolctl's cached
library scan (same limits, 2.9 ms less per batch on CPU).

Without a round config it is an ordinary nnU-Net trainer over every organ the dataset annotates,
still writing ``feddah_weights.safetensors`` and ``feddah_metrics.json`` into the fold folder.
All input checks run before nnU-Net creates any output folder, so bad input leaves nothing behind.
"""

from __future__ import annotations

import copy
import os
import random
import time
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import threadpoolctl
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.dataloading import data_loader as nnunet_data_loader
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.method.hypernet_file import HypernetFileError, load_hypernet
from nnunet_feddah.nnunet import network as net
from nnunet_feddah.nnunet.augment.device_augment import DeviceAugmenter, cuda_or_cpu, describe
from nnunet_feddah.nnunet.augment.settings import config_from_pipeline
from nnunet_feddah.nnunet.datasets import dataset_name
from nnunet_feddah.nnunet.round_config import RoundConfig, device_augmentation_requested
from nnunet_feddah.nnunet.task_data import TaskFocusedDataset, check_task_available, task_dataset_json, with_task_labels
from nnunet_feddah.nnunet.validation import organ_dice
from nnunet_feddah.nnunet.weights import WeightsFileError, load_weights, read_header, save_weights
from nnunet_feddah.organs import Task, annotated_organs
from nnunet_feddah.paths import CONFIGURATION, require_nnunet_env
from nnunet_feddah.tensor_checks import non_finite

# The round config an in-process caller hands over (train_round); nnUNetv2_train leaves it unset, and the
# trainer reads $FEDDAH_ROUND_CONFIG instead (its __init__ must keep nnU-Net's exact signature).
_HANDED_CONFIG: ContextVar[RoundConfig | None] = ContextVar("feddah_round_config", default=None)


def _threadpool_limits_cached(limits=None, user_api=None):
    """``threadpoolctl.threadpool_limits`` on threadpoolctl's own cached controller: the same limits.

    nnU-Net's loader limits the thread pools for every batch it augments, and ``threadpool_limits`` rescans
    every loaded shared library each time: 2.9 ms per batch on this project's CPU, 2.3 % of a bfloat16
    training iteration (docs/TRAINER.md, "Speed on CPU"). ``get_cached_controller()`` is that scan's result,
    redone whenever a Python module has been imported since.
    """
    return threadpoolctl.get_cached_controller().limit(limits=limits, user_api=user_api)


if hasattr(threadpoolctl, "get_cached_controller"):  # threadpoolctl >= 3.6
    nnunet_data_loader.threadpool_limits = _threadpool_limits_cached


class OffsetPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule evaluated at ``epoch_offset + epoch``: the curve continues across rounds."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, epoch_offset: int = 0):
        self.epoch_offset = epoch_offset
        super().__init__(optimizer, initial_lr, max_steps)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        super().step(min(current_step + self.epoch_offset, self.max_steps - 1))


class FedDAHTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        folders = require_nnunet_env("nnUNet_preprocessed", "nnUNet_results")
        round_config = _HANDED_CONFIG.get() or RoundConfig.from_env()
        device_augmentation = device_augmentation_requested(round_config)
        site_folder = folders["nnUNet_preprocessed"] / plans["dataset_name"]
        config = PlansManager(plans).get_configuration(configuration)
        task = round_config.parsed_task if round_config else Task(annotated_organs(dataset_json))
        organ_cases = check_task_available(dataset_json, task, str(site_folder / "dataset.json"),
                                           site_folder / config.data_identifier)
        input_channels = net.num_input_channels(dataset_json)
        fingerprint = net.architecture_fingerprint(plans, input_channels, configuration)
        generated = None
        if round_config and round_config.initial_weights:
            _check_weights_file(round_config.initial_weights, plans, configuration, input_channels, task, fingerprint)
        elif round_config and round_config.hypernet_checkpoint:
            generated = _generate_from_hypernet(round_config.hypernet_checkpoint, round_config.hypernet_key, plans,
                                                configuration, input_channels, task, fingerprint)

        super().__init__(plans, configuration, fold, task_dataset_json(dataset_json, task), device)
        self.task, self.round_config, self.organ_cases = task, round_config, organ_cases
        self.architecture_fingerprint = fingerprint
        self._generated_weights = generated  # loaded (then dropped) in initialize()
        self._received: dict[str, torch.Tensor] | None = None  # the start weights, kept for validation
        self._wall: dict[str, float] = {}
        self.device_augmentation = device_augmentation
        self.precision = _training_precision(round_config, self.device)
        self._device_augmenter: DeviceAugmenter | None = None  # built with the data loaders
        if round_config:
            self.num_epochs = round_config.epochs
            self.num_iterations_per_epoch = round_config.iterations_per_epoch
            self.num_val_iterations_per_epoch = round_config.val_iterations_per_epoch
            self.initial_lr = round_config.initial_lr
            # nnU-Net redraws progress.png after every epoch: 0.6 s of matplotlib on this project's CPU, 5 % of a
            # 100-iteration round. A round draws it once, when its training has ended (on_train_end).
            self.logger.plot_progress_png = lambda output_folder: None
        self.print_to_log_file(f"FedDAH task {task.key} (AMOS ids {list(task.labels)}), cases per organ {organ_cases}")

    # --- where results go -------------------------------------------------------------------------------
    @property
    def weights_path(self) -> Path:
        return Path(self.round_config.output_weights if self.round_config
                    else Path(self.output_folder) / "feddah_weights.safetensors")

    @property
    def metrics_path(self) -> Path:
        return Path(self.round_config.output_metrics if self.round_config
                    else Path(self.output_folder) / "feddah_metrics.json")

    # --- nnU-Net hooks -------------------------------------------------------------------------------------
    def initialize(self):
        super().initialize()
        if self.device.type == "cpu":
            # oneDNN's 3D convolutions run ~1.45x faster per training step in channels-last layout on CPU
            # (docs/TRAINER.md, "Speed on CPU"); same arithmetic, the parameters stay the optimizer's
            self.network.to(memory_format=torch.channels_last_3d)
            self.print_to_log_file(f"CPU training: channels-last layout, {self.precision}")
        rc = self.round_config
        if rc and rc.initial_weights:
            tensors, _ = load_weights(rc.initial_weights)
            net.load_unique_tensors(self._plain_network(), tensors, source=rc.initial_weights)
            self.print_to_log_file(f"loaded round weights from {rc.initial_weights}")
        elif rc and self._generated_weights is not None:
            tensors, self._generated_weights = self._generated_weights, None
            net.load_unique_tensors(self._plain_network(), tensors,
                                    source=f"DAHyper checkpoint {rc.hypernet_checkpoint} (task {rc.hypernet_key})")
            self.print_to_log_file(f"loaded weights generated by {rc.hypernet_checkpoint} for task {rc.hypernet_key}")
        else:
            return
        # what the site was sent: validation compares its predictions with the trained network's (W_s)
        self._received = {k: v.detach().clone() for k, v in net.unique_tensors(self._plain_network()).items()}

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        if self.round_config and self.round_config.optimizer == "adamw":  # nnUNetTrainerAdam's optimizer
            optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr,
                                          weight_decay=self.weight_decay, amsgrad=True)
        if self.round_config:
            scheduler = OffsetPolyLRScheduler(optimizer, self.initial_lr, self.round_config.lr_horizon,
                                              self.round_config.epoch_offset)
        return optimizer, scheduler

    def get_training_transforms(self, *args, **kwargs):
        pipeline = super().get_training_transforms(*args, **kwargs)
        if not self.device_augmentation:
            return with_task_labels(pipeline, self.task)
        # nnU-Net's own pipeline fixes the device path's distributions; the workers keep only the label remap
        # (the loader itself crops the enlarged patch the spatial transform needs)
        self._device_augmenter = DeviceAugmenter(config_from_pipeline(pipeline))
        self.print_to_log_file(describe(cuda_or_cpu(self.device)))
        return with_task_labels(ComposeTransforms([]), self.task)

    def get_validation_transforms(self, *args, **kwargs):
        return with_task_labels(super().get_validation_transforms(*args, **kwargs), self.task)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        return TaskFocusedDataset(dataset_tr, self.task), TaskFocusedDataset(dataset_val, self.task)

    def train_step(self, batch: dict) -> dict:
        if self._device_augmenter is not None:
            device = cuda_or_cpu(self.device)
            data, target = self._device_augmenter(batch["data"].to(device, non_blocking=True),
                                                  batch["target"].to(device, non_blocking=True))
            batch = {**batch, "data": data, "target": target}
        # nnU-Net autocasts to float16 on CUDA only; on CPU it trains in float32 unless the round asks otherwise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            return super().train_step(batch)

    def on_train_start(self):
        if self.round_config and self.round_config.seed is not None:
            seed = self.round_config.seed
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self._wall["start"] = time.perf_counter()
        super().on_train_start()
        self._wall["train_start"] = time.perf_counter()

    def on_train_end(self):
        self._wall["train_end"] = time.perf_counter()
        if self.round_config:
            type(self.logger).plot_progress_png(self.logger, self.output_folder)
        super().on_train_end()
        save_weights(self.weights_path, net.unique_tensors(self._plain_network()), self._weights_metadata())
        self.print_to_log_file(f"wrote FedDAH weights to {self.weights_path}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Per-organ Dice of the trained network on this fold's validation cases, then the metrics file."""
        tr_keys, val_keys = self.do_split()
        if self.round_config and self.round_config.max_validation_cases:
            val_keys = val_keys[: self.round_config.max_validation_cases]
        scores = {}
        if self.round_config is None or self.round_config.validate:
            self.set_deep_supervision_enabled(False)
            dataset = self.dataset_class(self.preprocessed_dataset_folder, list(val_keys))
            received = None
            if self._received is not None:
                received = copy.deepcopy(self._plain_network())
                net.load_unique_tensors(received, self._received, source="the weights this round started from")
            scores = organ_dice(self._plain_network(), self.plans_manager, self.configuration_manager,
                                self.dataset_json, dataset, val_keys, self.task, self.device, received=received)
            self.set_deep_supervision_enabled(True)
            self.print_to_log_file(f"FedDAH validation Dice {scores['dice']} (mean {scores['mean_dice']:.4f})")
        atomic_write_json(self.metrics_path, self._metrics(scores, num_training_cases=len(tr_keys)))

    # --- helpers -----------------------------------------------------------------------------------------
    def _plain_network(self) -> torch.nn.Module:
        module = self.network.module if self.is_ddp else self.network
        return getattr(module, "_orig_mod", module)

    def _weights_metadata(self) -> dict[str, str]:
        return {"architecture_fingerprint": self.architecture_fingerprint, "task": self.task.key,
                "organs": ",".join(map(str, self.task.labels)), "dataset": self.plans_manager.dataset_name,
                "trainer": type(self).__name__}

    def _metrics(self, scores: dict, num_training_cases: int) -> dict:
        losses = [float(x) for x in self.logger.get_value("train_losses", step=None)]
        val_losses = [float(x) for x in self.logger.get_value("val_losses", step=None)]
        train_s = self._wall.get("train_end", 0.0) - self._wall.get("train_start", 0.0)
        iterations = self.num_epochs * self.num_iterations_per_epoch
        rc = self.round_config
        return {
            "task": self.task.key,
            "organs": [{"id": o.label, "key": o.key} for o in self.task.organs],
            "dataset": self.plans_manager.dataset_name,
            "fold": self.fold,
            "dice": scores.get("dice", {}),
            "mean_dice": scores.get("mean_dice"),
            "pooled_dice": scores.get("pooled_dice", {}),
            "predictive_js": scores.get("predictive_js"),  # vs the received weights, on the validation cases
            "validation_cases": scores.get("cases", []),
            "train_loss": losses[-1] if losses else None,
            "train_loss_per_epoch": losses,
            "val_loss_per_epoch": val_losses,
            "epochs": self.num_epochs,
            "iterations": iterations,
            "epoch_offset": rc.epoch_offset if rc else 0,
            "learning_rates": [float(x) for x in self.logger.get_value("lrs", step=None)],
            "num_training_cases": num_training_cases,
            "cases_per_organ": self.organ_cases,
            "wall_time_s": {"setup": self._wall.get("train_start", 0.0) - self._wall.get("start", 0.0),
                            "train": train_s, "validation": scores.get("seconds", 0.0)},
            "seconds_per_iteration": train_s / max(iterations, 1),
            "precision": self.precision,
            "augmentation": (f"device ({cuda_or_cpu(self.device).type})" if self.device_augmentation
                             else "nnU-Net CPU workers"),
            "weights_file": str(self.weights_path),
            "start_weights": _start_weights(rc),
            "architecture_fingerprint": self.architecture_fingerprint,
        }


def _check_weights_file(path: str, plans: dict, configuration: str, input_channels: int, task: Task,
                        fingerprint: str) -> None:
    """Refuse a weights file made for another architecture or task before any training output exists."""
    shapes, meta = read_header(path)
    recorded = meta.get("architecture_fingerprint")
    if recorded and recorded != fingerprint:
        raise WeightsFileError(
            f"weights file {path}: metadata field 'architecture_fingerprint' is {recorded} but these plans give "
            f"{fingerprint}. The file was made for a different network; use weights generated for the shared plans."
        )
    with torch.device("meta"):
        expected = net.tensor_shapes(net.build_network(plans, task.num_outputs, input_channels, configuration))
    net.check_shapes(expected, shapes, f"weights file {path} (task {task.key}, {task.num_outputs} outputs)")


def _generate_from_hypernet(path: str, key: str, plans: dict, configuration: str, input_channels: int, task: Task,
                            fingerprint: str) -> dict[str, torch.Tensor]:
    """Load a DAHyper checkpoint for these plans, check the task against the round's, generate its weights.

    Everything — architecture fingerprint, task registration, organ order, tensor names/shapes, finite
    values — is checked here, before nnU-Net creates any output, so a wrong checkpoint leaves nothing behind.
    """
    try:
        hyper = load_hypernet(path, expected_fingerprint=fingerprint)
    except HypernetFileError as exc:
        raise HypernetFileError(f"round config field 'hypernet_checkpoint': {exc}") from exc
    registered = {k: r.organs for k, r in hyper.tasks.items()}
    if key not in registered:
        raise HypernetFileError(
            f"DAHyper checkpoint {path} (field 'hypernet_checkpoint') has no task {key!r} (field 'hypernet_task', "
            f"default: the round's 'task'); registered tasks: {registered or 'none'}. Allocate the task on the "
            f"coordinator first or name a registered one in 'hypernet_task'")
    if registered[key] != list(task.labels):
        raise HypernetFileError(
            f"DAHyper checkpoint {path} (field 'hypernet_checkpoint'): task {key!r} (field 'hypernet_task') has "
            f"organs {registered[key]} (AMOS ids, output order) but the round's field 'task' {task.key!r} needs "
            f"{list(task.labels)}; registered tasks: {registered}. Name the task whose organs match, in this order")
    tensors = hyper.generate(key)
    with torch.device("meta"):
        expected = net.tensor_shapes(net.build_network(plans, task.num_outputs, input_channels, configuration))
    source = f"weights generated by DAHyper checkpoint {path} for task {key!r} ({task.num_outputs} outputs)"
    net.check_shapes(expected, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    bad = non_finite(tensors)
    if bad:
        raise HypernetFileError(f"{source} contain NaN/Inf in {', '.join(bad[:5])}; the checkpoint is broken")
    return tensors


def _training_precision(rc: RoundConfig | None, device: torch.device) -> str:
    """What the training step computes in: nnU-Net's own (CUDA: float16 autocast) unless a CPU round asks for
    bfloat16 and the CPU has it natively (oneDNN; without it bfloat16 is emulated and slower, so float32 stays)."""
    if device.type == "cuda":
        return "float16 autocast (nnU-Net)"
    if rc is None or rc.cpu_precision == "float32" or device.type != "cpu":
        return "float32"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32 (no native bfloat16 on this CPU)"


def _start_weights(rc: RoundConfig | None) -> dict | None:
    """Where the round's starting weights came from (None: nnU-Net's random initialisation)."""
    if rc and rc.initial_weights:
        return {"weights_file": rc.initial_weights}
    if rc and rc.hypernet_checkpoint:
        return {"hypernet_checkpoint": rc.hypernet_checkpoint, "hypernet_task": rc.hypernet_key}
    return None


def train_round(dataset: int | str, plans_identifier: str, round_config: RoundConfig | os.PathLike | str,
                fold: int = 0, device: str = "cpu", disable_checkpointing: bool = True) -> dict:
    """Run one round in this process (what ``nnUNetv2_train D 3d_fullres F -tr FedDAHTrainer`` does).

    ``round_config`` is the :class:`RoundConfig` itself (in-process callers: it is handed to the trainer,
    not written to a file and read back) or the path of a round-config file. Skips nnU-Net's trainer
    lookup (which imports every bundled trainer) and its checkpoints by default: the round's product is
    the weights file. Returns the metrics written to the round config's path.
    """
    folders = require_nnunet_env("nnUNet_preprocessed", "nnUNet_results")
    config = round_config if isinstance(round_config, RoundConfig) else RoundConfig.load(round_config)
    base = folders["nnUNet_preprocessed"] / dataset_name(dataset)
    plans = load_json(str(base / f"{plans_identifier}.json"))
    plans["continue_training"] = False
    token = _HANDED_CONFIG.set(config)
    try:
        trainer = FedDAHTrainer(plans, CONFIGURATION, fold, load_json(str(base / "dataset.json")),
                                torch.device(device))
        trainer.disable_checkpointing = disable_checkpointing
        trainer.run_training()
        trainer.perform_actual_validation()
    finally:
        _HANDED_CONFIG.reset(token)
    return load_json(str(trainer.metrics_path))
