"""Checks shared by every place that receives weights: the network loader, DAHyper and the coordinator.

No imports (not even torch): the values only need ``.shape``, ``.is_floating_point()`` and ``.isfinite()``,
so the framework-free rooms can use it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def shape_mismatches(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]],
                     limit: int = 3) -> list[str]:
    """Missing, unexpected and mis-shaped names as readable phrases; empty when the two agree exactly."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:limit])})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:limit])})")
    if wrong:
        parts.append(f"{len(wrong)} with wrong shape (e.g. {'; '.join(wrong[:limit])})")
    return parts


def non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of floating tensors holding NaN or Inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
