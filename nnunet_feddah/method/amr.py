"""Adaptive Model Recalibration (AMR): fit DAHyper to one upload without moving the other tasks.

Plain torch. Per upload for task T (docs/METHOD.md has the derivations and the measurements):

* **Task never seen** → register a new embedding ``z_T ~ N(μ_z, σ²)`` and allocate it: its first weights
  are those of the registered task sharing most organs (organ-keyed head rows are reused per organ), so
  a site starting a new task starts from what the federation knows (the rule is
  :mod:`nnunet_feddah.method.donor`, shared with the ``fedavg-per-task-donor`` baseline).
* **Task already registered, upload from a new source** (another site, or a later time step) → W_s from
  a Jensen–Shannon divergence between the task's historical weights and the upload; the target is
  ``W* = W_s·W_hist + (1 − W_s)·W_up`` (similar → more weight on history). Consecutive rounds of the same
  site on the same task continue that site's training and take the upload as it is.
* **Recalibration** minimises ``L_hyper = L_task + β·L_R`` with
  ``L_task = ‖g_T(θ) − g*_T‖²`` and ``L_R = Σ_{t≠T} ‖g_t(θ) − g_t(θ_before)‖²`` over the generator
  outputs ``g`` (dense deltas, low-rank factors, head rows). Because stage 2 is linear in its weights
  ``G`` for fixed codes, the minimiser of ``L_hyper + λ‖ΔG‖²`` over ``G`` is closed-form:
  ``ΔG = E Φᵀ (ΦΦᵀ + λI + β Φ_old Φ_oldᵀ)⁻¹`` (E: residuals of task T, Φ: its codes, Φ_old: codes of all
  other tasks). ``solver="adam"`` instead runs the paper's Adam (lr 1e-3) on every parameter and the
  embedding; it is kept as the ablation that justifies the closed form.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from nnunet_feddah.method.dahyper import DAHyper
from nnunet_feddah.method.donor import FittedTask, donor_start

SOLVERS = ("closed_form", "adam")


@dataclass(frozen=True)
class AMRConfig:
    beta: float = 1.0  # weight of the historical regulariser L_R (0 = ablation −L_R)
    ridge: float = 1e-6  # λ: proximal term that keeps the closed-form edit well posed
    solver: str = "closed_form"
    adam_steps: int = 100
    adam_lr: float = 1e-3
    similarity: str = "js"  # "js" or "fixed" (ablation −W_s)
    fixed_similarity: float = 0.5
    max_history_weight: float = 0.5  # W_s = max_history_weight · (1 − JS)
    js_bins: int = 32

    def __post_init__(self) -> None:
        if self.beta < 0 or self.ridge <= 0:
            raise ValueError("AMRConfig: beta must be ≥ 0 and ridge > 0")
        if self.solver not in SOLVERS:
            raise ValueError(f"AMRConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.similarity not in ("js", "fixed"):
            raise ValueError(f"AMRConfig.similarity must be 'js' or 'fixed', got {self.similarity!r}")
        if not 0 <= self.max_history_weight <= 1 or not 0 <= self.fixed_similarity <= 1:
            raise ValueError("AMRConfig: history weights must lie in [0, 1]")


@dataclass
class AMRReport:
    """What one update did; every number is measured, not configured."""

    task: str
    new_task: bool
    rebased: bool
    similarity: float | None  # W_s (None: upload used as it is)
    js_divergence: float | None
    loss_task_before: float
    loss_task_after: float
    loss_reg_after: float
    steps: int
    seconds: float
    fidelity_rel_l2: float  # generated after update vs the target W*
    upload_rel_l2: float  # generated after update vs the raw upload
    drift: dict[str, float] = field(default_factory=dict)  # other task -> relative L2 change

    def to_json(self) -> dict:
        return asdict(self)


def relative_l2(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all floating tensors of ``b``."""
    # differences in the tensors' own precision, sums accumulated in float64: half the time of all-float64
    num = sum(float((a[k] - v).pow(2).sum(dtype=torch.float64)) for k, v in b.items() if v.is_floating_point())
    den = sum(float(v.pow(2).sum(dtype=torch.float64)) for v in b.values() if v.is_floating_point())
    return (num / max(den, 1e-30)) ** 0.5


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


