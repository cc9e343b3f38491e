"""Statistics over seeds: the mean of a metric, its 95 % confidence interval, and paired differences.

One benchmark seed is one draw of the phantom data, of nnU-Net's sampling and of the initial network;
a difference between two strategies on one seed can be noise. The report therefore runs every strategy
on the same few seeds and states, for every metric, the mean over seeds and the half-width of the 95 %
confidence interval of that mean. With a handful of seeds the normal approximation is too narrow, so the
interval uses Student's t with ``n − 1`` degrees of freedom: ``t(0.975, n−1) · sd / √n`` (``sd`` the
sample standard deviation, ``ddof=1``). A single seed has no spread to estimate, hence no interval.

Strategies are compared **paired** (:func:`paired_difference`): the per-seed differences ``a − b`` over
the seeds both have, and the interval of their mean. Pairing removes what the seeds share (the data a
seed draws is the same for both strategies), which is usually most of the variance. A difference whose
interval contains 0 is not a result: it is reported as *unresolved*.

Plain numpy/scipy: no nnU-Net, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

CONFIDENCE = 0.95


def finite_values(values: Iterable[float | None]) -> list[float]:
    """The values that carry a number: ``None`` (a metric that could not be computed) and NaN/inf are skipped.

    A seed whose metric is undefined (no old task, nothing evaluated) says nothing about its spread, so it
    is left out of the mean rather than counted as 0.
    """
    kept = []
    for value in values:
        if value is None or isinstance(value, bool):
            continue
        number = float(value)
        if math.isfinite(number):
            kept.append(number)
    return kept


def mean_ci95(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """``(mean, half-width of the 95 % CI of the mean)`` over the finite values (Student's t, ``sd`` with ddof=1).

    ``(None, None)`` for no value; ``(mean, None)`` for one value (one seed has no spread to estimate, so
    it gets no interval rather than a zero-width one that would look certain).
    """
    kept = finite_values(values)
    n = len(kept)
    if n == 0:
        return None, None
    mean = float(np.mean(kept))
    if n == 1:
        return mean, None
    sd = 0.0 if min(kept) == max(kept) else float(np.std(kept, ddof=1))  # no rounding noise on equal values
    return mean, float(_scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n))


def summary(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"mean", "ci95", "n"}`` of per-seed numbers: the block report.json uses for any metric over seeds.

    ``n`` counts the values that entered the mean (finite, not None), so a reader can tell a mean of one
    seed from a mean of five.
    """
    kept = finite_values(values)
    mean, ci95 = mean_ci95(kept)
    return {"mean": mean, "ci95": ci95, "n": len(kept)}


def resolved(mean: float | None, ci95: float | None) -> bool:
    """Whether the interval ``mean ± ci95`` excludes 0; False without an interval (one seed, or none)."""
    return mean is not None and ci95 is not None and abs(mean) > ci95


def paired_difference(a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None]) -> dict[str, Any]:
    """The paired difference ``a − b`` over the seeds both have a number for, with its 95 % CI.

    Returns ``{"mean", "ci95", "n", "per_seed": {seed: a − b}, "resolved"}``. ``resolved`` is True only when
    the interval excludes 0: a difference whose interval contains 0 is not a result (the strategies cannot be
    told apart on these seeds). Seeds where either side is None/non-finite are left out, not counted as 0.
    """
    per_seed = {}
    for seed, value in a.items():
        if seed not in b:
            continue
        left, right = finite_values([value]), finite_values([b[seed]])
        if left and right:
            per_seed[seed] = left[0] - right[0]
    mean, ci95 = mean_ci95(per_seed.values())
    return {"mean": mean, "ci95": ci95, "n": len(per_seed), "per_seed": per_seed, "resolved": resolved(mean, ci95)}
