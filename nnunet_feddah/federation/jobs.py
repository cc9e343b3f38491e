"""What a coordinator sends a site for one round and what comes back: the two records of the round contract.

Plain dataclasses (no Flower, no nnU-Net): the in-process executor, Flower's messages and the benchmark's
replay all build and read these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nnunet_feddah.method.strategy import Tensors


@dataclass
class SiteJob:
    """What one site is asked to do in one round."""

    site: str
    round: int
    task: str
    organs: list[int]
    step: int
    settings: dict[str, Any]
    weights: Tensors


@dataclass
class SiteResult:
    """What a site sent back: trained unique tensors and the trainer's metrics."""

    site: str
    round: int
    task: str
    weights: Tensors
    metrics: dict[str, Any]
    seconds: float = 0.0
