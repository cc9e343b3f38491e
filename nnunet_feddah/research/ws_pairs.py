"""Does the similarity behind W_s tell a healthy upload of a task from one that is not? Labelled model pairs.

W_s is only worth trusting if the divergence it is computed from orders candidates sensibly. This builds
labelled (history, candidate) pairs from a finished benchmark run of ``feddah`` and scores each with

* ``predictive_js`` — the site-side measure (:func:`nnunet_feddah.nnunet.validation.predictive_js`): mean
  per-voxel JS divergence of the two networks' softmax outputs on the candidate site's held-out cases,
  over the voxels either network or the reference calls foreground (and over all voxels);
* ``weight_js`` — the server-side weight-histogram JS (:func:`nnunet_feddah.method.similarity.js_divergence`)
  that W_s used until 2026-12-02;
* ``w_s`` — the history weight AMR's default map (:func:`nnunet_feddah.method.similarity.history_weight`) gives
  the all-voxel predictive JS;

and with the Dice drop that accepting the candidate whole would cause on the held-out cases of the sites
that trained the task before (the harm W_s exists to prevent).

Pairs (``healthy`` = a real upload of the task trained from what it was sent):

* ``continuing`` / ``new site`` — every accepted upload of a task that already had history, with the
  weights it was sent (replayed from the run's state and replay store): healthy;
* ``other organ`` — the final model of another single-organ task sent under the task's key: not healthy;
* ``untrained`` — a network at nnU-Net's initialisation sent under the task's key: not healthy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.coordinator import Coordinator
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.method.aggregate import Contribution
from nnunet_feddah.method.amr import AMRConfig
from nnunet_feddah.method.similarity import history_weight, js_divergence
from nnunet_feddah.nnunet.network import is_head
from nnunet_feddah.nnunet.weights import load_weights
from nnunet_feddah.organs import Task

Tensors = dict[str, torch.Tensor]
MEASURES = ("predictive_js", "predictive_js_all", "weight_js", "w_s")


@dataclass
class Pair:
    """A candidate model for ``task`` against the task's history, labelled."""

    kind: str
    healthy: bool
    task: str
    site: str  # the candidate's site: the JS is measured on its held-out cases
    earlier: list[str]  # sites that trained the task before the candidate (whose Dice it could lower)
    history: Tensors = field(repr=False)
    candidate: Tensors = field(repr=False)
    round: int | None = None


def upload_pairs(plan: FederationPlan, work: Path, strategy: str = "feddah") -> list[Pair]:
    """Every accepted upload of a task with history in the run of ``strategy``, with the weights it was sent."""
    from nnunet_feddah.results.replay import job_key

    state = work / "states" / strategy
    committed = checkpoint.require_committed(state)
    history = committed.history
    contributors: dict[str, list[list[str]]] = {}  # task -> sites per fitted round
    pairs: list[Pair] = []
    for entry in history:
        round_index = entry["round"]
        accepted = {s: line for s, line in entry["sites"].items() if line["status"] == "accepted"}
        if round_index > 1:
            previous = checkpoint.load_strategy(checkpoint.snapshot_path(state, round_index - 1), committed.fingerprint,
                                                is_head)
            coordinator = Coordinator(plan, state, previous, committed.fingerprint, log=lambda *_: None)
            jobs = coordinator.jobs(round_index)
            for site, line in sorted(accepted.items()):
                rounds_before = contributors.get(line["task"], [])
                if not rounds_before:
                    continue  # a task's first fit: no history to weigh
                key = job_key(jobs[site])
                upload, _ = load_weights(work / "replay" / f"{key}.safetensors")
                kind = "continuing" if site in rounds_before[-1] else "new site"
                earlier = sorted({s for r in rounds_before for s in r})
                pairs.append(Pair(kind, True, line["task"], site, earlier, jobs[site].weights, upload, round_index))
        for task in {line["task"] for line in accepted.values()}:
            contributors.setdefault(task, []).append(sorted(s for s, line in accepted.items() if line["task"] == task))
    return pairs


def unhealthy_pairs(plan: FederationPlan, work: Path, base: Mapping[str, torch.Tensor],
                    strategy: str = "feddah") -> list[Pair]:
    """Another single-organ task's final model, and an untrained network, under each task's key."""
    committed = checkpoint.require_committed(work / "states" / strategy)
    final = committed.load_strategy(is_head)
    trained = final.tasks()
    sites_of = {task: sorted({s for h in committed.history for s, line in h["sites"].items()
                              if line["status"] == "accepted" and line["task"] == task}) for task in trained}
    pairs: list[Pair] = []
    for task, organs in sorted(trained.items()):
        history = final.task_weights(task)
        site = sites_of[task][-1]
        for other, other_organs in sorted(trained.items()):
            if other != task and len(other_organs) == len(organs):
                pairs.append(Pair("other organ", False, task, site, sites_of[task], history, final.task_weights(other)))
        slots = [0, *organs]
        untrained = {k: (v[slots].clone() if is_head(k) else v.clone()) for k, v in base.items()}
        pairs.append(Pair("untrained", False, task, site, sites_of[task], history, untrained))
    return pairs


