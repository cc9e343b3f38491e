"""The two stages of one AMR fit: what the generators should output, the codes, then the generators.

Plain torch. Three pieces, used in this order by :meth:`nnunet_feddah.method.amr.AMR._solve_closed_form`:

* :func:`generator_targets` — the upload as outputs of every generator matrix: the dense delta, the head
  rows, and for a low-rank kernel the rank-r factors of its delta (truncated SVD, ``U√S`` and ``V√S``),
  **rotated onto the factors the task generates now** (orthogonal Procrustes). The SVD fixes the factors
  only up to a rotation ``R`` (``(AR)(BR)ᵀ = ABᵀ``); without the alignment a factor target can jump between
  rounds although the weights barely moved, and nothing the generators learned could be reused.
* :func:`fit_codes` — the task embedding ``z_T``, every per-layer projection ``E_l``, the inter-layer encoder
  ``F`` and the organ embeddings trained by Adam (the paper's optimiser, lr 1e-3) on
  ``L_task + β·L_R`` with the generators held. For a held generator ``G`` every term is a quadratic form in
  its input ``f``: ``‖G f − y‖² = fᵀKf − 2fᵀ(Gᵀy) + ‖y‖²`` with ``K = GᵀG`` (h×h, hk×hk for heads), and
  ``L_R`` is ``Σ_t (f_t − f_t⁰)ᵀK(f_t − f_t⁰) / ‖G f_t⁰‖²`` over the other tasks. So a step never touches a
  full-size tensor (O(h²) per layer and task: milliseconds at 64 tasks on the AMOS net). What the first
  stage leaves of ``L_task`` is the share of the upload the generators already learned from other tasks
  could not explain.
* :func:`refit_generator` — the second stage: every generator matrix refitted in closed form to the rest,
  in correction form, which also puts the other tasks' outputs back where the first stage moved them.

:class:`TasksBefore` keeps what the other tasks generated before a fit, for the drift report, at the cost of one
model rather than one per task.

Before any task has been fitted every ``K`` is zero: there is nothing to learn from and nothing moves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from nnunet_feddah.method.aggregate import relative_l2
from nnunet_feddah.method.dahyper import DAHyper


@dataclass(frozen=True)
class CodeFit:
    """What the first stage did: ``L_task`` relative to ``‖y‖²`` before and after, ``L_R`` after, steps."""

    task_before: float
    task_after: float
    reg_after: float
    steps: int

    @property
    def explained(self) -> float:
        """Share of the task's generator-output error the first stage removed (0: nothing shared)."""
        return 0.0 if self.task_before <= 0 else max(0.0, 1.0 - self.task_after / self.task_before)


