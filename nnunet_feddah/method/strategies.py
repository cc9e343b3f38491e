"""Server strategies behind one small interface, so the same coordinator, demo and benchmark run all of them.

Plain torch. A strategy answers three questions: which weights does a site get for a task
(:meth:`Strategy.weights_for`), how does it absorb uploads (:meth:`Strategy.update`), and how is it
saved (:meth:`Strategy.state` / :func:`strategy_from_state`). Heads are organ-keyed everywhere (a
task's outputs are background + its organs), so tasks with different organ sets can share a trunk.

* ``feddah`` — one DAHyper refitted by AMR (the method).
* ``fedavg`` — one shared trunk averaged over every upload of the round (weighted by training cases);
  head rows averaged per organ. The classic baseline: it forgets.
* ``fedavg-per-task`` — FedAvg separately per task: one full model copy per task (no forgetting, T× memory).
* ``local`` — every site keeps its own model per task; no sharing at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from nnunet_feddah.federation.plan import FEDDAH_ABLATIONS, STRATEGIES, canonical_strategy
from nnunet_feddah.method.amr import AMR, AMRConfig
from nnunet_feddah.method.dahyper import BACKGROUND, DAHyper, DAHyperConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class Upload:
    """One site's trained weights for one task in one round."""

    site: str
    task: str
    organs: list[int]
    weights: Tensors
    num_training_cases: int = 1


class Strategy:
    """Interface every server strategy obeys."""

    name = "abstract"

    def weights_for(self, site: str, task: str, organs: Sequence[int], round_index: int) -> Tensors:
        raise NotImplementedError

    def update(self, uploads: Sequence[Upload], round_index: int) -> list[dict[str, Any]]:
        """Absorb the round's accepted uploads; returns one JSON-able report per upload."""
        raise NotImplementedError

    def task_weights(self, task: str) -> Tensors:
        """Final weights of a task for export (for ``local``: the most recently trained site's)."""
        raise NotImplementedError

    def weights_at_site(self, site: str, task: str) -> Tensors:
        """The weights ``site`` would use for ``task`` (evaluation): the task's weights unless a site keeps its own."""
        return self.task_weights(task)

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        raise NotImplementedError

    def bytes_held(self) -> int:
        """Server memory of the strategy: every tensor it keeps between rounds."""
        tensors, _ = self.state()
        return sum(t.numel() * t.element_size() for t in tensors.values())


def _slots(organs: Sequence[int]) -> list[int]:
    return [BACKGROUND, *organs]


class FedDAHStrategy(Strategy):
    name = "feddah"

    def __init__(self, hyper: DAHyper, amr_config: AMRConfig) -> None:
        self.hyper = hyper
        self.amr = AMR(hyper, amr_config)
        self.allocation_reports: list[dict[str, Any]] = []

    def weights_for(self, site: str, task: str, organs: Sequence[int], round_index: int) -> Tensors:
        if task not in self.hyper.tasks:
            report = self.amr.allocate(task, organs, round_index)
            self.allocation_reports.append(report.to_json())
        elif self.hyper.tasks[task].organs != list(organs):
            raise ValueError(f"task {task!r} is registered with organs {self.hyper.tasks[task].organs}, "
                             f"site {site} asked for {list(organs)}")
        return self.hyper.generate(task)

    def update(self, uploads: Sequence[Upload], round_index: int) -> list[dict[str, Any]]:
        return [self.amr.update(u.task, u.weights, round_index=round_index, source=u.site).to_json()
                for u in uploads]

    def task_weights(self, task: str) -> Tensors:
        return self.hyper.generate(task)

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, info = self.hyper.state()
        return tensors, {"dahyper": info, "amr": asdict(self.amr.config)}