def score_pairs(plan: FederationPlan, pairs: Sequence[Pair], device: str = "cpu",
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per pair: predictive JS on the candidate site's held-out cases, weight JS, and the Dice drop that
    accepting the candidate would cause on the earlier contributors' held-out cases."""
    from nnunet_feddah.nnunet.validation import predictive_js
    from nnunet_feddah.results.evaluate import evaluate_task, load_test_set
    from nnunet_feddah.results.inference import TaskModel

    test_sets: dict[str, Any] = {}
    config = AMRConfig()

    def test_set(site: str):
        if site not in test_sets:
            test_sets[site] = load_test_set(plan, site, log=lambda *_: None)
        return test_sets[site]

    rows = []
    for i, pair in enumerate(pairs):
        task = Task.parse(pair.task)
        models = {name: TaskModel.from_weights(test_set(pair.site).shared, weights, task.labels, name,
                                               torch.device(device))
                  for name, weights in (("history", pair.history), ("candidate", pair.candidate))}
        foreground, every = [], []
        ts = test_set(pair.site)
        slots = [0, *task.labels]
        for image in ts.images.values():
            logits = {n: m.logits(image)[slots] for n, m in models.items()}
            region = (logits["history"].argmax(0) > 0) | (logits["candidate"].argmax(0) > 0)
            foreground.append(predictive_js(logits["candidate"], logits["history"], region))
            every.append(predictive_js(logits["candidate"], logits["history"]))
        drops = []
        for site in pair.earlier:
            earlier_set = test_set(site)
            if not earlier_set.can_evaluate(task):
                continue
            earlier_models = {n: TaskModel.from_weights(earlier_set.shared, w, task.labels, n, torch.device(device))
                              for n, w in (("history", pair.history), ("candidate", pair.candidate))}
            dice = {n: evaluate_task(earlier_set, m)["dice"] for n, m in earlier_models.items()}
            drops.append(dice["history"] - dice["candidate"])
        every_js = float(np.mean(every))
        row = {"kind": pair.kind, "healthy": pair.healthy, "task": pair.task, "site": pair.site, "round": pair.round,
               "earlier": pair.earlier, "predictive_js": float(np.mean(foreground)), "predictive_js_all": every_js,
               "weight_js": js_divergence(pair.history, pair.candidate),
               "w_s": history_weight(config, pair.history, Contribution(pair.site, {}, 1, every_js)).value,
               "dice_drop": float(np.mean(drops)) if drops else None}
        rows.append(row)
        log(f"[ws] {i + 1}/{len(pairs)} {pair.kind:<11} {pair.task:<9} at {pair.site}: predictive JS "
            f"{row['predictive_js']:.4f} (all {row['predictive_js_all']:.4f}), weight JS {row['weight_js']:.4f}, "
            f"Dice drop on earlier sites {row['dice_drop'] if row['dice_drop'] is None else round(row['dice_drop'], 3)}")
    return rows


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Probability that a random positive scores higher than a random negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        raise ValueError("AUROC needs at least one positive and one negative")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """AUROC of "not healthy" vs "healthy" for each divergence (higher = less healthy), and their rank
    correlation with the Dice drop."""
    unhealthy = [not r["healthy"] for r in rows]
    with_drop = [r for r in rows if r["dice_drop"] is not None]
    out: dict[str, Any] = {"pairs": len(rows), "healthy": sum(r["healthy"] for r in rows)}
    for measure in MEASURES:
        out[measure] = {"auroc": auroc([r[measure] for r in rows], unhealthy),
                        "spearman_with_dice_drop": spearman([r[measure] for r in with_drop],
                                                            [r["dice_drop"] for r in with_drop]),
                        "healthy_max": max(r[measure] for r in rows if r["healthy"]),
                        "unhealthy_min": min(r[measure] for r in rows if not r["healthy"])}
    new_site = [r["predictive_js_all"] for r in rows if r["kind"] == "new site"]
    if new_site:  # W_s's midpoint: halfway between the healthy new-site uploads and the nearest unhealthy model
        out["suggested_ws_js_mid"] = 0.5 * (max(new_site) + out["predictive_js_all"]["unhealthy_min"])
    return out


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> Path:
    from nnunet_feddah.atomic import atomic_write_json

    atomic_write_json(path, {"summary": summary, "pairs": list(rows)})
    return path


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["pairs"]
