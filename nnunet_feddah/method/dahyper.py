"""DAHyper: task identity → the complete weights of the shared network (trunk and organ-keyed heads).

Plain torch: it knows tensor names and shapes, never nnU-Net (docs/METHOD.md §0–§5 has the measurements).
Every task is ``W_t = base + Δ_t``: the shared **base** is a full network (the first fitted round's consensus),
and a head row is generated per *(task, organ)*, so tasks with different organs share one DAHyper.

* **Remainders** (always): a task's *exact residual* while it is trained (``residuals``, so a round's work
  reaches the next round whole), its *quantised remainder* once idle (``idle``, :mod:`.quantize`), both
  counted in :meth:`DAHyper.nbytes` and stored in the checkpoint. Without generators (``generators=False``,
  the default) ``Δ_t`` is just that remainder: a per-task store.
* **The paper's generators** (``generators=True``): a task embedding ``z_t ~ N(μ_z, σ²)``; per-layer codes
  ``c_{t,l} = tanh(E_l z_t + F c_{t,l-1})`` through the inter-layer encoder ``F`` (``layer_encoder``), the
  code size growing with the tasks; and generators linear in the code, so AMR refits them in closed form —
  ``Δ = reshape(G c)`` for small tensors, ``reshape(G_A c) · reshape(G_B c)ᵀ`` (rank ``r``) for large
  kernels (matrix ``m × (n₁ n₂ …)``), ``G (c ⊗ e_organ)`` with learned organ embeddings for head rows. The
  remainder is then what the generators miss. Measured to equal a per-task rank-r store (docs/METHOD.md §0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.method.quantize import QuantizedTensor, dequantize_all, from_tensors, to_tensors
from nnunet_feddah.organs import BACKGROUND
from nnunet_feddah.tensor_checks import non_finite, shape_mismatches


@dataclass(frozen=True)
class DAHyperConfig:
    """Sizes of the hypernetwork. ``code_dim`` is the initial code size; it grows with the tasks (see METHOD.md)."""

    embedding_dim: int = 32  # d: task embedding z_t
    code_dim: int = 16  # h: initial size of the per-layer code c_{t,l}
    code_growth: int = 4  # dimensions added when the registered tasks would fill the code
    code_headroom: int = 4  # free code dimensions kept beyond the registered tasks (independent codes)
    max_code_dim: int = 1024  # hard limit: registering beyond it raises CapacityError
    rank: int = 16  # r: rank of low-rank deltas for large kernels
    organ_embedding_dim: int = 8  # k: organ embedding for head rows
    num_organ_slots: int = 16  # background + AMOS organs 1..15 (head rows of the base network)
    layer_encoder: bool = True  # inter-layer consistency encoder F on/off (ablation)
    # False (default): no stage 1 and no generators — every task is the base plus its own remainder (exact while
    # active, quantised once idle). True: the paper's generators, which were measured to equal a per-task rank-r
    # store while costing more memory and changing nothing a site receives (docs/METHOD.md §0)
    generators: bool = False
    embedding_mean: float = 0.0  # μ_z
    embedding_std: float = 1.0  # σ
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "code_dim", "code_growth", "rank", "organ_embedding_dim", "num_organ_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"DAHyperConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.embedding_std <= 0:
            raise ValueError(f"DAHyperConfig.embedding_std must be > 0, got {self.embedding_std}")
        if self.code_headroom < 0 or self.max_code_dim < self.code_dim:
            raise ValueError(f"DAHyperConfig: code_headroom must be ≥ 0 and max_code_dim ≥ code_dim, got "
                             f"{self.code_headroom} and {self.max_code_dim} (code_dim {self.code_dim})")


@dataclass
class TaskRecord:
    """What the coordinator knows about one task: its organs (AMOS ids, output order) and its history."""

    key: str
    organs: list[int]
    first_round: int | None = None
    rounds_seen: list[int] = field(default_factory=list)
    contributors: list[str] = field(default_factory=list)
    last_contributors: list[str] = field(default_factory=list)  # sources of the most recent fitted round
    training_cases: dict[str, int] = field(default_factory=dict)  # source -> training cases of its last upload

    @property
    def output_slots(self) -> list[int]:
        """Organ slot per output channel: background first, then the organs in task order."""
        return [BACKGROUND, *self.organs]


@dataclass(frozen=True)
class Unit:
    """One generated tensor: how its delta is parameterised."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "dense" | "lowrank" | "head" | "fixed"

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])