class _OrganKeyedModels:
    """Named models, each a trunk plus one head row per organ slot (the FedAvg family's storage)."""

    def __init__(self, base: Mapping[str, torch.Tensor], is_head: Callable[[str], bool]) -> None:
        self.base = {k: v.detach().clone() for k, v in base.items()}
        self.heads = [k for k in base if is_head(k)]
        self.models: dict[str, Tensors] = {}

    def model(self, name: str) -> Tensors:
        return self.models.setdefault(name, {k: v.clone() for k, v in self.base.items()})

    def task_view(self, name: str, organs: Sequence[int]) -> Tensors:
        model = self.model(name)
        return {k: (v[_slots(organs)].clone() if k in self.heads else v.clone()) for k, v in model.items()}

    def average_into(self, name: str, uploads: Sequence[Upload]) -> None:
        """Case-weighted mean of the trunk over all uploads; head rows per organ over uploads that have it."""
        model = self.model(name)
        total = sum(u.num_training_cases for u in uploads)
        for key, tensor in model.items():
            if not tensor.is_floating_point():
                continue
            if key not in self.heads:
                model[key] = sum(u.weights[key].float() * (u.num_training_cases / total) for u in uploads)
                continue
            for slot in {s for u in uploads for s in _slots(u.organs)}:
                having = [u for u in uploads if slot in _slots(u.organs)]
                weight = sum(u.num_training_cases for u in having)
                tensor[slot] = sum(u.weights[key][_slots(u.organs).index(slot)].float() * u.num_training_cases
                                   for u in having) / weight

    def state(self) -> Tensors:
        return {f"{name}/{k}": v for name, model in self.models.items() for k, v in model.items()} | {
            f"__base__/{k}": v for k, v in self.base.items()}

    def load(self, tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        self.base = {k.split("/", 1)[1]: v.clone() for k, v in tensors.items() if k.startswith("__base__/")}
        self.models = {n: {k: tensors[f"{n}/{k}"].clone() for k in self.base} for n in names}


class FedAvgStrategy(Strategy):
    """``fedavg`` (one shared model), ``fedavg-per-task`` (one per task) or ``local`` (one per site and task)."""

    def __init__(self, name: str, base: Mapping[str, torch.Tensor], is_head: Callable[[str], bool]) -> None:
        if name not in ("fedavg", "fedavg-per-task", "local"):
            raise ValueError(f"unknown FedAvg-family strategy {name!r}")
        self.name = name
        self.store = _OrganKeyedModels(base, is_head)
        self.last_trained: dict[str, str] = {}  # task -> model name that last trained it (for export)
        self.organs_by_task: dict[str, list[int]] = {}

    def _model_name(self, site: str, task: str) -> str:
        return {"fedavg": "global", "fedavg-per-task": f"task:{task}", "local": f"site:{site}:task:{task}"}[self.name]

    def weights_for(self, site: str, task: str, organs: Sequence[int], round_index: int) -> Tensors:
        self.organs_by_task.setdefault(task, list(organs))
        return self.store.task_view(self._model_name(site, task), organs)

    def update(self, uploads: Sequence[Upload], round_index: int) -> list[dict[str, Any]]:
        groups: dict[str, list[Upload]] = {}
        for upload in uploads:
            groups.setdefault(self._model_name(upload.site, upload.task), []).append(upload)
        for name, group in groups.items():
            self.store.average_into(name, group)
            for upload in group:
                self.last_trained[upload.task] = name
        return [{"task": u.task, "site": u.site, "model": self._model_name(u.site, u.task),
                 "averaged_with": len(groups[self._model_name(u.site, u.task)])} for u in uploads]

    def task_weights(self, task: str) -> Tensors:
        if task not in self.last_trained:
            raise KeyError(f"task {task!r} was never trained under strategy {self.name}")
        return self.store.task_view(self.last_trained[task], self.organs_by_task[task])

    def weights_at_site(self, site: str, task: str) -> Tensors:
        """``local``: a site uses its own model of the task where it trained one."""
        own = self._model_name(site, task)
        if self.name == "local" and own in self.store.models and task in self.organs_by_task:
            return self.store.task_view(own, self.organs_by_task[task])
        return self.task_weights(task)

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        return self.store.state(), {"models": list(self.store.models), "last_trained": self.last_trained,
                                    "organs_by_task": self.organs_by_task}




def _split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route a plan's flat ``strategy.params`` to DAHyperConfig and AMRConfig fields; unknown names fail."""
    hyper_fields = {f.name for f in fields(DAHyperConfig)}
    amr_fields = {f.name for f in fields(AMRConfig)}
    unknown = [k for k in params if k not in hyper_fields | amr_fields]
    if unknown:
        raise ValueError(f"strategy.params: unknown field(s) {unknown}; known: {sorted(hyper_fields | amr_fields)}")
    return ({k: v for k, v in params.items() if k in hyper_fields},
            {k: v for k, v in params.items() if k in amr_fields})


def make_strategy(name: str, params: Mapping[str, Any], base: Mapping[str, torch.Tensor],
                  is_head: Callable[[str], bool]) -> Strategy:
    """A fresh strategy from a plan's ``strategy`` section and the network's initial organ-slot weights."""
    name = canonical_strategy(name)
    if name in FEDDAH_ABLATIONS:
        name, params = "feddah", {**params, **FEDDAH_ABLATIONS[name]}
    if name == "feddah":
        hyper_params, amr_params = _split_params(params)
        return FedDAHStrategy(DAHyper(base, is_head, DAHyperConfig(**hyper_params)), AMRConfig(**amr_params))
    if name in STRATEGIES:
        if params:
            raise ValueError(f"strategy.params: strategy {name!r} takes no parameters, got {sorted(params)}")
        return FedAvgStrategy(name, base, is_head)
    raise ValueError(f"strategy.name: unknown strategy {name!r}; known: {list(STRATEGIES)}")


def strategy_from_state(name: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any],
                        is_head: Callable[[str], bool]) -> Strategy:
    name = canonical_strategy(name)
    if name == "feddah":
        hyper = DAHyper.from_state(tensors, info["dahyper"])
        return FedDAHStrategy(hyper, AMRConfig(**info["amr"]))
    base = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("__base__/")}
    strategy = FedAvgStrategy(name, base, is_head)
    strategy.store.load(tensors, info["models"])
    strategy.last_trained = dict(info["last_trained"])
    strategy.organs_by_task = {k: list(v) for k, v in info["organs_by_task"].items()}
    return strategy
