"""Adaptive Model Recalibration (AMR): fit DAHyper to one upload without moving the other tasks.

Plain torch. Per upload for task T (docs/METHOD.md has the derivations and the measurements):

* **Task never seen** → register a new embedding ``z_T ~ N(μ_z, σ²)`` and allocate it: its first weights
  are those of the registered task sharing most organs (organ-keyed head rows are reused per organ), so
  a site starting a new task starts from what the federation knows (the rule is
  :mod:`nnunet_feddah.method.donor`, shared with the ``fedavg-per-task-donor`` baseline).
* **One aggregation per task per round** (:meth:`AMR.update_round`, :mod:`.aggregate`): every upload of
  the task in the round started from the weights ``S`` that were sent, and their changes are combined in
  one step, weighted by training cases, independent of arrival order:
  ``W* = S + Σ_i c_i k_i (W_i − S)``. ``k_i = 1 − W_s`` for an upload from a *new source* of a task with
  history, ``k_i = 1`` for a site that contributed to the task's previous round (it continues its own
  training) and for a task's first fit. W_s (:func:`history_weight`) comes from the Jensen–Shannon divergence
  the uploading site measured between its predictions and those of the weights it received: an upload
  whose predictions moved little is taken whole, one that predicts something else (another organ's model
  under the task's key, a broken network) is held back by the task's history.
* **The federation's base** is the first round's consensus (case-weighted mean of its targets, head rows
  per organ), not one site's upload.
* **Exact while active** (``exact_residuals="active"``): after the generators are refitted, what they
  cannot express of ``W*`` is kept as the task's exact residual, so the weights sent next reproduce the
  round's aggregation; a task that gets no upload in a round is compressed once: its residual is
  quantised to ``idle_bits`` per weight (0: dropped), and what that loses is reported. ``"never"`` keeps
  only the generators, ``"always"`` never compresses.
* **Without generators** (``DAHyperConfig.generators=False``, FedDAH's default since 2026-12-07) there is
  nothing shared to refit: a task's residual is its whole delta from the base, and the rest of this list
  (aggregation, W_s, donor starts, the base, compression of idle tasks) applies unchanged.
* **Recalibration** (with generators) minimises ``L_hyper = L_task + β·L_R`` with
  ``L_task = ‖g_T(θ) − g*_T‖²`` and ``L_R = Σ_{t≠T} ‖g_t(θ) − g_t(θ_before)‖²`` over the generator
  outputs ``g`` (dense deltas, low-rank factors aligned by Procrustes, head rows), in two stages:
  stage 1 (:func:`~nnunet_feddah.method.recalibration.fit_codes`) trains ``z_T``, every projection ``E_l``, the
  encoder ``F`` and the organ embeddings by Adam with the generators held (exact and cheap through the
  Gram matrices ``GᵀG``); stage 2 (:func:`~nnunet_feddah.method.recalibration.refit_generator`) refits every generator ``G`` in closed form, which
  also puts the other tasks' outputs back where stage 1 moved them:
  ``ΔG = [(Y − GΦ)Φᵀ + β G(Φ_h⁰ − Φ_h)Φ_hᵀ] (ΦΦᵀ + βΦ_hΦ_hᵀ + λI)⁻¹``.
  The paper's plain Adam (lr 1e-3) on every parameter left 13× more fitting error at 50× the time
  (docs/measurements/method.md); it was removed on 2026-12-07, untested.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from nnunet_feddah.method.aggregate import (
    Contribution,
    case_weights,
    change_lost,
    combine,
    in_source_order,
    norm,
    organ_keyed_mean,
    relative_l2,
)
from nnunet_feddah.method.dahyper import DAHyper
from nnunet_feddah.method.donor import FittedTask, composed_embedding, donor_start
from nnunet_feddah.method.quantize import BITS, dequantize_all, quantize_all
from nnunet_feddah.method.recalibration import CodeFit, TasksBefore, fit_codes, generator_targets, refit_generator
from nnunet_feddah.method.similarity import HistoryWeight, history_weight

NEW_TASK_STARTS = ("donor", "composed")
EXACT_RESIDUALS = ("active", "never", "always")
SIMILARITIES = ("predictive", "weights", "fixed", "cases")


@dataclass(frozen=True)
class AMRConfig:
    beta: float = 1.0  # weight of the historical regulariser L_R (0 = ablation −L_R)
    ridge: float = 1e-6  # λ: proximal term that keeps the closed-form edit well posed
    code_steps: int = 40  # Adam steps of the first stage (codes, generators held; 0 = off)
    code_lr: float = 1e-3  # the paper's learning rate, for what all tasks share (E_l, F, organ embeddings)
    embedding_lr: float = 1e-2  # for the task's own embedding z_T (its entries are ~σ = 1, E's ~0.18)
    code_trust: float = 1.0  # weight of how far stage 1 moves the other tasks' codes (keeps them apart)
    # how W_s is found for an upload from a new source (docs/METHOD.md §6): "predictive" (the site's JS of its
    # predictions against the received weights'; fixed_similarity where a site sent none), "weights" (weight-value
    # histograms, the reading before 2026-12-02), "fixed" (ablation −W_s), "cases" (history counted as the
    # training cases behind it: case-weighted averaging)
    similarity: str = "predictive"
    fixed_similarity: float = 0.5
    ws_js_mid: float = 0.007  # predictive: the JS (bits per voxel) where W_s = 1/2, calibrated on labelled pairs
    ws_js_scale: float = 0.001  # predictive: W_s = σ((JS − ws_js_mid) / ws_js_scale)
    max_history_weight: float = 0.5  # weights: W_s = max_history_weight · (1 − JS)
    js_bins: int = 32
    exact_residuals: str = "active"  # keep what the generators miss while a task is trained ("never", "always")
    # bits per weight of an idle task's remainder (what the generators miss; without generators its whole delta
    # from the base); 0 drops it (the rank-r generators alone);
    # judged by held-out Dice against the exact model (docs/METHOD.md §5b)
    idle_bits: int = 4
    # where a new task starts (docs/METHOD.md): "donor" fits a copy of the most organ-sharing task; "composed"
    # generates it from the mean embedding of its organs' fitted tasks, jittered by composition_jitter·σ
    new_task_start: str = "donor"
    composition_jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.beta < 0 or self.ridge <= 0 or self.code_trust < 0:
            raise ValueError("AMRConfig: beta and code_trust must be ≥ 0 and ridge > 0")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"AMRConfig.similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.ws_js_mid <= 0 or self.ws_js_scale <= 0:
            raise ValueError("AMRConfig: ws_js_mid and ws_js_scale must be > 0")
        if self.new_task_start not in NEW_TASK_STARTS:
            raise ValueError(f"AMRConfig.new_task_start must be one of {NEW_TASK_STARTS}, got {self.new_task_start!r}")
        if self.composition_jitter < 0:
            raise ValueError("AMRConfig.composition_jitter must be ≥ 0")
        if self.exact_residuals not in EXACT_RESIDUALS:
            raise ValueError(f"AMRConfig.exact_residuals must be one of {EXACT_RESIDUALS}, "
                             f"got {self.exact_residuals!r}")
        if self.idle_bits not in (0, *BITS):
            raise ValueError(f"AMRConfig.idle_bits must be 0 (drop) or one of {BITS}, got {self.idle_bits!r}")
        if not 0 <= self.max_history_weight <= 1 or not 0 <= self.fixed_similarity <= 1:
            raise ValueError("AMRConfig: history weights must lie in [0, 1]")


@dataclass
class AMRReport:
    """What one update did for one upload (or an allocation); every number is measured, not configured."""

    task: str
    new_task: bool
    rebased: bool
    similarity: float | None  # W_s (None: the upload's change is kept whole, k = 1)
    js_divergence: float | None  # the divergence W_s was computed from (``ws_measure`` says which)
    loss_task_before: float
    loss_task_after: float
    loss_reg_after: float
    steps: int
    seconds: float
    fidelity_rel_l2: float  # ‖generated − W*‖ / ‖W*‖ after the update: whole-vector, looks tiny whatever is lost
    upload_rel_l2: float  # generated after update vs the raw upload
    drift: dict[str, float] = field(default_factory=dict)  # task not in this round -> relative L2 change
    source: str | None = None
    case_weight: float = 1.0  # c_i: the upload's share of the round's training cases for the task
    keep: float = 1.0  # k_i: share of the upload's change the aggregation keeps on purpose (1 − W_s or 1)
    contributions: int = 1  # uploads of the task combined in this round
    update_lost: float = 0.0  # ‖generated − W*‖ / ‖W* − sent‖: what the round's aggregated update lost
    generator_lost: float = 0.0  # the same for the generators alone (the residual dropped)
    predictive_js: float | None = None  # what the site measured on its validation cases
    ws_measure: str | None = None  # what W_s came from: "predictive", "weights", "fixed", "cases" (None: no W_s)
    shared_explained: float | None = None  # share of the task's generator-output error stage 1 explained
    delta_carried: float | None = None  # 1 − ‖generators alone − W*‖ / ‖W* − base‖ (None: W* is the base)

    #: What a round's history keeps of a report (the losses, step counts and diagnostics of the fit stay in
    #: the in-memory report, for the benchmarks that read them).
    RECORDED = ("seconds", "similarity", "fidelity_rel_l2", "upload_rel_l2", "rebased", "drift", "update_lost",
                "generator_lost", "case_weight", "keep", "contributions", "js_divergence", "predictive_js",
                "ws_measure")

    def to_json(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """The part of the report a round's history keeps."""
        return {k: v for k, v in asdict(self).items() if k in self.RECORDED}


