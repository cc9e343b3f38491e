"""The round configuration a site hands to FedDAHTrainer.

``nnUNetv2_train`` passes no extra arguments to a trainer, so a FedDAH round is described by a JSON
file whose path is in the environment variable ``FEDDAH_ROUND_CONFIG`` (the site runner writes it;
in-process callers pass a :class:`RoundConfig` directly). No nnU-Net import here: the coordinator
and the site runner build configs without paying nnU-Net's start-up cost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.organs import Task, UnknownOrganError

ENV_VAR = "FEDDAH_ROUND_CONFIG"
DEVICE_AUGMENTATION_ENV = "FEDDAH_DEVICE_AUGMENTATION"
OPTIMIZERS = ("sgd", "adamw")  # nnU-Net's default SGD; AdamW as nnU-Net's nnUNetTrainerAdam builds it
CPU_PRECISIONS = ("float32", "bfloat16")  # nnU-Net trains in float32 on CPU; bfloat16 autocast is ours
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class RoundConfigError(FedDAHError, ValueError):
    """A round configuration that cannot be run; the message names the file and the field."""


@dataclass(frozen=True)
class RoundConfig:
    """One site's local training for one round.

    ``epoch_offset``/``total_epochs`` place this round on the federation-wide poly learning-rate curve,
    so the learning rate decays across rounds instead of restarting at ``initial_lr`` every round.
    The starting weights come from at most one of ``initial_weights`` (a weights file) and
    ``hypernet_checkpoint`` (a DAHyper checkpoint that generates the task ``hypernet_task``, default
    the round's task key); with neither, nnU-Net's random initialisation is used.
    ``device_augmentation`` runs nnU-Net's training augmentation on the training device on whole batches
    instead of in CPU workers (see docs/AUGMENTATION.md; ``$FEDDAH_DEVICE_AUGMENTATION`` overrides it).
    ``optimizer`` is ``sgd`` (nnU-Net's SGD, Nesterov momentum 0.99) or ``adamw`` (nnU-Net's own
    ``nnUNetTrainerAdam`` recipe: AdamW with AMSGrad); docs/TRAINER.md has the measurement behind each.
    ``cpu_precision`` ``bfloat16`` runs the training step under bfloat16 autocast when the trainer trains
    on a CPU with native bfloat16 (nnU-Net's own mixed precision is float16 and CUDA-only); elsewhere it
    changes nothing.
    """

    task: str
    output_weights: str
    output_metrics: str
    initial_weights: str | None = None
    hypernet_checkpoint: str | None = None
    hypernet_task: str | None = None
    epochs: int = 1
    iterations_per_epoch: int = 10
    val_iterations_per_epoch: int = 2
    epoch_offset: int = 0
    total_epochs: int | None = None
    initial_lr: float = 1e-2
    validate: bool = True
    max_validation_cases: int | None = None
    seed: int | None = None
    device_augmentation: bool = False
    optimizer: str = "sgd"
    cpu_precision: str = "float32"
    source: str = "<in-memory>"

    @property
    def parsed_task(self) -> Task:
        return Task.parse(self.task)

    @property
    def hypernet_key(self) -> str:
        """The task key whose weights the DAHyper checkpoint generates for this round."""
        return self.hypernet_task or self.parsed_task.key

    @property
    def lr_horizon(self) -> int:
        return self.total_epochs if self.total_epochs is not None else self.epoch_offset + self.epochs

    def validate_fields(self) -> RoundConfig:
        """Check every field; raise :class:`RoundConfigError` naming the first bad one and the fix."""
        where = f"round config {self.source}"
        try:
            _ = self.parsed_task
        except UnknownOrganError as exc:
            raise RoundConfigError(f"{where}: field 'task' ({self.task!r}): {exc}") from exc
        for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RoundConfigError(f"{where}: field '{name}' must be an integer >= 1, got {value!r}")
        if not isinstance(self.epoch_offset, int) or self.epoch_offset < 0:
            raise RoundConfigError(f"{where}: field 'epoch_offset' must be an integer >= 0, got {self.epoch_offset!r}")
        if self.lr_horizon < self.epoch_offset + self.epochs:
            raise RoundConfigError(
                f"{where}: field 'total_epochs' ({self.total_epochs}) is smaller than epoch_offset + epochs "
                f"({self.epoch_offset + self.epochs}); set it to the federation's total number of local epochs"
            )
        if not (isinstance(self.initial_lr, (int, float)) and self.initial_lr > 0):
            raise RoundConfigError(f"{where}: field 'initial_lr' must be > 0, got {self.initial_lr!r}")
        for name in ("output_weights", "output_metrics"):
            if not getattr(self, name):
                raise RoundConfigError(f"{where}: field '{name}' is required (where to write the round's result)")
        if self.initial_weights and self.hypernet_checkpoint:
            raise RoundConfigError(
                f"{where}: fields 'initial_weights' and 'hypernet_checkpoint' are both given; a round starts from "
                f"one of them — keep 'initial_weights' (a weights file) or 'hypernet_checkpoint' (a DAHyper "
                f"checkpoint), not both")
        if self.hypernet_task is not None and not self.hypernet_checkpoint:
            raise RoundConfigError(f"{where}: field 'hypernet_task' needs field 'hypernet_checkpoint' (the DAHyper "
                                   f"checkpoint that has the task registered)")
        if self.hypernet_task is not None and not (isinstance(self.hypernet_task, str) and self.hypernet_task):
            raise RoundConfigError(f"{where}: field 'hypernet_task' must be a non-empty task key, "
                                   f"got {self.hypernet_task!r}")
        if self.optimizer not in OPTIMIZERS:
            raise RoundConfigError(f"{where}: field 'optimizer' must be one of {list(OPTIMIZERS)}, "
                                   f"got {self.optimizer!r}")
        if self.cpu_precision not in CPU_PRECISIONS:
            raise RoundConfigError(f"{where}: field 'cpu_precision' must be one of {list(CPU_PRECISIONS)}, "
                                   f"got {self.cpu_precision!r}")
        if not isinstance(self.device_augmentation, bool):
            raise RoundConfigError(f"{where}: field 'device_augmentation' must be true or false, "
                                   f"got {self.device_augmentation!r}")
        for name in ("initial_weights", "hypernet_checkpoint"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise RoundConfigError(f"{where}: field '{name}' points to {value}, which does not exist")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<in-memory>") -> RoundConfig:
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RoundConfigError(f"round config {source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        if "task" not in data:
            raise RoundConfigError(f"round config {source}: field 'task' is required (e.g. \"kidneys\")")
        return cls(**{k: v for k, v in data.items()}, source=source).validate_fields()

    @classmethod
    def load(cls, path: os.PathLike | str) -> RoundConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise RoundConfigError(f"round config {path} does not exist (from ${ENV_VAR}); fix the path") from exc
        except json.JSONDecodeError as exc:
            raise RoundConfigError(f"round config {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RoundConfigError(f"round config {path} must be a JSON object")
        base = path.parent
        for key in ("output_weights", "output_metrics", "initial_weights", "hypernet_checkpoint"):
            if data.get(key) and not Path(data[key]).is_absolute():
                data[key] = str(base / data[key])  # relative paths are relative to the config file
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_env(cls) -> RoundConfig | None:
        value = os.environ.get(ENV_VAR)
        return cls.load(value) if value else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("source")
        return out

    def save(self, path: os.PathLike | str) -> Path:
        atomic_write_json(Path(path), self.to_json())
        return Path(path)


def device_augmentation_requested(config: RoundConfig | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the trainer augments on its device: ``$FEDDAH_DEVICE_AUGMENTATION`` if set, else the round config.

    The variable also reaches runs without a round config (plain ``nnUNetv2_train -tr FedDAHTrainer``) and
    sites whose federation plan does not mention the option.
    """
    value = environ.get(DEVICE_AUGMENTATION_ENV)
    if value is not None:
        text = value.strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise RoundConfigError(f"environment variable {DEVICE_AUGMENTATION_ENV}={value!r} is neither 1 nor 0; "
                               f"set it to 1 (augment on the training device), 0 (nnU-Net's CPU workers) or unset it")
    return bool(config and config.device_augmentation)
