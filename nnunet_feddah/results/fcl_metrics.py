"""Continual-learning metrics on a Dice matrix (task × time step). Plain numpy: no nnU-Net, no Flower.

The matrix ``R[i, j]`` is the Dice of task ``i`` after time step ``j`` (NaN before the task was seen
or where no site could evaluate it). In federated continual learning the sites' streams are not in
lock-step, so "the step at which task *i* was learned" is read from the schedule: the last column in
whose interval some site trained the task. With that:

* **final mean Dice** — mean over tasks of the last column (NaN-aware);
* **old tasks** — tasks nobody trained in the last time step (only they can have been forgotten);
* **BWT** (backward transfer, Lopez-Paz & Ranzato 2017) — mean over old tasks of ``R[i, T] − R[i, k_i]``,
  ``k_i`` the column where task *i* was last trained; negative = forgetting;
* **forgetting** (Chaudhry et al. 2018) — mean over old tasks of ``max_{j < T} R[i, j] − R[i, T]``,
  the drop from the task's best earlier value (negative when a task got better later);
* **new task after its first round** (transfer) — mean over tasks first trained after the first time step of
  ``R[i, f_i]``, ``f_i`` the first column in whose interval some site trained task *i*: what a new task
  reaches from the start the federation gives it (with ``rounds_per_step`` 1, after one round).

BWT and forgetting are None when there is no old task (a single time step, or every task trained in the last one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DiceMatrix:
    """``values[i][j]``: Dice of ``tasks[i]`` after time step ``steps[j]`` (a round number); NaN = not evaluated."""

    tasks: list[str]
    steps: list[int]
    values: np.ndarray

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != (len(self.tasks), len(self.steps)):
            raise ValueError(f"Dice matrix values have shape {self.values.shape}, expected "
                             f"{(len(self.tasks), len(self.steps))} (tasks × steps)")

    def to_json(self) -> dict[str, Any]:
        """``{"tasks", "steps", "values"}`` with NaN written as null (JSON has no NaN)."""
        return {"tasks": list(self.tasks), "steps": list(self.steps),
                "values": [[_json_float(v) for v in row] for row in self.values]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DiceMatrix:
        values = [[math.nan if v is None else float(v) for v in row] for row in data["values"]]
        return cls(list(data["tasks"]), [int(s) for s in data["steps"]],
                   np.asarray(values, dtype=np.float64).reshape(len(data["tasks"]), len(data["steps"])))


def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def nanmean(values: Sequence[float | None]) -> float:
    """Mean of the finite values (None and NaN = not evaluated); NaN when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _metric(values: Sequence[float]) -> float | None:
    mean = nanmean(values)
    return mean if math.isfinite(mean) else None


def mean_matrix(per_site: Mapping[str, DiceMatrix]) -> DiceMatrix:
    """Entry-wise mean over sites, ignoring sites that could not evaluate a task (NaN)."""
    if not per_site:
        raise ValueError("no per-site Dice matrix to average")
    first = next(iter(per_site.values()))
    for site, matrix in per_site.items():
        if matrix.tasks != first.tasks or matrix.steps != first.steps:
            raise ValueError(f"site {site}: Dice matrix has tasks/steps {matrix.tasks}/{matrix.steps}, "
                             f"expected {first.tasks}/{first.steps}")
    stack = np.stack([m.values for m in per_site.values()])
    counts = np.sum(np.isfinite(stack), axis=0)
    sums = np.nansum(stack, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return DiceMatrix(list(first.tasks), list(first.steps), values)


def fcl_metrics(matrix: DiceMatrix, last_trained_column: Mapping[str, int],
                first_trained_column: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Final mean Dice, forgetting, BWT and (given ``first_trained_column``) the new tasks' Dice after their
    first time step, of one Dice matrix (module docstring has the definitions).

    ``last_trained_column[task]`` / ``first_trained_column[task]``: index of the last / first column in whose
    interval some site trained ``task``.
    """
    missing = [t for t in matrix.tasks if t not in last_trained_column]
    if missing:
        raise ValueError(f"no training column given for task(s) {missing}")
    if not matrix.steps:
        raise ValueError("a Dice matrix without time steps has no metrics")
    last = len(matrix.steps) - 1
    final = matrix.values[:, last]
    old = [i for i, t in enumerate(matrix.tasks) if last_trained_column[t] < last]
    bwt, forgetting = [], []
    for i in old:
        final_value = matrix.values[i, last]
        trained = matrix.values[i, last_trained_column[matrix.tasks[i]]]
        earlier = matrix.values[i, :last]
        if math.isfinite(final_value) and math.isfinite(trained):
            bwt.append(final_value - trained)
        if math.isfinite(final_value) and np.isfinite(earlier).any():
            forgetting.append(float(np.nanmax(earlier)) - final_value)
    first = first_trained_column or {}
    new_tasks = [matrix.values[i, first[t]] for i, t in enumerate(matrix.tasks) if first.get(t, 0) > 0]
    return {
        "final_mean_dice": _metric(list(final)),
        "forgetting": _metric(forgetting),
        "bwt": _metric(bwt),
        "new_task_first_dice": _metric(new_tasks),
        "old_tasks": [matrix.tasks[i] for i in old],
        "final_dice": {t: _json_float(v) for t, v in zip(matrix.tasks, final, strict=True)},
    }
