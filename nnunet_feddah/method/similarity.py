"""W_s: how much of a new source's change a task's history holds back, and the divergences it can come from.

Plain torch. :func:`history_weight` maps what an upload brings — the Jensen–Shannon divergence its site measured
between its predictions and the received weights' (the default), or a weight-histogram JS, a fixed value or the
training cases behind the history — to ``W_s``; AMR keeps ``1 − W_s`` of the upload's change
(docs/METHOD.md §6 has the calibration and the measurements).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from nnunet_feddah.method.aggregate import Contribution


class WsSettings(Protocol):
    """The settings W_s reads (:class:`~nnunet_feddah.method.amr.AMRConfig` has them all)."""

    similarity: str
    fixed_similarity: float
    ws_js_mid: float
    ws_js_scale: float
    max_history_weight: float
    js_bins: int


@dataclass(frozen=True)
class HistoryWeight:
    """W_s for one upload: the share of its change the task's history holds back, and what it came from."""

    value: float
    divergence: float | None  # the JS it was computed from ("predictive": the site's; "weights": histograms)
    measure: str  # "predictive" | "weights" | "fixed" | "cases"


def history_weight(config: WsSettings, history: Mapping[str, torch.Tensor], upload: Contribution,
                   history_cases: int = 0, round_cases: int = 1) -> HistoryWeight:
    """W_s for an upload from a new source of a task with history (its change is kept with ``k = 1 − W_s``).

    * ``predictive`` — ``W_s = σ((JS − ws_js_mid) / ws_js_scale)`` of the JS the site measured between its
      trained network's softmax and the received one's on its validation cases (all voxels, bits): a healthy
      round at a new site moves the predictions by 0.001–0.006 bits per voxel on the phantom, another organ's
      model or an untrained network by ≥ 0.008 (docs/METHOD.md §6), so the first is taken (nearly) whole and
      the second held back. A site that reported no JS (or a non-finite one) gets ``fixed_similarity`` (the weight histograms
      point the other way: they rate an unrelated network as *more* similar than a healthy round).
    * ``weights`` — ``max_history_weight · (1 − JS)`` of weight-value histograms (blind to what a network
      computes; kept as the comparison).
    * ``fixed`` — ``fixed_similarity`` (ablation −W_s).
    * ``cases`` — ``history_cases / (history_cases + round_cases)``: the history counts as the training cases
      behind it, i.e. FedAvg over the task's sites across time (the case-weighted averaging baseline).
    """
    reported = upload.predictive_js
    if reported is not None and not (isinstance(reported, (int, float)) and math.isfinite(reported)):
        reported = None  # a NaN/Inf claim carries no evidence: weigh it as a site that reported nothing
    if config.similarity == "fixed" or (config.similarity == "predictive" and reported is None):
        return HistoryWeight(config.fixed_similarity, reported, "fixed")
    if config.similarity == "cases":
        return HistoryWeight(history_cases / max(history_cases + round_cases, 1), reported, "cases")
    if config.similarity == "predictive":
        js = float(reported)
        return HistoryWeight(_sigmoid((js - config.ws_js_mid) / config.ws_js_scale), js, "predictive")
    js = js_divergence(history, upload.weights, config.js_bins)
    return HistoryWeight(config.max_history_weight * (1.0 - js), js, "weights")


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def js_divergence(history: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor],
                  bins: int = 32, min_numel: int = 64) -> float:
    """Mean per-tensor Jensen–Shannon divergence (bits, 0..1) of weight-value distributions.

    Bins are the history's own quantiles, so the history is uniform over them and any shift, spread or
    shape change of the candidate shows up (fixed-width bins over millions of near-zero weights would not
    discriminate). Tensors with fewer than ``min_numel`` values carry no distribution and are skipped.
    """
    scores = []
    for name, hist in history.items():
        if not hist.is_floating_point() or hist.numel() < min_numel:
            continue
        h = hist.detach().flatten().double()
        c = candidate[name].detach().flatten().double()
        edges = torch.quantile(h[torch.randperm(h.numel(), generator=torch.Generator().manual_seed(0))[:100_000]],
                               torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
        p = torch.bincount(torch.bucketize(h, edges), minlength=bins).double() / h.numel()
        q = torch.bincount(torch.bucketize(c, edges), minlength=bins).double() / c.numel()
        scores.append(0.5 * _kl_bits(p, 0.5 * (p + q)) + 0.5 * _kl_bits(q, 0.5 * (p + q)))
    return float(sum(scores) / len(scores)) if scores else 0.0


def _kl_bits(x: torch.Tensor, m: torch.Tensor) -> float:
    mask = x > 0
    return float((x[mask] * torch.log2(x[mask] / m[mask])).sum())
