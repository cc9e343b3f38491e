"""Strategy names, older spellings, the paper's ablations, and how a strategy is made and loaded by name.

A new strategy is one :class:`~nnunet_feddah.method.strategy.Strategy` subclass plus one line in
:data:`STRATEGY_CLASSES`. An ablation is FedDAH with one switch forced (it may still take the other
parameters). The federation plan reader checks names against :data:`STRATEGIES`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nnunet_feddah.method.fedavg import (
    DonorPerTaskFedAvgStrategy,
    FedAvgStrategy,
    LocalStrategy,
    PerTaskFedAvgStrategy,
)
from nnunet_feddah.method.feddah import FedDAHStrategy
from nnunet_feddah.method.hypernet_file import FORMAT as HYPERNET_FORMAT
from nnunet_feddah.method.strategy import IsHead, Strategy, StrategyFileError, read_strategy_metadata

STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "feddah": FedDAHStrategy,
    "fedavg": FedAvgStrategy,
    "fedavg-per-task": PerTaskFedAvgStrategy,
    "fedavg-per-task-donor": DonorPerTaskFedAvgStrategy,
    "local": LocalStrategy,
}
FEDDAH_ABLATIONS: dict[str, dict[str, Any]] = {
    # FedDAH holds every task as the base plus its own remainder (docs/METHOD.md §0): the hypernetwork's
    # generators, and with them L_R, the encoder and composed starts, are what these variants switch back on
    "feddah-hypernet": {"generators": True},  # the paper's generators (rank-r, refitted under β·L_R)
    "feddah-noLR": {"generators": True, "beta": 0.0},  # the generators without the historical regulariser
    "feddah-noWs": {"similarity": "fixed"},  # W_s fixed instead of the JS similarity
    "feddah-wsCases": {"similarity": "cases"},  # W_s from training cases: case-weighted averaging across time
    "feddah-wsWeights": {"similarity": "weights"},  # W_s from weight histograms (the reading before 2026-12-02)
    "feddah-noencoder": {"generators": True, "layer_encoder": False},  # generators, no inter-layer encoder
    # new tasks generated from their organs' embeddings (needs the generators), with and without the encoder
    "feddah-composed": {"generators": True, "new_task_start": "composed"},
    "feddah-composed-noencoder": {"generators": True, "new_task_start": "composed", "layer_encoder": False},
    # an idle task keeps only what the rank-r generators hold (the rule before 2026-12-07): in function the
    # plain per-task rank-r store (docs/METHOD.md §5b)
    "feddah-idleLowrank": {"generators": True, "idle_bits": 0},
}
STRATEGIES = ("feddah", *FEDDAH_ABLATIONS, *(n for n in STRATEGY_CLASSES if n != "feddah"))


def make_strategy(name: str, params: Mapping[str, Any], base: Mapping[str, torch.Tensor], is_head: IsHead) -> Strategy:
    """A fresh strategy from a plan's ``strategy`` section and the network's initial organ-slot weights."""
    if name in FEDDAH_ABLATIONS:
        name, params = "feddah", {**params, **FEDDAH_ABLATIONS[name]}
    if name not in STRATEGY_CLASSES:
        raise ValueError(f"strategy.name: unknown strategy {name!r}; known: {list(STRATEGIES)}")
    return STRATEGY_CLASSES[name].create(base, is_head, params)


def saved_strategy_name(path: os.PathLike | str) -> str:
    """Which strategy wrote a strategy file (a DAHyper checkpoint says so in its ``extra``)."""
    meta = read_strategy_metadata(path)
    if meta.get("format") == HYPERNET_FORMAT:
        return json.loads(meta["info"]).get("extra", {}).get("strategy", FedDAHStrategy.name)
    return meta.get("strategy", "")


def load_strategy(path: os.PathLike | str, fingerprint: str, is_head: IsHead) -> Strategy:
    """The strategy saved in ``path`` by whichever class wrote it; refused for another architecture."""
    name = saved_strategy_name(path)
    if name not in STRATEGY_CLASSES:
        raise StrategyFileError(f"{Path(path)}: field 'strategy' is {name!r}, not one of {list(STRATEGY_CLASSES)}; "
                                f"not a strategy file of this version")
    return STRATEGY_CLASSES[name].load(path, fingerprint, is_head)
