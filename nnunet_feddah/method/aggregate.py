"""How one task's uploads of one round become one target, and how much of a change survives.

Plain torch, shared by FedDAH (:mod:`.amr`), the FedAvg family (:mod:`.fedavg`) and the coordinator's log.

Every upload of a task in a round started from the same weights ``S`` the coordinator sent, so the round's
work is the set of changes ``up_i − S``. They are combined in one step, independent of arrival order:

    target = S + Σ_i c_i · k_i · (up_i − S),   c_i = n_i / Σ_j n_j   (n: the site's training cases)

``k_i`` is the share of site i's change the aggregation keeps on purpose: 1 for plain averaging, ``1 − W_s``
where FedDAH weighs the task's history against the upload. With every ``k_i = 1`` this is FedAvg's
case-weighted mean. Sums run over the contributions sorted by source, in float64, so two arrival orders
give bit-identical targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Contribution:
    """One site's trained weights for a task in a round, and how many training cases it saw."""

    source: str
    weights: Mapping[str, torch.Tensor]
    num_training_cases: int = 1
    predictive_js: float | None = None  # the site's JS between its predictions and the received weights


def in_source_order(contributions: Sequence[Contribution]) -> list[Contribution]:
    """Contributions sorted by source; two uploads from one source in one round are refused."""
    ordered = sorted(contributions, key=lambda c: c.source)
    sources = [c.source for c in ordered]
    if len(set(sources)) != len(sources):
        raise ValueError(f"one upload per source and task per round, got sources {sources}")
    return ordered


def case_weights(contributions: Sequence[Contribution]) -> list[float]:
    """``c_i = n_i / Σ n`` in the given order (cases below 1 count as 1)."""
    cases = [max(int(c.num_training_cases), 1) for c in contributions]
    return [n / sum(cases) for n in cases]


def combine(start: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
            keep: Sequence[float]) -> Tensors:
    """``start + Σ_i c_i k_i (up_i − start)`` per floating tensor (others are the start's), ``keep[i] = k_i``.

    ``contributions`` and ``keep`` must already be in source order (:func:`in_source_order`).
    """
    weights = [c * k for c, k in zip(case_weights(contributions), keep, strict=True)]
    out: Tensors = {}
    for name, s in start.items():
        if not s.is_floating_point():
            out[name] = s.clone()
            continue
        total = s.double().clone()
        for w, contribution in zip(weights, contributions, strict=True):
            total += w * (contribution.weights[name].double() - s.double())
        out[name] = total.to(s.dtype)
    return out


def organ_keyed_mean(into: MutableMapping[str, torch.Tensor],
                     members: Sequence[tuple[Mapping[str, torch.Tensor], Sequence[int], float]],
                     is_head: Callable[[str], bool]) -> None:
    """Overwrite ``into`` with the weighted mean of ``members`` — ``(weights, output slots, weight)`` each.

    A trunk tensor is averaged over every member; a head tensor's row of one organ slot only over the members
    whose task has that organ (their row for it sits at the slot's position in their output slots). Used for
    FedAvg's models and for the federation's consensus base. Sums in float64 in the members' order, so a
    caller that orders them (by site, by task key) fixes every bit of the result.
    """
    total = sum(weight for _, _, weight in members)
    for name, tensor in into.items():
        if not tensor.is_floating_point():
            continue
        if not is_head(name):
            into[name] = sum(w[name].double() * (weight / total) for w, _, weight in members).to(tensor.dtype)
            continue
        for slot in sorted({s for _, slots, _ in members for s in slots}):
            having = [(w[name][list(slots).index(slot)], weight) for w, slots, weight in members if slot in slots]
            tensor[slot] = (sum(row.double() * weight for row, weight in having)
                            / sum(weight for _, weight in having)).to(tensor.dtype)


def norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every floating tensor, accumulated in float64."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in tensors.values() if v.is_floating_point()))


def change_lost(start: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                after: Mapping[str, torch.Tensor]) -> float:
    """``‖after − target‖ / ‖target − start‖``: the share of the change ``start → target`` that ``after`` lacks.

    Relative to the change, not to the weights: a round moves the weights by a few percent, so a loss
    relative to the whole vector looks tiny whatever is lost. 0 for an exact store; 1 for one that kept
    the start. With ``target`` = one site's upload it is how much of that site's own work survives.
    """
    lost = norm({k: after[k].double() - v.double() for k, v in target.items() if v.is_floating_point()})
    return lost / max(norm({k: v.double() - start[k].double() for k, v in target.items()
                            if v.is_floating_point()}), 1e-30)


def relative_l2(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all floating tensors of ``b``."""
    # differences in the tensors' own precision, sums accumulated in float64: half the time of all-float64
    num = sum(float((a[k] - v).pow(2).sum(dtype=torch.float64)) for k, v in b.items() if v.is_floating_point())
    den = sum(float(v.pow(2).sum(dtype=torch.float64)) for v in b.values() if v.is_floating_point())
    return (num / max(den, 1e-30)) ** 0.5
