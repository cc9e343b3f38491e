"""``feddah``: one DAHyper kept by AMR — the method. Its strategy file is a plain DAHyper checkpoint.

By default the DAHyper holds every task as the shared base plus the task's own remainder (exact while it is
trained, quantised once idle); the paper's generators are the ``feddah-hypernet`` family of variants
(docs/METHOD.md §0 says why and what each costs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.method.aggregate import Contribution
from nnunet_feddah.method.amr import AMR, AMRConfig
from nnunet_feddah.method.dahyper import DAHyper, DAHyperConfig
from nnunet_feddah.method.hypernet_file import load_hypernet, read_hypernet_metadata, save_hypernet
from nnunet_feddah.method.strategy import IsHead, Strategy, Tensors, Upload


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route a plan's flat ``strategy.params`` to DAHyperConfig and AMRConfig fields; unknown names fail."""
    hyper_fields = {f.name for f in fields(DAHyperConfig)}
    amr_fields = {f.name for f in fields(AMRConfig)}
    unknown = [k for k in params if k not in hyper_fields | amr_fields]
    if unknown:
        raise ValueError(f"strategy.params: unknown field(s) {unknown}; known: {sorted(hyper_fields | amr_fields)}")
    return ({k: v for k, v in params.items() if k in hyper_fields},
            {k: v for k, v in params.items() if k in amr_fields})


class FedDAHStrategy(Strategy):
    name = "feddah"

    def __init__(self, hyper: DAHyper, amr_config: AMRConfig) -> None:
        self.hyper = hyper
        self.amr = AMR(hyper, amr_config)

    @classmethod
    def create(cls, base: Mapping[str, torch.Tensor], is_head: IsHead, params: Mapping[str, Any]) -> FedDAHStrategy:
        hyper_params, amr_params = split_params(params)
        return cls(DAHyper(base, is_head, DAHyperConfig(**hyper_params)), AMRConfig(**amr_params))

    def weights_for(self, site: str, task: str, organs: Sequence[int], round_index: int) -> Tensors:
        if task not in self.hyper.tasks:
            self.amr.allocate(task, organs, round_index)
        elif self.hyper.tasks[task].organs != list(organs):
            raise ValueError(f"task {task!r} is registered with organs {self.hyper.tasks[task].organs}, "
                             f"site {site} asked for {list(organs)}")
        return self.hyper.generate(task)

    def update(self, uploads: Sequence[Upload], round_index: int) -> list[dict[str, Any]]:
        """One AMR aggregation and fit per task of the round (order-free); reports in upload order."""
        by_task: dict[str, list[Contribution]] = {}
        for u in uploads:
            by_task.setdefault(u.task, []).append(Contribution(u.site, u.weights, u.num_training_cases,
                                                               u.predictive_js))
        reports = self.amr.update_round(by_task, round_index)
        remaining = {task: iter(group) for task, group in reports.items()}
        return [next(remaining[u.task]).record() for u in uploads]

    def update_notes(self) -> dict[str, Any]:
        """Tasks the last update compressed (went idle) and the share of their weights that cost."""
        return {"compressed": list(self.amr.compressed)} if self.amr.compressed else {}

    def task_weights(self, task: str) -> Tensors:
        return self.hyper.generate(task)

    def tasks(self, trained_only: bool = True) -> dict[str, list[int]]:
        return {k: list(t.organs) for k, t in self.hyper.tasks.items() if t.contributors or not trained_only}

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, info = self.hyper.state()
        return tensors, {"dahyper": info, "amr": asdict(self.amr.config)}

    def save(self, path: os.PathLike | str, fingerprint: str) -> Path:
        """A DAHyper checkpoint, so a trainer's round config can point at the coordinator's file directly."""
        return save_hypernet(path, self.hyper, fingerprint, extra={"strategy": self.name,
                                                                   "amr": asdict(self.amr.config)})

    @classmethod
    def load(cls, path: os.PathLike | str, fingerprint: str, is_head: IsHead) -> FedDAHStrategy:
        hyper = load_hypernet(path, fingerprint)
        amr = dict(read_hypernet_metadata(path).get("extra", {}).get("amr", {}))
        for removed in ("solver", "adam_steps", "adam_lr"):  # fields of files before 2026-12-07 (the closed form ran)
            amr.pop(removed, None)
        amr.setdefault("idle_bits", 0)  # before 2026-12-07 an idle task's residual was dropped
        return cls(hyper, AMRConfig(**amr))
