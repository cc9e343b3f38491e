"""What an upload must be before the strategy sees it: shapes, dtypes, finite weights, change bounds, metrics.

A site is not trusted: every value the coordinator reads, stores or weights by is typed and bounded here, and
an upload that fails is rejected with its field named (the round goes on without it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from typing import Any

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation.jobs import SiteJob, SiteResult
from nnunet_feddah.method.aggregate import norm
from nnunet_feddah.organs import BY_LABEL
from nnunet_feddah.tensor_checks import non_finite, shape_mismatches

# Sanity bounds on an upload, not a Byzantine defence: they sit between what honest training was measured to do
# and the corruptions tests/test_faults.py sends. Measured 2026-12-06 on the phantom benchmark (bfloat16 CPU plan,
# AdamW 3e-3): a 600-iteration first round from nnU-Net's initialisation moves the weights by 0.87-0.98 (relative
# L2) and grows their norm 1.33-1.40x with the per-task LR schedule, and by up to 1.10 and 1.49x with the
# federation-wide one; later rounds (from a trained start) move them 0.2-0.6. Replacing every tensor by an
# unrelated one of the same norm moves the weights by ~1.41 (orthogonal directions); scaling them by 1.99 moves
# them by 0.99 at a norm ratio of 1.99. Until that measurement the bounds were 1.0 and 1.5, which rejected honest
# first rounds under the federation-wide schedule.
DEFAULT_MAX_RELATIVE_CHANGE = 1.25
# An upload's weight norm may differ from what was sent by at most this factor either way.
NORM_RATIO_BOUND = 1.75
# Per tensor: the RMS of its change over the RMS of the tensor sent (at least TENSOR_SCALE_FLOOR, for tensors sent
# as zeros: nnU-Net's biases). Measured on real uploads (plans/phantom_many.json, seed 0, 2026-12-07): an honest
# 600-iteration first round from nnU-Net's initialisation reaches 5.3 (a norm bias that starts at 0), 100-iteration
# rounds from a trained start 0.6-1.4. A norm bias shifted by 2 reads 20 while moving too little of the network
# for the global bounds to see; a norm weight x 25 reads 24 (on the CPU network it also fails the global bound).
TENSOR_CHANGE_BOUND = 16.0
TENSOR_SCALE_FLOOR = 0.1
# An upload's metrics, as JSON: an honest site's are ≈ 2-6 kB (per-epoch loss and LR lists, a few cases) and
# 3 levels deep; the bounds leave room for 1000-epoch rounds and refuse a metrics object that would grow
# checkpoint.json (a 100,000-key `dice` made it 5.4 MB) or exhaust the JSON encoder.
MAX_METRICS_BYTES = 1 << 20
MAX_METRICS_DEPTH = 8


class UploadRejected(FedDAHError, ValueError):
    """An upload that must not touch the strategy; the message is the logged reason."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(value: Any, field: str, allow_nan: bool = True) -> None:
    """A value in [0, 1] or null; NaN only where it means "not measured" (a Dice of an absent organ)."""
    if value is not None and not (_is_number(value) and ((allow_nan and math.isnan(value)) or 0 <= value <= 1)):
        raise UploadRejected(f"metrics field '{field}' is {value!r}, expected a{'' if allow_nan else ' finite'} "
                             f"value in [0, 1] (or null)")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counted no further than ``limit + 1``."""
    if limit < 0 or not isinstance(value, (Mapping, list, tuple)):
        return 0
    children = value.values() if isinstance(value, Mapping) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def measured(value: Any) -> float | None:
    """A validated Dice as the state records it: NaN ("not measured") becomes null, which JSON can hold."""
    return float(value) if _is_number(value) and math.isfinite(value) else None


def validate_metrics(metrics: Any, max_training_cases: int | None = None,
                     organ_keys: Collection[str] | None = None, site: str = "the site") -> None:
    """Every metric the coordinator reads, stores or weights by, typed and bounded (a site is not trusted).

    ``organ_keys``: the organs of the task the site was sent; ``dice`` may name no other."""
    if not isinstance(metrics, Mapping):
        raise UploadRejected(f"metrics must be a JSON object, got {type(metrics).__name__}")
    if _depth(metrics, MAX_METRICS_DEPTH) > MAX_METRICS_DEPTH:
        raise UploadRejected(f"metrics are nested deeper than {MAX_METRICS_DEPTH} levels")
    try:
        size = len(json.dumps(metrics))
    except (TypeError, ValueError) as exc:
        raise UploadRejected(f"metrics are not plain JSON ({exc})") from None
    if size > MAX_METRICS_BYTES:
        raise UploadRejected(f"metrics are {size} bytes as JSON, more than the {MAX_METRICS_BYTES} allowed")
    loss = metrics.get("train_loss")
    if not _is_number(loss) or not math.isfinite(loss):
        raise UploadRejected(f"metrics field 'train_loss' is {loss!r}, expected a finite number")
    iterations = metrics.get("iterations")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise UploadRejected(f"metrics field 'iterations' is {iterations!r}, expected an integer ≥ 1")
    cases = metrics.get("num_training_cases")
    if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
        raise UploadRejected(f"metrics field 'num_training_cases' is {cases!r}, expected an integer ≥ 1")
    if max_training_cases is not None and cases > max_training_cases:
        raise UploadRejected(f"metrics field 'num_training_cases' is {cases}, but the coordinator's record "
                             f"(fingerprint round, dataset.json or the site's registration) holds only "
                             f"{max_training_cases} training cases for {site}; an operator who knows better sets "
                             f"--training-cases SITE=N")
    dice = metrics.get("dice")
    if dice is not None and not isinstance(dice, Mapping):
        raise UploadRejected(f"metrics field 'dice' is {dice!r}, expected an object organ -> Dice")
    unknown = [k for k in (dice or {}) if organ_keys is not None and k not in organ_keys]
    if unknown:
        raise UploadRejected(f"metrics field 'dice' names {len(unknown)} organ(s) outside the task "
                             f"({', '.join(map(repr, unknown[:3]))}); expected only {sorted(organ_keys or [])}")
    for organ, value in (dice or {}).items():
        _check_fraction(value, f"dice.{organ}")
    _check_fraction(metrics.get("mean_dice"), "mean_dice")
    js = metrics.get("predictive_js")
    if js is not None and not isinstance(js, Mapping):
        raise UploadRejected(f"metrics field 'predictive_js' is {js!r}, expected an object or null")
    for part in ("foreground", "all"):  # it steers W_s: a NaN is refused
        _check_fraction((js or {}).get(part), f"predictive_js.{part}", allow_nan=False)


def validate_upload(job: SiteJob, result: SiteResult, max_relative_change: float,
                    max_training_cases: int | None = None) -> None:
    """Raise :class:`UploadRejected` naming the problem; nothing is modified.

    The change bound has three parts: an upload may move the weights by at most ``max_relative_change``
    (relative L2); its norm must stay within :data:`NORM_RATIO_BOUND` of the norm sent (all-zero is a
    relative change of exactly 1 and weights x 1.99 one of 0.99: both pass the first part alone); and no
    tensor the coordinator sent non-zero may come back all zero.
    """
    if result.site != job.site or result.round != job.round or result.task != job.task:
        raise UploadRejected(f"answers site={result.site} round={result.round} task={result.task}, but "
                             f"{job.site} was sent round {job.round} task {job.task}")
    if not isinstance(result.weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in result.weights.values()):
        raise UploadRejected("weights are not a mapping of tensor name -> tensor")
    mismatches = shape_mismatches({k: tuple(v.shape) for k, v in job.weights.items()},
                                  {k: tuple(v.shape) for k, v in result.weights.items()})
    if mismatches:
        raise UploadRejected(f"tensor names/shapes differ from what was sent: {'; '.join(mismatches)}")
    wrong_dtype = [k for k, v in job.weights.items() if result.weights[k].dtype != v.dtype]
    if wrong_dtype:
        raise UploadRejected(f"tensor dtypes differ from what was sent: {wrong_dtype[:3]}")
    bad = non_finite(result.weights)
    if bad:
        raise UploadRejected(f"NaN/Inf in {bad[:3]}")
    change = norm({k: result.weights[k].double() - job.weights[k].double() for k in job.weights}) / max(
        norm(job.weights), 1e-12)
    if change > max_relative_change:
        raise UploadRejected(f"relative change {change:.3f} of the weights exceeds the bound {max_relative_change} "
                             f"(if the site trained honestly, e.g. a long first round from nnU-Net's initialisation, "
                             f"raise the coordinator's --max-relative-change)")
    ratio = norm(result.weights) / max(norm(job.weights), 1e-12)
    if not 1 / NORM_RATIO_BOUND <= ratio <= NORM_RATIO_BOUND:
        raise UploadRejected(f"the weights' norm is {ratio:.3f}× what was sent, outside [1/{NORM_RATIO_BOUND}, "
                             f"{NORM_RATIO_BOUND}] (a collapsed or scaled upload)")
    moved = max(((_tensor_change(job.weights[k], result.weights[k]), k) for k in job.weights), default=(0.0, ""))
    if moved[0] > TENSOR_CHANGE_BOUND:
        raise UploadRejected(f"tensor {moved[1]} moved by {moved[0]:.1f}x its own scale (RMS of the change over "
                             f"max(RMS sent, {TENSOR_SCALE_FLOOR})), more than the bound {TENSOR_CHANGE_BOUND}")
    collapsed = [k for k, v in job.weights.items() if v.is_floating_point() and v.numel() > 1
                 and bool(v.abs().sum() > 0) and not bool(result.weights[k].abs().sum() > 0)]
    if collapsed:
        raise UploadRejected(f"{len(collapsed)} tensor(s) sent non-zero came back all zero (e.g. {collapsed[:3]})")
    if not _is_number(result.seconds) or not math.isfinite(result.seconds) or result.seconds < 0:
        raise UploadRejected(f"field 'seconds' is {result.seconds!r}, expected a finite number ≥ 0")
    validate_metrics(result.metrics, max_training_cases,
                     [BY_LABEL[label].key for label in job.organs if label in BY_LABEL], job.site)


def _tensor_change(sent: torch.Tensor, received: torch.Tensor) -> float:
    if not sent.is_floating_point() or sent.numel() == 0:
        return 0.0
    change = float((received.double() - sent.double()).square().mean().sqrt())
    return change / max(float(sent.double().square().mean().sqrt()), TENSOR_SCALE_FLOOR)
