"""The FedAvg family: baselines that keep whole models and average uploads into them.

* ``fedavg`` — one shared model averaged over every upload of the round (weighted by training cases);
  head rows averaged per organ. The classic baseline: it forgets.
* ``fedavg-per-task`` — FedAvg separately per task: one full model copy per task (no forgetting, T× memory).
* ``fedavg-per-task-donor`` — ``fedavg-per-task`` whose new task starts from the donor FedDAH would
  choose (its own model of that task) with FedDAH's per-organ head rows (:mod:`.donor`), not from the
  untrained base: the fair per-task reference for FedDAH's allocation.
* ``local`` — every site keeps its own model per task; no sharing at all.

They differ only in which model an upload is averaged into (:meth:`OrganKeyedStrategy.model_name`),
for ``local`` in whose model a site evaluates, and for ``fedavg-per-task-donor`` in where a task starts.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.method.aggregate import organ_keyed_mean
from nnunet_feddah.method.donor import FittedTask, donor_start
from nnunet_feddah.method.strategy import (
    IsHead,
    Strategy,
    Tensors,
    Upload,
    read_strategy_file,
    task_slots,
    write_strategy_file,
)


class OrganKeyedModels:
    """Named models, each a trunk plus one head row per organ slot (the FedAvg family's storage)."""

    def __init__(self, base: Mapping[str, torch.Tensor], is_head: IsHead) -> None:
        self.base = {k: v.detach().clone() for k, v in base.items()}
        self.heads = [k for k in base if is_head(k)]
        self.models: dict[str, Tensors] = {}

    def model(self, name: str) -> Tensors:
        return self.models.setdefault(name, {k: v.clone() for k, v in self.base.items()})

    def task_view(self, name: str, organs: Sequence[int]) -> Tensors:
        model = self.model(name)
        return {k: (v[task_slots(organs)].clone() if k in self.heads else v.clone()) for k, v in model.items()}

    def average_into(self, name: str, uploads: Sequence[Upload]) -> None:
        """Case-weighted mean of the trunk over all uploads; head rows per organ over uploads that have it.

        Summed in site order, so the arrival order of a round's uploads does not change a bit."""
        heads = set(self.heads)
        organ_keyed_mean(self.model(name), [(u.weights, task_slots(u.organs), u.num_training_cases)
                                            for u in sorted(uploads, key=lambda u: u.site)], heads.__contains__)

    def state(self) -> Tensors:
        return {f"{name}/{k}": v for name, model in self.models.items() for k, v in model.items()} | {
            f"__base__/{k}": v for k, v in self.base.items()}

    def load(self, tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        self.base = {k.split("/", 1)[1]: v.clone() for k, v in tensors.items() if k.startswith("__base__/")}
        self.models = {n: {k: tensors[f"{n}/{k}"].clone() for k in self.base} for n in names}


class OrganKeyedStrategy(Strategy):
    """Shared body of the FedAvg family: uploads are averaged into the model :meth:`model_name` picks."""

    def __init__(self, base: Mapping[str, torch.Tensor], is_head: IsHead) -> None:
        self.store = OrganKeyedModels(base, is_head)
        self.last_trained: dict[str, str] = {}  # task -> model name that last trained it (for export)
        self.organs_by_task: dict[str, list[int]] = {}

    @abstractmethod
    def model_name(self, site: str, task: str) -> str:
        """The model a site's upload for a task is averaged into (and its next round starts from)."""

    @classmethod
    def create(cls, base: Mapping[str, torch.Tensor], is_head: IsHead,
               params: Mapping[str, Any]) -> OrganKeyedStrategy:
        if params:
            raise ValueError(f"strategy.params: strategy {cls.name!r} takes no parameters, got {sorted(params)}")
        return cls(base, is_head)

    def weights_for(self, site: str, task: str, organs: Sequence[int], round_index: int) -> Tensors:
        self.organs_by_task.setdefault(task, list(organs))
        return self.store.task_view(self.model_name(site, task), organs)

    def update(self, uploads: Sequence[Upload], round_index: int) -> list[dict[str, Any]]:
        groups: dict[str, list[Upload]] = {}
        for upload in uploads:
            groups.setdefault(self.model_name(upload.site, upload.task), []).append(upload)
        for name, group in groups.items():
            self.store.average_into(name, group)
            for upload in group:
                self.last_trained[upload.task] = name
        return [{"task": u.task, "site": u.site, "model": self.model_name(u.site, u.task),
                 "averaged_with": len(groups[self.model_name(u.site, u.task)])} for u in uploads]

    def task_weights(self, task: str) -> Tensors:
        if task not in self.last_trained:
            raise KeyError(f"task {task!r} was never trained under strategy {self.name}")
        return self.store.task_view(self.last_trained[task], self.organs_by_task[task])

    def tasks(self, trained_only: bool = True) -> dict[str, list[int]]:
        return {k: list(self.organs_by_task[k]) for k in self.last_trained}

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        return self.store.state(), {"models": list(self.store.models), "last_trained": self.last_trained,
                                    "organs_by_task": self.organs_by_task}

    def save(self, path: os.PathLike | str, fingerprint: str) -> Path:
        tensors, info = self.state()
        return write_strategy_file(path, self.name, fingerprint, tensors, info)

    @classmethod
    def load(cls, path: os.PathLike | str, fingerprint: str, is_head: IsHead) -> OrganKeyedStrategy:
        tensors, info = read_strategy_file(path, fingerprint)
        base = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("__base__/")}
        strategy = cls(base, is_head)
        strategy.store.load(tensors, info["models"])
        strategy.load_info(info)
        return strategy

    def load_info(self, info: Mapping[str, Any]) -> None:
        """Restore the JSON-able part of :meth:`state` (subclasses extend it with their own fields)."""
        self.last_trained = dict(info["last_trained"])
        self.organs_by_task = {k: list(v) for k, v in info["organs_by_task"].items()}


class FedAvgStrategy(OrganKeyedStrategy):
    """One model for every site and task: what the federation learns last overwrites the rest."""

    name = "fedavg"

    def model_name(self, site: str, task: str) -> str:
        return "global"


class PerTaskFedAvgStrategy(OrganKeyedStrategy):
    """One FedAvg model per task: remembers everything at the price of one model copy per task."""

    name = "fedavg-per-task"

    def model_name(self, site: str, task: str) -> str:
        return f"task:{task}"


class DonorPerTaskFedAvgStrategy(PerTaskFedAvgStrategy):
    """Per-task FedAvg whose new task starts where FedDAH's allocation would put it, from its own models.

    The first time a task is asked for (or uploaded), its model is the donor task's model — the fitted
    task sharing most organs, ties to the most recently fitted — with head rows per organ from the donor,
    else another fitted task that has the organ, else the base (:func:`~.donor.donor_start`, the rule
    :meth:`~nnunet_feddah.method.amr.AMR.allocate` uses). Without a fitted task it starts from the base.
    Head rows of organ slots the task does not have stay the base's (they are never sent or averaged).
    """

    name = "fedavg-per-task-donor"

    def __init__(self, base: Mapping[str, torch.Tensor], is_head: IsHead) -> None:
        super().__init__(base, is_head)
        self.last_round: dict[str, int] = {}  # task -> most recent round an upload of it was averaged in
        self.donors: dict[str, str | None] = {}  # task -> the task it started from (None: the base)

    def weights_for(self, site: str, task: str, organs: Sequence[int], round_index: int) -> Tensors:
        self._start(task, organs)
        return super().weights_for(site, task, organs, round_index)

    def update(self, uploads: Sequence[Upload], round_index: int) -> list[dict[str, Any]]:
        for upload in uploads:  # an upload of a task never asked for still starts from its donor
            self._start(upload.task, upload.organs)
        reports = super().update(uploads, round_index)
        for upload, report in zip(uploads, reports, strict=True):
            self.last_round[upload.task] = max(self.last_round.get(upload.task, round_index), round_index)
            report["started_from"] = self.donors[upload.task]
        return reports

    def _start(self, task: str, organs: Sequence[int]) -> None:
        if task in self.organs_by_task:
            return
        fitted = [FittedTask(key, tuple(self.organs_by_task[key]), self.last_round[key])
                  for key in self.organs_by_task if key in self.last_round]
        self.organs_by_task[task] = list(organs)
        allocation = donor_start(organs, fitted, lambda key: self.store.task_view(self.model_name("", key),
                                                                                  self.organs_by_task[key]),
                                 self.store.base, self.store.heads)
        self.donors[task] = None if allocation is None else allocation[0]
        if allocation is None:
            return
        model = self.store.model(self.model_name("", task))
        slots = task_slots(organs)
        for key, tensor in allocation[1].items():
            if key in self.store.heads:
                model[key][slots] = tensor
            else:
                model[key] = tensor.clone()

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, info = super().state()
        return tensors, {**info, "last_round": self.last_round, "donors": self.donors}

    def load_info(self, info: Mapping[str, Any]) -> None:
        super().load_info(info)
        self.last_round = {k: int(v) for k, v in info["last_round"].items()}
        self.donors = dict(info["donors"])


class LocalStrategy(OrganKeyedStrategy):
    """Every site keeps its own model per task; nothing is shared."""

    name = "local"

    def model_name(self, site: str, task: str) -> str:
        return f"site:{site}:task:{task}"

    def weights_at_site(self, site: str, task: str) -> Tensors:
        """A site uses its own model of the task where it trained one."""
        own = self.model_name(site, task)
        if own in self.store.models and task in self.organs_by_task:
            return self.store.task_view(own, self.organs_by_task[task])
        return self.task_weights(task)