class TargetMismatchError(FedDAHError, ValueError):
    """Target weights whose names, shapes or values cannot be fitted; raised before anything changes."""


class CapacityError(FedDAHError, ValueError):
    """Registering a task would need a code larger than ``max_code_dim``; nothing was changed."""


def _head_columns(codes: torch.Tensor, organs: torch.Tensor) -> torch.Tensor:
    """``c_j ⊗ e_j`` for every column j (codes ``(h, N)``, organ embeddings ``(N, k)``): ``(h·k, N)``, h-major."""
    return (codes[:, None, :] * organs.T[None]).reshape(-1, codes.shape[1])


def _unit_kind(name: str, shape: tuple[int, ...], is_head: bool, floating: bool, rank: int) -> str:
    if not floating:
        return "fixed"
    if is_head:
        return "head"
    m, n = shape[0] if shape else 1, math.prod(shape[1:])
    return "lowrank" if len(shape) >= 2 and m > 1 and n > 1 and rank * (m + n) < m * n else "dense"


class DAHyper:
    """Task identity → complete weights of the shared network (trunk and organ-keyed heads).

    Construct it from the unique tensors of the network built with ``num_organ_slots`` outputs
    (background + every AMOS organ): those tensors are the initial base, and their head rows are the
    initial rows of each organ.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], is_head: Callable[[str], bool],
                 config: DAHyperConfig | None = None) -> None:
        self.config = config or DAHyperConfig()
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        self.units: list[Unit] = []
        self.base: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        h = cfg.code_dim
        for name, tensor in base.items():
            shape = tuple(tensor.shape)
            head = is_head(name)
            if head and shape[0] != cfg.num_organ_slots:
                raise TargetMismatchError(
                    f"head tensor {name} has {shape[0]} output rows; DAHyper needs the base network built with "
                    f"num_organ_slots={cfg.num_organ_slots} outputs (background + every organ)")
            unit = Unit(name, shape, _unit_kind(name, shape, head, tensor.is_floating_point(), cfg.rank))
            self.units.append(unit)
            self.base[name] = tensor.detach().to("cpu").clone()
            if unit.kind == "fixed" or not cfg.generators:
                continue
            self.params[f"{name}::E"] = torch.randn(h, cfg.embedding_dim, generator=generator) / math.sqrt(
                cfg.embedding_dim)
            if unit.kind == "dense":
                self.params[f"{name}::G"] = torch.zeros(tensor.numel(), h)
            elif unit.kind == "lowrank":
                m, n = unit.matrix_shape
                self.params[f"{name}::GA"] = torch.zeros(m * cfg.rank, h)
                self.params[f"{name}::GB"] = torch.zeros(n * cfg.rank, h)
            else:
                self.params[f"{name}::G"] = torch.zeros(unit.row_numel, h * cfg.organ_embedding_dim)
        if cfg.generators:  # drawn either way, so that switching the encoder off changes nothing but the encoder
            self.params["encoder::F"] = torch.randn(h, h, generator=generator) / math.sqrt(h) * float(cfg.layer_encoder)
            self.params["organs::embedding"] = torch.randn(cfg.num_organ_slots, cfg.organ_embedding_dim,
                                                           generator=generator)
        self.embeddings: dict[str, torch.Tensor] = {}
        self.residuals: dict[str, dict[str, torch.Tensor]] = {}  # task -> exact remainder while it is active
        self.idle: dict[str, dict[str, QuantizedTensor]] = {}  # task -> quantised remainder once it went idle
        self.tasks: dict[str, TaskRecord] = {}
        self._generator = generator
        self.has_base_fit = False  # becomes True when the base is set from the first fitted round

    # ------------------------------------------------------------------ registry
    def register(self, key: str, organs: Sequence[int], round_index: int | None = None) -> TaskRecord:
        """Add a task with a fresh embedding ``z ~ N(μ_z, σ²)``; registering twice is an error."""
        if key in self.tasks:
            raise ValueError(f"task {key!r} is already registered")
        bad = [o for o in organs if not 0 < int(o) < self.config.num_organ_slots]
        if bad or not organs:
            raise ValueError(f"task {key!r}: organ ids must be 1..{self.config.num_organ_slots - 1}, got {list(organs)}")
        cfg = self.config
        if cfg.generators:
            self._ensure_capacity(key, len(self.tasks) + 1)
        self.embeddings[key] = cfg.embedding_mean + cfg.embedding_std * torch.randn(cfg.embedding_dim,
                                                                                    generator=self._generator)
        record = TaskRecord(key, [int(o) for o in organs], first_round=round_index)
        self.tasks[key] = record
        return record

    # ------------------------------------------------------------------ capacity
    @property
    def code_size(self) -> int:
        """The current code size h (``config.code_dim`` until the tasks make it grow; 0 without generators)."""
        return self.params["encoder::F"].shape[0] if "encoder::F" in self.params else 0

    def _ensure_capacity(self, key: str, num_tasks: int) -> None:
        """Grow the code so ``num_tasks`` + headroom fit, or refuse; growing leaves every output unchanged.

        The closed-form edit holds the other tasks in place only while every task has a code direction of
        its own: with more tasks than code dimensions an edit must move old tasks (measured with a fixed
        32-dimensional code and full-rank targets, as a share of the old task's own delta: 1.2e-3 at 31 tasks,
        37 % at 33, 137 % at 64). So the code grows by ``code_growth`` before it fills (docs/METHOD.md).
        """
        cfg, h = self.config, self.code_size
        needed = num_tasks + cfg.code_headroom
        if needed <= h:
            return
        new_h = h + cfg.code_growth * math.ceil((needed - h) / cfg.code_growth)
        if new_h > cfg.max_code_dim:
            raise CapacityError(
                f"registering task {key!r} needs a code of {new_h} dimensions for {num_tasks} tasks, beyond "
                f"DAHyperConfig.max_code_dim={cfg.max_code_dim}; raise strategy.params.max_code_dim in the "
                f"federation plan (memory grows with it) — nothing was registered")
        self._grow(new_h)

    def _grow(self, new_h: int) -> None:
        """Append code dimensions: new projection rows are drawn, new generator columns are zero, and the
        encoder feeds no new dimension into an old one, so every task's generated weights stay the same."""
        h, g, k = self.code_size, self._generator, self.config.organ_embedding_dim
        extra = new_h - h
        heads = {f"{u.name}::G" for u in self.units if u.kind == "head"}  # features c ⊗ e: h·k columns, h-major
        for name, value in list(self.params.items()):
            if name.endswith("::E"):
                rows = torch.randn(extra, value.shape[1], generator=g) / math.sqrt(value.shape[1])
                self.params[name] = torch.cat([value, rows])
            elif name.endswith(("::G", "::GA", "::GB")):
                width = extra * (k if name in heads else 1)
                self.params[name] = torch.cat([value, value.new_zeros(value.shape[0], width)], dim=1)
        old = self.params["encoder::F"]
        grown = old.new_zeros(new_h, new_h)
        grown[:h, :h] = old
        grown[h:] = torch.randn(extra, new_h, generator=g) / math.sqrt(new_h) * float(self.config.layer_encoder)
        self.params["encoder::F"] = grown

    # ------------------------------------------------------------------ shapes
    def output_shapes(self, key: str) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors :meth:`generate` returns for a task."""
        rows = len(self.tasks[key].output_slots)
        return {u.name: ((rows, *u.shape[1:]) if u.kind == "head" else u.shape) for u in self.units}

    def base_view(self, key: str) -> dict[str, torch.Tensor]:
        """The shared base as the task sees it: trunk tensors, head rows of the task's output slots."""
        slots = self.tasks[key].output_slots
        return {u.name: self.base[u.name][slots] if u.kind == "head" else self.base[u.name] for u in self.units}

    # ------------------------------------------------------------------ stage 1
    def codes(self, key: str, params: Mapping[str, torch.Tensor] | None = None,
              embedding: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-layer codes ``c_{t,l}`` of a task, layer by layer through the inter-layer encoder."""
        z = self.embeddings[key] if embedding is None else embedding
        return {name: code[:, 0] for name, code in self.codes_batch(z[:, None], params).items()}

    def codes_batch(self, embeddings: torch.Tensor,
                    params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Codes of many tasks at once: ``embeddings`` is ``(d, tasks)``, every code ``(h, tasks)``."""
        p = self.params if params is None else params
        F = p["encoder::F"]
        previous = embeddings.new_zeros(F.shape[0], embeddings.shape[1])
        out: dict[str, torch.Tensor] = {}
        for unit in self.units:
            if unit.kind == "fixed":
                continue
            previous = out[unit.name] = torch.tanh(p[f"{unit.name}::E"] @ embeddings + F @ previous)
        return out

    def generator_inputs(self, keys: Sequence[str], params: Mapping[str, torch.Tensor] | None = None,
                         embeddings: torch.Tensor | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What every generator matrix multiplies, for the tasks ``keys``: ``(inputs, owner)``.

        ``inputs[param]`` has one column per task (trunk generators: the code) or per (task, output slot)
        (heads: ``c ⊗ e_organ``); ``owner[param]`` gives each column's position in ``keys``. ``embeddings``
        (``(d, len(keys))``) replaces the stored ones. Every generated output is ``G @ inputs`` (AMR's
        quadratic forms and closed-form edits are written on these columns).
        """
        p = self.params if params is None else params
        z = torch.stack([self.embeddings[k] for k in keys], dim=1) if embeddings is None else embeddings
        codes = self.codes_batch(z, p)
        slots = [(i, s) for i, key in enumerate(keys) for s in self.tasks[key].output_slots]
        head_owner = torch.tensor([i for i, _ in slots], dtype=torch.long)
        organs = p["organs::embedding"][[s for _, s in slots]]  # (columns, k)
        task_owner = torch.arange(len(keys))
        inputs: dict[str, torch.Tensor] = {}
        owner: dict[str, torch.Tensor] = {}
        for unit in self.units:
            code = codes.get(unit.name)
            if unit.kind in ("dense", "lowrank"):
                for suffix in (("G",) if unit.kind == "dense" else ("GA", "GB")):
                    inputs[f"{unit.name}::{suffix}"], owner[f"{unit.name}::{suffix}"] = code, task_owner
            elif unit.kind == "head":
                inputs[f"{unit.name}::G"] = _head_columns(code[:, head_owner], organs)
                owner[f"{unit.name}::G"] = head_owner
        return inputs, owner

    # ------------------------------------------------------------------ stage 2
    def factors(self, unit: Unit, code: torch.Tensor,
                params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params if params is None else params
        m, n = unit.matrix_shape
        r = self.config.rank
        return (p[f"{unit.name}::GA"] @ code).reshape(m, r), (p[f"{unit.name}::GB"] @ code).reshape(n, r)

    def generate_unit(self, unit: Unit, code: torch.Tensor | None, slots: Sequence[int],
                      params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        p = self.params if params is None else params
        base = self.base[unit.name]
        if unit.kind == "fixed":
            return base.clone()
        if unit.kind == "dense":
            return base + (p[f"{unit.name}::G"] @ code).reshape(unit.shape)
        if unit.kind == "lowrank":
            a, b = self.factors(unit, code, p)
            return base + (a @ b.T).reshape(unit.shape)
        features = _head_columns(code[:, None].expand(-1, len(slots)), p["organs::embedding"][list(slots)])
        rows = (p[f"{unit.name}::G"] @ features).T  # (rows, row_numel): one c ⊗ e_organ column per output slot
        return base[list(slots)] + rows.reshape(len(slots), *unit.shape[1:])

    def generate(self, key: str, params: Mapping[str, torch.Tensor] | None = None,
                 embedding: torch.Tensor | None = None, with_residual: bool = True) -> dict[str, torch.Tensor]:
        """The complete weights of the task's network: ``{unique name: tensor}``, heads with 1+K rows.

        ``with_residual=False`` gives what the generators alone produce (without the task's exact residual
        or, for an idle task, its quantised remainder)."""
        if key not in self.tasks:
            raise KeyError(f"task {key!r} is not registered; known tasks: {sorted(self.tasks) or 'none'}")
        residual = self.remainder(key) if with_residual else {}
        if not self.config.generators:
            return {k: v + residual[k] if k in residual else v.clone() for k, v in self.base_view(key).items()}
        codes = self.codes(key, params, embedding)
        slots = self.tasks[key].output_slots
        with torch.set_grad_enabled(params is not None):
            out = {u.name: self.generate_unit(u, codes.get(u.name), slots, params) for u in self.units}
        return {k: v + residual[k] if k in residual else v for k, v in out.items()}

    def remainder(self, key: str) -> dict[str, torch.Tensor]:
        """What is added to the generators' output for a task: its exact residual while it is active, its
        dequantised remainder once it went idle, nothing where neither is kept."""
        if key in self.residuals:
            return self.residuals[key]
        return dequantize_all(self.idle[key]) if key in self.idle else {}

    # ------------------------------------------------------------------ checks
    def check_target(self, key: str, target: Mapping[str, torch.Tensor], source: str = "target") -> None:
        """Raise :class:`TargetMismatchError` for missing/extra names, wrong shapes or non-finite values."""
        problems = shape_mismatches(self.output_shapes(key), {n: tuple(v.shape) for n, v in target.items()})
        bad = non_finite(target)
        if bad:
            problems.append(f"NaN/Inf in {', '.join(bad[:3])}")
        if problems:
            raise TargetMismatchError(f"{source} for task {key!r} cannot be fitted: {'; '.join(problems)}")

    # ------------------------------------------------------------------ sizes
    def nbytes(self) -> int:
        tensors = [*self.params.values(), *self.base.values(), *self.embeddings.values(),
                   *(v for r in self.residuals.values() for v in r.values())]
        return (sum(v.numel() * v.element_size() for v in tensors)
                + sum(q.nbytes for r in self.idle.values() for q in r.values()))

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (flat names) and a JSON-able description, enough to rebuild this object exactly."""
        tensors = {f"param/{k}": v for k, v in self.params.items()}
        tensors.update({f"base/{k}": v for k, v in self.base.items()})
        tensors.update({f"embedding/{k}": v for k, v in self.embeddings.items()})
        tensors.update({f"residual/{t}/{k}": v for t, r in self.residuals.items() for k, v in r.items()})
        for task, remainder in self.idle.items():
            tensors.update(to_tensors(f"idle/{task}/", remainder))
        tensors["rng/state"] = self._generator.get_state()
        info = {
            "idle_bits": {task: next(iter(r.values())).bits for task, r in self.idle.items() if r},
            "config": asdict(self.config),
            "units": [[u.name, list(u.shape), u.kind] for u in self.units],
            "tasks": [asdict(t) for t in self.tasks.values()],
            "has_base_fit": self.has_base_fit,
        }
        return tensors, info

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], info: Mapping) -> DAHyper:
        config = DAHyperConfig(**{"generators": True, **info["config"]})  # files before 2026-12-07 had generators
        base = {name: tensors[f"base/{name}"] for name, _, _ in info["units"]}
        heads = {name for name, _, kind in info["units"] if kind == "head"}
        hyper = cls(base, lambda n: n in heads, config)
        if [[u.name, list(u.shape), u.kind] for u in hyper.units] != [list(x) for x in info["units"]]:
            raise TargetMismatchError("stored DAHyper units do not match its base tensors; the file is corrupt")
        hyper.params = {k: tensors[f"param/{k}"].clone() for k in hyper.params}  # grown shapes come with them
        hyper.tasks = {t["key"]: TaskRecord(**t) for t in info["tasks"]}
        hyper.embeddings = {k: tensors[f"embedding/{k}"].clone() for k in hyper.tasks}
        for name, tensor in tensors.items():
            if name.startswith("residual/"):
                _, task, unit = name.split("/", 2)
                hyper.residuals.setdefault(task, {})[unit] = tensor.clone()
        for task, bits in info.get("idle_bits", {}).items():
            shapes = {k: v for k, v in hyper.output_shapes(task).items()
                      if f"idle/{task}/{k}/codes" in tensors}
            hyper.idle[task] = from_tensors(f"idle/{task}/", tensors, shapes, int(bits))
        hyper._generator.set_state(tensors["rng/state"].clone())
        hyper.has_base_fit = bool(info["has_base_fit"])
        return hyper