def generator_targets(hyper: DAHyper, key: str, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{generator param: wanted output (out, columns), float64}`` for the task's columns of
    :meth:`DAHyper.generator_inputs` (one column; heads one per output slot)."""
    code = hyper.codes(key)
    slots = hyper.tasks[key].output_slots
    rank = hyper.config.rank
    wanted: dict[str, torch.Tensor] = {}
    for unit in hyper.units:
        if unit.kind == "fixed":
            continue
        base = hyper.base[unit.name]
        if unit.kind == "head":
            wanted[f"{unit.name}::G"] = (target[unit.name] - base[slots]).double().reshape(len(slots), -1).T
            continue
        delta = (target[unit.name] - base).double()
        if unit.kind == "dense":
            wanted[f"{unit.name}::G"] = delta.reshape(-1, 1)
            continue
        m, n = unit.matrix_shape
        u, s, vh = torch.linalg.svd(delta.reshape(m, n), full_matrices=False)
        root = s[:rank].sqrt()
        a, b = u[:, :rank] * root, vh[:rank].T * root
        now_a, now_b = (f.double() for f in hyper.factors(unit, code[unit.name]))
        p, _, qh = torch.linalg.svd(a.T @ now_a + b.T @ now_b)  # R = polar(AᵀA_now + BᵀB_now)
        rotation = p @ qh
        wanted[f"{unit.name}::GA"] = (a @ rotation).reshape(-1, 1)
        wanted[f"{unit.name}::GB"] = (b @ rotation).reshape(-1, 1)
    return wanted


def _column_forms(inputs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``fᵀ K f`` for every column ``f`` of ``inputs``."""
    return (inputs * (gram @ inputs)).sum(0)


def fit_codes(hyper: DAHyper, key: str, wanted: Mapping[str, torch.Tensor], *, beta: float, trust: float,
              steps: int, lr: float, embedding_lr: float) -> CodeFit:
    """Train ``z_key``, every ``E_l``, ``F`` (if the encoder is on) and the organ embeddings; generators held.

    ``trust`` weighs how far the other tasks' generator inputs move (relative to their size), in every
    direction, not only those the generators read: without it the inputs of old tasks wander where ``L_R``
    does not see them and, over many tasks, become nearly collinear — measured on the CPU plan with 64
    full-rank tasks, the smallest singular value of a head's inputs fell to 3e-4 and old tasks drifted by 8 %
    of their delta. The result is kept only if it lowered the objective; otherwise nothing changes.
    """
    keys = list(hyper.tasks)
    index = keys.index(key)
    total = sum(float(y.pow(2).sum()) for y in wanted.values())  # ‖y‖²: L_task is relative to it
    scale = max(total, 1e-30)
    constant = total / scale
    # trunk units (one input column per task, shared by G_A and G_B) are stacked into one batched form;
    # heads (one column per task and output slot) stay per tensor
    trunk = [u.name for u in hyper.units if u.kind in ("dense", "lowrank")]
    trunk_params = {name: [p for p in (f"{name}::G", f"{name}::GA", f"{name}::GB") if p in wanted] for name in trunk}
    heads = [p for p in wanted if p.split("::")[0] not in trunk_params]
    generators = {p: hyper.params[p].double() for p in wanted}
    grams = {p: g.T @ g for p, g in generators.items()}
    pulls = {p: g.T @ wanted[p] for p, g in generators.items()}  # Gᵀy
    trunk_gram = torch.stack([sum(grams[p] for p in trunk_params[n]) for n in trunk])  # (U, h, h)
    trunk_pull = torch.stack([sum(pulls[p] for p in trunk_params[n])[:, 0] for n in trunk])  # (U, h)
    generators_empty = all(float(g.abs().max()) == 0 for g in generators.values())
    del generators
    names = [n for n in hyper.params if n.endswith("::E")] + ["organs::embedding"]
    if hyper.config.layer_encoder:
        names.append("encoder::F")
    trained = {n: hyper.params[n].double().clone().requires_grad_(True) for n in names}
    view = {**{n: v.double() for n, v in hyper.params.items() if n == "encoder::F"}, **trained}
    z = torch.stack([hyper.embeddings[k] for k in keys], dim=1).double()
    z_key = z[:, index].clone().requires_grad_(True)
    others_t = torch.tensor([i != index for i in range(len(keys))])

    def stacked(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([inputs[trunk_params[n][0]] for n in trunk])  # (U, h, T)

    with torch.no_grad():
        start, owner = hyper.generator_inputs(keys, view, z)
        start_trunk = stacked(start)
        old_size = (start_trunk * (trunk_gram @ start_trunk)).sum((0, 1))
        old_inputs = start_trunk.pow(2).sum((0, 1))
        for p in heads:
            old_size.index_add_(0, owner[p], _column_forms(start[p], grams[p]))
            old_inputs.index_add_(0, owner[p], start[p].pow(2).sum(0))
    mine = {p: owner[p] == index for p in heads}
    others = {p: ~mine[p] for p in heads}
    held = [i for i in range(len(keys)) if i != index]
    # a task without a delta of its own (the one whose upload became the base) would make L_R relative to
    # nothing: its denominator is floored at 1e-3 of the mean task's
    floor = 1e-3 * float(old_size[held].mean()) if held else 0.0
    old_size = old_size.clamp_min(max(floor, 1e-30))

    def losses() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``L_task`` (relative to ‖y‖²), ``L_R`` and the inputs' movement, both summed over held tasks."""
        embeddings = torch.cat([z[:, :index], z_key[:, None], z[:, index + 1:]], dim=1)
        inputs, _ = hyper.generator_inputs(keys, view, embeddings)
        codes = stacked(inputs)
        own = codes[:, :, index]  # (U, h)
        task = ((own * (trunk_gram @ own[:, :, None])[:, :, 0]).sum() - 2 * (own * trunk_pull).sum()) / scale
        d = (codes - start_trunk) * others_t
        moved = (d * (trunk_gram @ d)).sum((0, 1))
        wandered = d.pow(2).sum((0, 1))
        for p in heads:
            f = inputs[p][:, mine[p]]
            task = task + (_column_forms(f, grams[p]).sum() - 2 * (f * pulls[p]).sum()) / scale
            d = inputs[p][:, others[p]] - start[p][:, others[p]]
            moved = moved.index_add(0, owner[p][others[p]], _column_forms(d, grams[p]))
            wandered = wandered.index_add(0, owner[p][others[p]], d.pow(2).sum(0))
        if not held:
            return task + constant, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        return task + constant, (moved[held] / old_size[held]).sum(), (wandered[held] / old_inputs[held]).sum()

    with torch.no_grad():
        task_before = float(losses()[0])
    if steps <= 0 or generators_empty:
        return CodeFit(task_before, task_before, 0.0, 0)
    optimizer = torch.optim.Adam([{"params": list(trained.values()), "lr": lr},
                                  {"params": [z_key], "lr": embedding_lr}], foreach=True)
    best = (task_before, task_before, 0.0, 0, None)  # objective, L_task, L_R, step, values
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        task, reg, wandered = losses()
        objective = task + beta * reg + trust * wandered
        if step > 1 and float(objective.detach()) < best[0]:  # the values before this step's update
            best = (float(objective.detach()), float(task.detach()), float(reg.detach()), step - 1,
                    _values(trained, z_key))
        objective.backward()
        optimizer.step()
    with torch.no_grad():
        task, reg, wandered = losses()
        objective = float(task + beta * reg + trust * wandered)
        if objective < best[0]:
            best = (objective, float(task), float(reg), steps, _values(trained, z_key))
    _, task_after, reg_after, best_step, values = best
    if values is None:  # no step lowered the objective: the codes stay as they were
        return CodeFit(task_before, task_before, 0.0, 0)
    params, embedding = values
    for n, v in params.items():
        hyper.params[n] = v.to(hyper.params[n].dtype)
    hyper.embeddings[key] = embedding.to(hyper.embeddings[key].dtype)
    return CodeFit(task_before, task_after, reg_after, best_step)


def _values(trained: Mapping[str, torch.Tensor], z_key: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {n: v.detach().clone() for n, v in trained.items()}, z_key.detach().clone()


def refit_generator(generator: torch.Tensor, phi: torch.Tensor, wanted: torch.Tensor, held_before: torch.Tensor,
                    held_now: torch.Tensor, *, beta: float, ridge: float) -> torch.Tensor:
    """The ``L_hyper`` minimiser over one generator ``G`` for fixed inputs, in correction form:

    ``G + [(Y − GΦ)Φᵀ + β G (Φ_h⁰ − Φ_h) Φ_hᵀ] (ΦΦᵀ + β Φ_h Φ_hᵀ + λI)⁻¹``

    Φ: the task's inputs, Y: what it should output; Φ_h⁰ / Φ_h: the other tasks' inputs before and after the
    first stage moved the codes, so the second term returns their outputs to ``G Φ_h⁰`` (what they
    generated). Solved in float64; the result has ``generator``'s dtype.
    """
    g64, phi = generator.double(), phi.double()
    gram = phi @ phi.T + ridge * torch.eye(phi.shape[0], dtype=torch.float64)
    restore = None
    if held_now.shape[1] and beta > 0:
        now = held_now.double()
        gram = gram + beta * now @ now.T
        moved = held_before.double() - now
        if bool(moved.any()):
            restore = beta * now @ moved.T  # (f, f): gram⁻¹ of it, transposed, is applied to G
    delta = (wanted - g64 @ phi) @ torch.linalg.solve(gram, phi).T  # gram is symmetric
    if restore is not None:
        delta = delta + g64 @ torch.linalg.solve(gram, restore).T
    return (g64 + delta).to(generator.dtype)


class TasksBefore:
    """The other tasks' generated weights as they were before a fit, without holding one model per task.

    A fit replaces generator parameters (it never edits them in place) and leaves every other task's
    embedding and residual alone, so a shallow copy of the parameter dict regenerates the old weights one
    task at a time: O(one model) of memory instead of O(T models) (7.7 GB per update at 64 AMOS tasks).
    Only the federation's first fitted round edits the base in place (the rebase); it keeps full copies.
    """

    def __init__(self, hyper: DAHyper, tasks: Sequence[str]) -> None:
        self.hyper, self.tasks, self.params = hyper, list(tasks), dict(hyper.params)
        self.full = None if hyper.has_base_fit else {t: hyper.generate(t) for t in self.tasks}

    def weights(self, key: str) -> dict[str, torch.Tensor]:
        if self.full is not None:
            return self.full[key]
        with torch.no_grad():
            return self.hyper.generate(key, self.params)

    def drift(self) -> dict[str, float]:
        """Relative L2 change of every task since construction."""
        return {t: relative_l2(self.hyper.generate(t), self.weights(t)) for t in self.tasks}