class AMR:
    """The coordinator's update rule around one :class:`DAHyper`."""

    def __init__(self, hyper: DAHyper, config: AMRConfig | None = None) -> None:
        self.hyper = hyper
        self.config = config or AMRConfig()

    # ------------------------------------------------------------------ allocation of new tasks
    def allocate(self, key: str, organs: Sequence[int], round_index: int | None = None) -> AMRReport:
        """Register a task and give it a starting point: the most organ-sharing task, rows per organ."""
        start = time.perf_counter()
        hyper = self.hyper
        record = hyper.register(key, organs, round_index)
        allocation = donor_start(record.organs, self.fitted_tasks(exclude=key), hyper.generate, hyper.base,
                                 [u.name for u in hyper.units if u.kind == "head"])
        if allocation is None:  # nothing learned yet: the new task generates the base (G is still zero)
            return self._report(key, True, False, None, None, 0.0, 0, start, {}, {}, None)
        _, target = allocation
        return self._fit(key, target, target, new_task=True, start=start)

    def fitted_tasks(self, exclude: str | None = None) -> list[FittedTask]:
        """The tasks a new one may start from (an upload was fitted), in registration order."""
        return [FittedTask(t.key, tuple(t.organs), max(t.rounds_seen)) for t in self.hyper.tasks.values()
                if t.key != exclude and t.rounds_seen]

    # ------------------------------------------------------------------ recalibration
    def update(self, key: str, upload: Mapping[str, torch.Tensor], *, round_index: int | None = None,
               source: str | None = None, weigh_history: bool | None = None) -> AMRReport:
        """Fit the task to an upload. ``weigh_history`` defaults to "upload from a new source" (see module doc).

        The upload is checked completely before anything changes.
        """
        start = time.perf_counter()
        hyper = self.hyper
        if key not in hyper.tasks:
            raise KeyError(f"task {key!r} is not registered; allocate it before updating")
        hyper.check_target(key, upload, source=f"upload from {source or 'unknown source'}")
        record = hyper.tasks[key]
        upload = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v for k, v in upload.items()}
        if weigh_history is None:
            weigh_history = bool(record.rounds_seen) and (not record.contributors or record.contributors[-1] != source)
        similarity = js = None
        target = upload
        if weigh_history and record.rounds_seen:
            history = hyper.generate(key)
            js = js_divergence(history, upload, self.config.js_bins)
            similarity = (self.config.fixed_similarity if self.config.similarity == "fixed"
                          else self.config.max_history_weight * (1.0 - js))
            target = {k: similarity * history[k] + (1 - similarity) * upload[k] if v.is_floating_point() else v
                      for k, v in upload.items()}
        if not hyper.has_base_fit:
            report = self._rebase(key, target, upload, start, similarity, js)
        else:
            report = self._fit(key, target, upload, new_task=False, start=start, similarity=similarity, js=js)
        if round_index is not None:
            record.rounds_seen.append(round_index)
            if record.first_round is None:
                record.first_round = round_index
        record.contributors.append(source or "unknown")
        return report

    def _rebase(self, key: str, target: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor],
                start: float, similarity: float | None, js: float | None) -> AMRReport:
        """First upload of the federation: it becomes the shared base, so it is represented exactly."""
        hyper = self.hyper
        slots = hyper.tasks[key].output_slots
        before = hyper.generate(key)
        for unit in hyper.units:
            if unit.kind == "head":
                hyper.base[unit.name][slots] = target[unit.name].to(hyper.base[unit.name].dtype)
            else:
                hyper.base[unit.name] = target[unit.name].detach().clone().to(hyper.base[unit.name].dtype)
        hyper.has_base_fit = True
        loss_before = relative_l2(before, target) ** 2
        return self._report(key, False, True, similarity, js, loss_before, 0, start, target, upload, None)

    def _fit(self, key: str, target: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor], *,
             new_task: bool, start: float, similarity: float | None = None, js: float | None = None) -> AMRReport:
        hyper = self.hyper
        others = [t for t in hyper.tasks if t != key]
        snapshot = {t: hyper.generate(t) for t in others}
        loss_before = relative_l2(hyper.generate(key), target) ** 2
        if self.config.solver == "closed_form":
            self._solve_closed_form(key, target, others)
            steps = 1
        else:
            steps = self._solve_adam(key, target, snapshot)
        return self._report(key, new_task, False, similarity, js, loss_before, steps, start, target, upload,
                            snapshot)

    def _solve_closed_form(self, key: str, target: Mapping[str, torch.Tensor], others: list[str]) -> None:
        hyper = self.hyper
        codes_t = hyper.codes(key)
        codes_old = {t: hyper.codes(t) for t in others}
        slots = hyper.tasks[key].output_slots
        rank = hyper.config.rank
        for unit in hyper.units:
            if unit.kind == "fixed":
                continue
            code = codes_t[unit.name]
            base = hyper.base[unit.name]
            if unit.kind == "head":
                phi = hyper.head_features(code, slots)
                phi_old = [hyper.head_features(codes_old[t][unit.name], hyper.tasks[t].output_slots) for t in others]
                residual_target = (target[unit.name] - base[slots]).reshape(len(slots), -1).T
                self._edit(f"{unit.name}::G", phi, phi_old, residual_target)
                continue
            phi, phi_old = code[:, None], [codes_old[t][unit.name][:, None] for t in others]
            delta = (target[unit.name] - base).double()
            if unit.kind == "dense":
                self._edit(f"{unit.name}::G", phi, phi_old, delta.reshape(-1, 1))
                continue
            m, n = unit.matrix_shape
            u, s, vh = torch.linalg.svd(delta.reshape(m, n), full_matrices=False)
            root = s[:rank].sqrt()
            a = (u[:, :rank] * root).reshape(-1, 1)
            b = (vh[:rank].T * root).reshape(-1, 1)
            self._edit(f"{unit.name}::GA", phi, phi_old, a)
            self._edit(f"{unit.name}::GB", phi, phi_old, b)

    def _edit(self, param: str, phi: torch.Tensor, phi_old: list[torch.Tensor], wanted: torch.Tensor) -> None:
        """``G += E Φᵀ (ΦΦᵀ + λI + β Φ_old Φ_oldᵀ)⁻¹`` with ``E = wanted − G Φ`` (the L_hyper minimiser)."""
        g = self.hyper.params[param]
        phi = phi.double()
        residual = wanted.double() - g.double() @ phi
        gram = phi @ phi.T + self.config.ridge * torch.eye(phi.shape[0], dtype=torch.float64)
        if phi_old and self.config.beta > 0:
            old = torch.cat(phi_old, dim=1).double()
            gram = gram + self.config.beta * old @ old.T
        solve = torch.linalg.solve(gram, phi)  # (f, k): gram⁻¹ Φ (gram is symmetric)
        self.hyper.params[param] = (g.double() + residual @ solve.T).to(g.dtype)

    def _solve_adam(self, key: str, target: Mapping[str, torch.Tensor],
                    snapshot: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
        """The paper's optimiser on L_task + β·L_R (relative squared errors), all parameters + z_T."""
        hyper, cfg = self.hyper, self.config
        params = {k: v.clone().requires_grad_(True) for k, v in hyper.params.items()}
        embedding = hyper.embeddings[key].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([*params.values(), embedding], lr=cfg.adam_lr)
        scale = {t: sum(float(v.pow(2).sum()) for v in w.values() if v.is_floating_point())
                 for t, w in [(key, target), *snapshot.items()]}
        for _ in range(cfg.adam_steps):
            optimizer.zero_grad()
            generated = hyper.generate(key, params, embedding)
            loss = sum((generated[k] - v).pow(2).sum() for k, v in target.items() if v.is_floating_point()) / scale[key]
            if cfg.beta > 0:
                for t, old in snapshot.items():
                    now = hyper.generate(t, params)
                    loss = loss + cfg.beta * sum((now[k] - v).pow(2).sum() for k, v in old.items()
                                                 if v.is_floating_point()) / scale[t]
            loss.backward()
            optimizer.step()
        hyper.params = {k: v.detach() for k, v in params.items()}
        hyper.embeddings[key] = embedding.detach()
        return cfg.adam_steps

    def _report(self, key: str, new_task: bool, rebased: bool, similarity: float | None, js: float | None,
                loss_before: float, steps: int, start: float, target: Mapping[str, torch.Tensor],
                upload: Mapping[str, torch.Tensor], snapshot: Mapping[str, Mapping[str, torch.Tensor]] | None
                ) -> AMRReport:
        hyper = self.hyper
        generated = hyper.generate(key)
        drift = {t: relative_l2(hyper.generate(t), old) for t, old in (snapshot or {}).items()}
        loss_reg = sum(d ** 2 for d in drift.values())
        fidelity = relative_l2(generated, target) if target else 0.0
        return AMRReport(
            task=key, new_task=new_task, rebased=rebased, similarity=similarity, js_divergence=js,
            loss_task_before=loss_before, loss_task_after=fidelity ** 2, loss_reg_after=loss_reg, steps=steps,
            seconds=time.perf_counter() - start, fidelity_rel_l2=fidelity,
            upload_rel_l2=relative_l2(generated, upload) if upload else 0.0, drift=drift)

