"""Where a new task starts: the donor task and the per-organ head rows (one rule for every strategy).

FedDAH (:meth:`nnunet_feddah.method.amr.AMR.allocate`) and the donor-initialised per-task FedAvg baseline
(``fedavg-per-task-donor``) both start a task met for the first time from what the federation learned:

* **Donor** — among the *fitted* tasks (an upload of them was accepted), the one sharing most organs with
  the new task; ties go to the one fitted most recently, remaining ties to the first registered.
* **Trunk** — every non-head tensor is the donor's.
* **Head rows, per output slot** (background first, then the task's organs in output order): the donor's
  row if the donor has the organ (background: always), else the row of the first fitted task (registration
  order) that has it, else the organ's row of the base (the network's organ-slot weights).

Only *whose* weights are used differs between the strategies: FedDAH passes its generated weights, the
baseline its own averaged models. Given the same donor weights, both start from bit-identical tensors.

FedDAH can instead start a task from a **composed embedding** (:func:`composed_embedding`, AMR's
``new_task_start="composed"``): the task's embedding is built from those of the fitted tasks that share its
organs, and its first weights are whatever the hypernetwork generates for it — no copy is fitted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from nnunet_feddah.method.strategy import task_slots

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FittedTask:
    """A task that can donate: its key, organs (output order) and the most recent round it was fitted in."""

    key: str
    organs: tuple[int, ...]
    last_round: int


def choose_donor(organs: Sequence[int], fitted: Iterable[FittedTask]) -> FittedTask | None:
    """The fitted task sharing most organs with ``organs``; ties: most recent round, then the first given.

    ``fitted`` is in registration order and must not contain the new task itself; ``None`` if it is empty.
    """
    fitted = list(fitted)
    if not fitted:
        return None
    wanted = set(organs)
    return max(fitted, key=lambda t: (len(set(t.organs) & wanted), t.last_round))


def donor_start(organs: Sequence[int], fitted: Iterable[FittedTask],
                weights_of: Callable[[str], Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor],
                heads: Iterable[str]) -> tuple[str, Tensors] | None:
    """The start weights of a new task with ``organs``, and the donor they came from; ``None``: no donor.

    ``weights_of(key)`` gives a fitted task's complete weights with head rows in that task's output order
    (:func:`~nnunet_feddah.method.strategy.task_slots`); ``base`` holds the organ-slot weights whose head
    row ``o`` is organ ``o``'s untrained row; ``heads`` names the head tensors. The result has every
    tensor of the donor, heads with one row per output slot of the new task. ``weights_of`` is called at
    most once per task.
    """
    fitted = list(fitted)
    donor = choose_donor(organs, fitted)
    if donor is None:
        return None
    cache: dict[str, Mapping[str, torch.Tensor]] = {}

    def weights(key: str) -> Mapping[str, torch.Tensor]:
        if key not in cache:
            cache[key] = weights_of(key)
        return cache[key]

    start = dict(weights(donor.key))
    donor_slots = task_slots(donor.organs)
    for name in heads:
        rows = []
        for organ in task_slots(organs):
            if organ in donor_slots:
                rows.append(weights(donor.key)[name][donor_slots.index(organ)])
                continue
            other = next((t for t in fitted if organ in t.organs), None)  # an organ learned elsewhere keeps its row
            if other is not None:
                rows.append(weights(other.key)[name][task_slots(other.organs).index(organ)])
            else:
                rows.append(base[name][organ])
        start[name] = torch.stack(rows)
    return donor.key, start


def composed_embedding(organs: Sequence[int], fitted: Iterable[FittedTask],
                       embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """A new task's embedding from what the fitted tasks learned: the mean of its organs' prototypes.

    An organ's prototype is the mean embedding of the fitted tasks that segment it; organs no fitted task
    has are skipped, and a task with none of them gets the mean of every fitted task. ``None``: nothing is
    fitted yet.
    """
    fitted = list(fitted)
    if not fitted:
        return None
    prototypes = [torch.stack([embeddings[t.key] for t in fitted if organ in t.organs]).mean(0)
                  for organ in organs if any(organ in t.organs for t in fitted)]
    if not prototypes:
        prototypes = [embeddings[t.key] for t in fitted]
    return torch.stack(prototypes).mean(0)
