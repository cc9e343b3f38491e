"""The interface every server strategy obeys, so one coordinator, demo, export and benchmark run them all.

A strategy answers a few questions, each one method: which weights a site gets for a task
(:meth:`Strategy.weights_for`), how a round's uploads are folded in (:meth:`Strategy.update`), which
weights a task ends with (:meth:`Strategy.task_weights`, :meth:`Strategy.weights_at_site`), which tasks
it holds (:meth:`Strategy.tasks`), and how it is made, saved and loaded (:meth:`Strategy.create`,
:meth:`Strategy.save`, :meth:`Strategy.load`). Heads are organ-keyed everywhere (a task's outputs are
background + its organs), so tasks with different organ sets can share a trunk.

A new strategy is one subclass plus one line in :mod:`nnunet_feddah.method.registry`.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.organs import BACKGROUND
from nnunet_feddah.tensor_file import read_header, read_tensors, write_tensors

Tensors = dict[str, torch.Tensor]
IsHead = Callable[[str], bool]
STRATEGY_FORMAT = "nnunet-feddah-strategy/1"


class StrategyFileError(FedDAHError, ValueError):
    """A strategy file that cannot be loaded: another format, another architecture or unreadable."""


@dataclass
class Upload:
    """One site's trained weights for one task in one round."""

    site: str
    task: str
    organs: list[int]
    weights: Tensors
    num_training_cases: int = 1
    predictive_js: float | None = None  # site-measured JS (all voxels) of its predictions vs the received weights


def task_slots(organs: Sequence[int]) -> list[int]:
    """The head rows of a task: background, then its organs in output order."""
    return [BACKGROUND, *organs]


class Strategy(ABC):
    """What every server strategy must answer. ``name`` is the registry's spelling."""

    name: ClassVar[str] = "abstract"

    @classmethod
    @abstractmethod
    def create(cls, base: Mapping[str, torch.Tensor], is_head: IsHead, params: Mapping[str, Any]) -> Strategy:
        """A fresh strategy from the network's initial organ-slot weights and the plan's ``strategy.params``.

        Unknown parameters must raise ``ValueError`` naming ``strategy.params`` and the known ones.
        """

    @abstractmethod
    def weights_for(self, site: str, task: str, organs: Sequence[int], round_index: int) -> Tensors:
        """The weights sent to ``site`` to train ``task`` (organs in output order) in round ``round_index``.

        A task met for the first time is registered here; the same task asked with other organs raises.
        """

    @abstractmethod
    def update(self, uploads: Sequence[Upload], round_index: int) -> list[dict[str, Any]]:
        """Fold the round's accepted uploads in; returns one JSON-able report per upload, in upload order.

        The coordinator records each report whole in the round's history (``checkpoint.json``): a report holds
        what is worth keeping per upload and round, nothing that grows with the upload's size."""

    def update_notes(self) -> dict[str, Any]:
        """What the last :meth:`update` did beyond the uploads' reports (JSON-able; logged with the round)."""
        return {}

    @abstractmethod
    def task_weights(self, task: str) -> Tensors:
        """The weights a task ends with (what is exported); ``KeyError`` if no upload of it was accepted."""

    def weights_at_site(self, site: str, task: str) -> Tensors:
        """The weights ``site`` would use for ``task`` (evaluation): the task's weights unless sites keep their own."""
        return self.task_weights(task)

    @abstractmethod
    def tasks(self, trained_only: bool = True) -> dict[str, list[int]]:
        """Task key -> organs of every task held; with ``trained_only`` only those with an accepted upload."""

    @abstractmethod
    def state(self) -> tuple[Tensors, dict[str, Any]]:
        """Every tensor kept between rounds, plus the JSON-able rest (what :meth:`save` writes)."""

    def bytes_held(self) -> int:
        """Server memory of the strategy: every tensor it keeps between rounds."""
        tensors, _ = self.state()
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @abstractmethod
    def save(self, path: os.PathLike | str, fingerprint: str) -> Path:
        """Write the strategy atomically as one tensor file for the architecture ``fingerprint``."""

    @classmethod
    @abstractmethod
    def load(cls, path: os.PathLike | str, fingerprint: str, is_head: IsHead) -> Strategy:
        """The strategy :meth:`save` wrote to ``path``; refused (:class:`StrategyFileError`) for another
        format or architecture."""


def write_strategy_file(path: os.PathLike | str, name: str, fingerprint: str, tensors: Mapping[str, torch.Tensor],
                        info: Mapping[str, Any]) -> Path:
    """The generic strategy file: the tensors, the strategy's name, the architecture and the JSON-able rest."""
    return write_tensors(path, tensors, {"format": STRATEGY_FORMAT, "strategy": name,
                                         "architecture_fingerprint": fingerprint, "info": json.dumps(info)})


def read_strategy_file(path: os.PathLike | str, fingerprint: str) -> tuple[Tensors, dict[str, Any]]:
    """Tensors and info of a generic strategy file, checked for format and architecture."""
    path = Path(path)
    meta = read_strategy_metadata(path)
    if meta.get("format") != STRATEGY_FORMAT:
        raise StrategyFileError(f"{path}: field 'format' is {meta.get('format')!r}; not a strategy file")
    check_fingerprint(path, meta, fingerprint)
    return read_tensors(path, "strategy file", StrategyFileError), json.loads(meta["info"])


def read_strategy_metadata(path: os.PathLike | str) -> dict[str, str]:
    """The metadata of a strategy file (or DAHyper checkpoint) without reading its tensors."""
    return read_header(path, "strategy file", StrategyFileError)[1]


def check_fingerprint(path: Path, meta: Mapping[str, str], fingerprint: str) -> None:
    if meta.get("architecture_fingerprint") != fingerprint:
        raise StrategyFileError(f"{path}: field 'architecture_fingerprint' is {meta.get('architecture_fingerprint')}, "
                                f"the federation's plans give {fingerprint}")