def _carried(base: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
             generators_alone: Mapping[str, torch.Tensor]) -> float | None:
    """How much of the task's own delta ``W* − base`` the generators hold without the exact residual."""
    if norm({k: v.double() - base[k].double() for k, v in target.items() if v.is_floating_point()}) <= 1e-9 * norm(target):
        return None
    return 1.0 - change_lost(base, target, generators_alone)


def _on_cpu(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v for k, v in weights.items()}


class AMR:
    """The coordinator's update rule around one :class:`DAHyper`."""

    def __init__(self, hyper: DAHyper, config: AMRConfig | None = None) -> None:
        self.hyper = hyper
        self.config = config or AMRConfig()
        if self.config.new_task_start == "composed" and not hyper.config.generators:
            raise ValueError("AMRConfig.new_task_start='composed' generates a task from its organs' embeddings and "
                             "needs DAHyperConfig.generators=True")
        if self.config.exact_residuals == "never" and not hyper.config.generators:
            raise ValueError("AMRConfig.exact_residuals='never' keeps the generators alone; without generators "
                             "every task is held by its residual ('active' or 'always')")
        self.compressed: list[dict] = []  # tasks compressed by the last update_round, with what it cost

    # ------------------------------------------------------------------ allocation of new tasks
    def allocate(self, key: str, organs: Sequence[int], round_index: int | None = None) -> AMRReport:
        """Register a task and give it a starting point (``new_task_start``): a fitted copy of the most
        organ-sharing task (head rows per organ), or what the hypernetwork generates for a composed embedding."""
        start = time.perf_counter()
        hyper = self.hyper
        record = hyper.register(key, organs, round_index)
        fitted = self.fitted_tasks(exclude=key)
        if self.config.new_task_start == "composed":
            composed = composed_embedding(record.organs, fitted, hyper.embeddings)
            if composed is not None:  # the drawn z − μ becomes the jitter that keeps its code apart
                drawn = hyper.embeddings[key] - hyper.config.embedding_mean
                hyper.embeddings[key] = composed + self.config.composition_jitter * drawn
            return self._allocation_report(key, 0.0, 0, start, {}, {})
        allocation = donor_start(record.organs, fitted, hyper.generate, hyper.base,
                                 [u.name for u in hyper.units if u.kind == "head"])
        if allocation is None:  # nothing learned yet: the new task generates the base (G is still zero)
            return self._allocation_report(key, 0.0, 0, start, {}, {})
        _, target = allocation
        return self._fit_allocation(key, target, start)

    def fitted_tasks(self, exclude: str | None = None) -> list[FittedTask]:
        """The tasks a new one may start from (an upload was fitted), in registration order."""
        return [FittedTask(t.key, tuple(t.organs), max(t.rounds_seen)) for t in self.hyper.tasks.values()
                if t.key != exclude and t.rounds_seen]

    # ------------------------------------------------------------------ recalibration
    def update(self, key: str, upload: Mapping[str, torch.Tensor], *, round_index: int | None = None,
               source: str | None = None, num_training_cases: int = 1,
               predictive_js: float | None = None) -> AMRReport:
        """One upload as its task's whole round (:meth:`update_round` with a single contribution)."""
        contribution = Contribution(source or "unknown", upload, num_training_cases, predictive_js)
        return self.update_round({key: [contribution]}, round_index)[key][0]

    def update_round(self, contributions: Mapping[str, Sequence[Contribution]],
                     round_index: int | None = None) -> dict[str, list[AMRReport]]:
        """Fold one round's uploads in: one aggregation and one fit per task, independent of arrival order.

        Returns, per task, one report per contribution in the order given. Every upload is checked before
        anything changes; tasks are fitted in key order, contributions combined in source order, so the
        same uploads in any order give bit-identical states.
        """
        start = time.perf_counter()
        hyper = self.hyper
        rounds: dict[str, list[Contribution]] = {}
        for key in sorted(contributions):
            if key not in hyper.tasks:
                raise KeyError(f"task {key!r} is not registered; allocate it before updating")
            for c in contributions[key]:
                hyper.check_target(key, c.weights, source=f"upload from {c.source}")
            rounds[key] = [replace(c, weights=_on_cpu(c.weights)) for c in in_source_order(contributions[key])]
        sent = {key: hyper.generate(key) for key in rounds}
        aggregations = {key: self._aggregate(key, group, sent[key]) for key, group in rounds.items()}
        targets = {key: a[0] for key, a in aggregations.items()}
        # without generators nothing shared is refitted, so no other task can move: nothing to measure (O(1))
        before = TasksBefore(hyper, [t for t in hyper.tasks if t not in rounds] if hyper.config.generators else [])
        loss_before = {key: relative_l2(sent[key], targets[key]) ** 2 for key in rounds}
        rebased = not hyper.has_base_fit
        if rebased:
            self._rebase(targets, {key: sum(c.num_training_cases for c in group) for key, group in rounds.items()})
        solved = {key: self._solve(key, targets[key]) for key in rounds}
        for key in rounds:
            self._keep_residual(key, targets[key])
        drift = before.drift()
        self._bookkeep(rounds, round_index)
        self.compressed = (self._compress_idle(set(rounds), round_index)
                           if self.config.exact_residuals == "active" else [])
        seconds = time.perf_counter() - start
        reports: dict[str, list[AMRReport]] = {}
        for key, group in rounds.items():
            target, keeps, history_weights = aggregations[key]
            generated = hyper.generate(key)
            generators_alone = hyper.generate(key, with_residual=False)
            common = dict(task=key, new_task=False, rebased=rebased, loss_task_before=loss_before[key],
                          loss_task_after=relative_l2(generated, target) ** 2,
                          loss_reg_after=sum(d ** 2 for d in drift.values()), steps=solved[key][0],
                          shared_explained=solved[key][1], seconds=seconds,
                          fidelity_rel_l2=relative_l2(generated, target), drift=drift, contributions=len(group),
                          update_lost=change_lost(sent[key], target, generated),
                          generator_lost=change_lost(sent[key], target, generators_alone),
                          delta_carried=_carried(hyper.base_view(key), target, generators_alone))
            by_source = {c.source: AMRReport(**common, source=c.source, case_weight=w, keep=k,
                                             similarity=None if ws is None else ws.value,
                                             js_divergence=None if ws is None else ws.divergence,
                                             ws_measure=None if ws is None else ws.measure,
                                             upload_rel_l2=relative_l2(generated, c.weights),
                                             predictive_js=c.predictive_js)
                         for c, w, k, ws in zip(group, case_weights(group), keeps, history_weights, strict=True)}
            reports[key] = [by_source[c.source] for c in contributions[key]]
        return reports

    def _aggregate(self, key: str, group: Sequence[Contribution], sent: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], list[float], list[HistoryWeight | None]]:
        """The task's target ``W*`` and, per contribution, k_i and the W_s behind it (None: kept whole)."""
        record = self.hyper.tasks[key]
        continuing = set(record.last_contributors or record.contributors[-1:])
        sources = {c.source for c in group}
        new_sources = {s for s in sources if record.rounds_seen and s not in continuing}
        # "cases": the history stands for the training cases of its sources that are not in this round
        history_cases = sum(n for source, n in record.training_cases.items() if source not in sources)
        round_cases = sum(max(c.num_training_cases, 1) for c in group if c.source in new_sources)
        weights = [history_weight(self.config, sent, c, history_cases, round_cases) if c.source in new_sources
                   else None for c in group]
        keeps = [1.0 if w is None else 1.0 - w.value for w in weights]
        return combine(sent, group, keeps), keeps, weights

    def _rebase(self, targets: Mapping[str, Mapping[str, torch.Tensor]], cases: Mapping[str, int]) -> None:
        """The federation's first fitted round becomes the shared base: the case-weighted mean of its task
        targets (head rows per organ over the tasks that have it), so no site's model is privileged."""
        hyper = self.hyper
        heads = {u.name for u in hyper.units if u.kind == "head"}
        organ_keyed_mean(hyper.base, [(targets[k], hyper.tasks[k].output_slots, cases[k]) for k in targets],
                         heads.__contains__)
        hyper.has_base_fit = True

    def _solve(self, key: str, target: Mapping[str, torch.Tensor]) -> tuple[int, float | None]:
        """Refit the hypernetwork to ``target`` under ``β·L_R``: optimiser steps, and the share of the task's
        generator-output error its first stage explained with generators learned before."""
        if not self.hyper.config.generators:  # a plain store: the task's residual holds all of it
            return 0, None
        others = [t for t in self.hyper.tasks if t != key]
        fit = self._solve_closed_form(key, target, others)
        return fit.steps + 1, fit.explained

    def _keep_residual(self, key: str, target: Mapping[str, torch.Tensor]) -> None:
        """Store what the generators miss of ``target`` (unless ``exact_residuals="never"``)."""
        if self.config.exact_residuals == "never":
            return
        generated = self.hyper.generate(key, with_residual=False)
        self.hyper.residuals[key] = {k: target[k] - v for k, v in generated.items() if v.is_floating_point()}
        self.hyper.idle.pop(key, None)  # active again: the exact residual replaces the quantised one

    def _compress_idle(self, trained: set[str], round_index: int | None) -> list[dict]:
        """Quantise (or drop) the residual of every task without an upload this round; what each costs."""
        hyper, bits = self.hyper, self.config.idle_bits
        events = []
        for key in sorted(set(hyper.residuals) - trained):
            exact = hyper.generate(key)
            residual = hyper.residuals.pop(key)
            if bits:
                hyper.idle[key] = quantize_all(residual, bits)
            kept = dequantize_all(hyper.idle[key]) if bits else {}
            lost = norm({k: v - kept[k] if k in kept else v for k, v in residual.items()})
            base = hyper.base_view(key)
            events.append({"task": key, "round": round_index, "bits": bits,
                           "lost_of_delta": lost / max(norm({k: exact[k] - v for k, v in base.items()
                                                             if v.is_floating_point()}), 1e-30),
                           "lost_of_weights": lost / max(norm(exact), 1e-30)})
        return events

    def _bookkeep(self, rounds: Mapping[str, Sequence[Contribution]], round_index: int | None) -> None:
        for key, group in rounds.items():
            record = self.hyper.tasks[key]
            if round_index is not None:
                record.rounds_seen.append(round_index)
                if record.first_round is None:
                    record.first_round = round_index
            record.contributors.extend(c.source for c in group)
            record.last_contributors = [c.source for c in group]
            record.training_cases.update({c.source: max(int(c.num_training_cases), 1) for c in group})

    def _fit_allocation(self, key: str, target: Mapping[str, torch.Tensor], start: float) -> AMRReport:
        """Fit a new task's generators to its start weights (kept exact while it is active)."""
        hyper = self.hyper
        before = TasksBefore(hyper, [t for t in hyper.tasks if t != key])
        loss_before = relative_l2(hyper.generate(key), target) ** 2
        steps, _ = self._solve(key, target)
        self._keep_residual(key, target)
        return self._allocation_report(key, loss_before, steps, start, target, before.drift())

    def _solve_closed_form(self, key: str, target: Mapping[str, torch.Tensor], others: list[str]) -> CodeFit:
        """Stage 1 (:func:`fit_codes`: Adam on the codes, generators held), then stage 2 (:func:`refit_generator`)."""
        hyper, cfg = self.hyper, self.config
        wanted = generator_targets(hyper, key, target)
        held_before, _ = hyper.generator_inputs(others) if others else ({}, {})
        fit = fit_codes(hyper, key, wanted, beta=cfg.beta, trust=cfg.code_trust, steps=cfg.code_steps,
                        lr=cfg.code_lr, embedding_lr=cfg.embedding_lr)
        inputs, _ = hyper.generator_inputs([key, *others])
        for param, wanted_output in wanted.items():
            columns = wanted_output.shape[1]
            now = inputs[param]
            hyper.params[param] = refit_generator(hyper.params[param], now[:, :columns], wanted_output,
                                                  held_before.get(param, now[:, :0]), now[:, columns:],
                                                  beta=cfg.beta, ridge=cfg.ridge)
        return fit

    def _allocation_report(self, key: str, loss_before: float, steps: int, start: float,
                           target: Mapping[str, torch.Tensor],
                           drift: Mapping[str, float]) -> AMRReport:
        hyper = self.hyper
        generated = hyper.generate(key)
        fidelity = relative_l2(generated, target) if target else 0.0
        return AMRReport(
            task=key, new_task=True, rebased=False, similarity=None, js_divergence=None,
            loss_task_before=loss_before, loss_task_after=fidelity ** 2, loss_reg_after=sum(d ** 2 for d in drift.values()),
            steps=steps, seconds=time.perf_counter() - start, fidelity_rel_l2=fidelity,
            upload_rel_l2=fidelity, drift=dict(drift), source=None)
