"""Learning curves: how fast one site's nnU-Net clears the Dice cliff for each organ task, over several seeds.

Why: below a few hundred iterations nnU-Net's Dice is 0 and just above it ~0.6, and the initialisation
draw alone decides which side a run lands on. Every comparison between server strategies is noise until
each task a stream uses is learnt well within its training budget, so this measures exactly that: a single
site, nnU-Net's own initialisation, the bundled CPU plans, and held-out Dice after every ``chunk``
iterations, for every seed (phantom cohort seed and training seed both change with it).

Training runs as chained :func:`~nnunet_feddah.nnunet.trainer.train_round` calls of ``chunk`` iterations,
each starting from the previous call's weights with a fresh optimizer — what a site does in a federation
whose rounds are ``chunk`` iterations long — on one per-task poly learning-rate curve over ``iterations``.
The reported time is the trainer's own training time (set-up and evaluation excluded).

With ``donor`` every organ starts instead where a federation starts a task it meets for the first time: from
the donor's trained network of the same seed (the donor's own from-scratch curve, run first if missing), with
head rows by FedDAH's allocation rule (:func:`nnunet_feddah.method.donor.donor_start`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.results.stats import mean_ci95

#: The held-out Dice each organ must reach (issue 12): big organs 0.80, small ones 0.60.
DICE_TARGETS: dict[str, float] = {"liver": 0.80, "spleen": 0.80, "kidneys": 0.80, "pancreas": 0.60}
SMALL_ORGAN_TARGET = 0.60
TIME_BUDGET_S = 180.0  # training seconds per site-task
SEEDS_NEEDED = 4  # of 5


@dataclass(frozen=True)
class CurveSettings:
    """One learning-curve run: what is trained, how long, and with which optimizer settings."""

    organs: tuple[str, ...] = ("kidneys", "liver", "spleen", "pancreas")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    iterations: int = 1400  # ≈ 3 minutes of training at bfloat16 on this project's 2-core CPU (docs/TRAINER.md)
    chunk: int = 350
    optimizer: str = "adamw"
    initial_lr: float = 3e-3
    cpu_precision: str = "bfloat16"  # as the bundled phantom plans (docs/TRAINER.md, "Speed on CPU")
    num_train: int = 8
    num_test: int = 4
    first_dataset_id: int = 801
    plans_template: str = "cpu"
    device: str = "cpu"
    donor: str | None = None  # start every organ from this task's trained network (same seed)
    donor_iterations: int = 1400  # how long the donor itself is trained from scratch (its plain curve)
    keep_chunks: bool = False  # keep every chunk's weights (real trained snapshots for scripts/bench_server.py)

    def target(self, organ: str) -> float:
        return DICE_TARGETS.get(organ, SMALL_ORGAN_TARGET)


def prepare_seed_site(settings: CurveSettings, seed: int, log: Callable[[str], None] = print) -> int:
    """One phantom site that annotates every organ, drawn with cohort seed ``seed``; its dataset id."""
    from nnunet_feddah.data import phantom
    from nnunet_feddah.nnunet import shared_plans

    dataset_id = settings.first_dataset_id + seed
    raw, preprocessed = (Path(os.environ[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed"))
    if not any(raw.glob(f"Dataset{dataset_id:03d}_*")):
        phantom.write_cohort(raw, num_sites=1, num_train=settings.num_train, num_test=settings.num_test, seed=seed,
                             first_dataset_id=dataset_id)
    if not any(preprocessed.glob(f"Dataset{dataset_id:03d}_*/dataset.json")):
        started = time.perf_counter()
        shared_plans.install([dataset_id], template=settings.plans_template, num_processes=2, log=lambda *_: None)
        log(f"[curve] seed {seed}: phantom site {dataset_id} + shared plans in {time.perf_counter() - started:.0f} s")
    return dataset_id


def single_site_plan(dataset_id: int, plans_identifier: str, organ: str):
    """A one-site federation plan around the dataset, so that the federation's test-set reader can load it."""
    from nnunet_feddah.federation.plan_reader import parse_plan

    return parse_plan({"name": "learning-curve", "plans_identifier": plans_identifier, "rounds_per_step": 1,
                       "sites": [{"name": "site", "dataset": dataset_id, "stream": [organ]}],
                       "local": {"epochs": 1, "iterations_per_epoch": 1},
                       "strategy": {"name": "local", "params": {}}}, "learning curve")


def held_out_scorer(dataset_id: int, plans_identifier: str, task: str, device: str = "cpu"
                    ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """Held-out Dice of a task's weights on the site's test cases (read and preprocessed once)."""
    import torch

    from nnunet_feddah.organs import Task
    from nnunet_feddah.results.evaluate import evaluate_task, load_test_set
    from nnunet_feddah.results.inference import TaskModel

    test_set = load_test_set(single_site_plan(dataset_id, plans_identifier, task), "site", log=lambda *_: None)
    labels = Task.parse(task).labels

    def score(weights: Mapping[str, Any]) -> dict[str, Any]:
        return evaluate_task(test_set, TaskModel.from_weights(test_set.shared, weights, labels, task, torch.device(device)))

    return score


def donor_start_file(donor_weights: Path, donor: str, organ: str, plans: Mapping[str, Any], out_dir: Path) -> Path:
    """The start weights of ``organ`` from the trained ``donor`` network, by FedDAH's allocation rule."""
    from nnunet_feddah.method.donor import FittedTask, donor_start
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.nnunet.weights import load_weights, save_weights
    from nnunet_feddah.organs import Task

    weights, _ = load_weights(donor_weights)
    fitted = [FittedTask(donor, Task.parse(donor).labels, 1)]
    _, start = donor_start(Task.parse(organ).labels, fitted, lambda _: weights, hypernet_base(plans),
                           [name for name in weights if is_head(name)])
    return save_weights(out_dir / "start.safetensors", start, {"donor": str(donor_weights)})


def run_curve(settings: CurveSettings, organ: str, seed: int, dataset_id: int, plans_identifier: str,
              out_dir: Path, log: Callable[[str], None] = print, start: Path | None = None) -> list[dict[str, Any]]:
    """Train ``organ`` from ``start`` (default: nnU-Net's initialisation); held-out Dice after every chunk.

    Resumes finished runs."""
    from nnunet_feddah.nnunet.round_config import RoundConfig
    from nnunet_feddah.nnunet.trainer import train_round
    from nnunet_feddah.nnunet.weights import load_weights

    done = out_dir / "curve.json"
    if done.is_file():
        return json.loads(done.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    score = held_out_scorer(dataset_id, plans_identifier, organ, settings.device)
    chunks = math.ceil(settings.iterations / settings.chunk)
    rows: list[dict[str, Any]] = []
    previous, train_s = (str(start) if start else None), 0.0
    for k in range(chunks):
        config = RoundConfig(task=organ, output_weights=str(out_dir / f"chunk_{k:02d}.safetensors"),
                             output_metrics=str(out_dir / f"chunk_{k:02d}.json"), initial_weights=previous,
                             epochs=1, iterations_per_epoch=settings.chunk, val_iterations_per_epoch=1,
                             epoch_offset=k, total_epochs=chunks, initial_lr=settings.initial_lr, validate=False,
                             seed=seed * 1000 + k, optimizer=settings.optimizer,
                             cpu_precision=settings.cpu_precision)
        metrics = train_round(dataset_id, plans_identifier, config, device=settings.device)
        train_s += metrics["wall_time_s"]["train"]
        weights, _ = load_weights(config.output_weights)
        if previous and k > 0 and not settings.keep_chunks:
            Path(previous).unlink(missing_ok=True)  # only the latest chunk's weights are needed
        previous = config.output_weights
        scores = score(weights)
        rows.append({"iterations": (k + 1) * settings.chunk, "dice": scores["dice"], "organs": scores["organs"],
                     "train_s": train_s, "train_loss": metrics["train_loss"], "precision": metrics["precision"]})
        log(f"[curve] {organ + (f' from {settings.donor}' if settings.donor else ''):<9} seed {seed}  {(k + 1) * settings.chunk:5d} it  Dice {scores['dice']:.3f}  "
            f"loss {metrics['train_loss']:+.3f}  {train_s:5.0f} s of training")
    atomic_write_json(done, rows)
    return rows


def summarise(settings: CurveSettings, curves: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]
              ) -> dict[str, Any]:
    """Per organ: mean ± 95 % CI of Dice at every checkpoint, and the target check per seed.

    A seed passes when some checkpoint reached within :data:`TIME_BUDGET_S` of training has the organ's
    target Dice; the organ passes when :data:`SEEDS_NEEDED` of the seeds do.
    """
    summary: dict[str, Any] = {}
    for organ, by_seed in curves.items():
        target = settings.target(organ)
        checkpoints = sorted({row["iterations"] for rows in by_seed.values() for row in rows})
        table = []
        for it in checkpoints:
            values = [row["dice"] for rows in by_seed.values() for row in rows if row["iterations"] == it]
            seconds = [row["train_s"] for rows in by_seed.values() for row in rows if row["iterations"] == it]
            mean, ci = mean_ci95(values)
            table.append({"iterations": it, "mean": mean, "ci95": ci, "per_seed": values,
                          "train_s_mean": sum(seconds) / len(seconds)})
        passed = {seed: any(row["dice"] >= target and row["train_s"] <= TIME_BUDGET_S for row in rows)
                  for seed, rows in by_seed.items()}
        summary[organ] = {"target": target, "checkpoints": table, "seeds_passed": passed,
                          "passes": sum(passed.values()) >= min(SEEDS_NEEDED, len(passed))}
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The learning-curve table (mean ± CI over seeds, then each seed) and a PASS/FAIL line per organ."""
    lines = []
    for organ, entry in summary.items():
        lines.append(f"\n{organ} (target {entry['target']:.2f} within {TIME_BUDGET_S:.0f} s of training)")
        lines.append("| iterations | training s | Dice mean ± 95 % CI | per seed |")
        lines.append("|---|---|---|---|")
        for row in entry["checkpoints"]:
            ci = "–" if row["ci95"] is None else f"{row['ci95']:.3f}"
            lines.append(f"| {row['iterations']} | {row['train_s_mean']:.0f} | {row['mean']:.3f} ± {ci} | "
                         + " ".join(f"{v:.2f}" for v in row["per_seed"]) + " |")
        passed = entry["seeds_passed"]
        lines.append(f"{'PASS' if entry['passes'] else 'FAIL'}  {organ}: {sum(passed.values())}/{len(passed)} seeds "
                     f"reach {entry['target']:.2f} within {TIME_BUDGET_S:.0f} s of training")
    return "\n".join(lines)


def plot_curves(path: Path, curves: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]],
                settings: CurveSettings) -> Path:
    """Dice vs iterations, one panel per organ, one line per seed, the target as a dashed line."""
    from nnunet_feddah.results.report import plain_pyplot

    with plain_pyplot() as plt:
        fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.0), squeeze=False, sharey=True)
        for ax, (organ, by_seed) in zip(axes[0], curves.items(), strict=True):
            for seed, rows in sorted(by_seed.items()):
                ax.plot([r["iterations"] for r in rows], [r["dice"] for r in rows], marker="o", ms=3,
                        label=f"seed {seed}")
            ax.axhline(settings.target(organ), ls="--", c="grey", lw=1)
            ax.set(title=f"{organ} (target {settings.target(organ):.2f})", xlabel="iterations", ylim=(0, 1))
        axes[0][0].set_ylabel("held-out Dice")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path


def run_learning_curves(settings: CurveSettings, work: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every organ × seed; writes ``curves.json`` (raw + summary) and ``curves.png`` into ``work``
    (``curves_from_<donor>.*`` with a donor)."""
    from nnunet_feddah.nnunet.shared_plans import load_template

    curves: dict[str, dict[int, list[dict[str, Any]]]] = {organ: {} for organ in settings.organs}
    plans_identifier = load_template(settings.plans_template)["plans_name"]
    for seed in settings.seeds:
        dataset_id = prepare_seed_site(settings, seed, log)
        start = None
        if settings.donor:  # the donor's own from-scratch curve (shared with a plain run in the same work folder)
            donor = replace(settings, donor=None, iterations=settings.donor_iterations,
                            chunk=min(CurveSettings.chunk, settings.donor_iterations))
            donor_dir = work / "runs" / f"{settings.donor}_seed{seed}"
            run_curve(donor, settings.donor, seed, dataset_id, plans_identifier, donor_dir, log)
            start = donor_dir / f"chunk_{math.ceil(donor.iterations / donor.chunk) - 1:02d}.safetensors"
        for organ in settings.organs:
            out = work / "runs" / (f"{organ}_from_{settings.donor}_seed{seed}" if start else f"{organ}_seed{seed}")
            organ_start = None
            if start is not None and not (out / "curve.json").is_file():
                out.mkdir(parents=True, exist_ok=True)
                plans = json.loads(next(Path(os.environ["nnUNet_preprocessed"]).glob(
                    f"Dataset{dataset_id:03d}_*/{plans_identifier}.json")).read_text())
                organ_start = donor_start_file(start, settings.donor, organ, plans, out)
            curves[organ][seed] = run_curve(settings, organ, seed, dataset_id, plans_identifier, out, log,
                                            organ_start)
    summary = summarise(settings, curves)
    name = f"curves_from_{settings.donor}" if settings.donor else "curves"  # both kinds can share a work folder
    result = {"settings": settings.__dict__, "curves": {o: {str(s): c for s, c in v.items()} for o, v in curves.items()},
              "summary": summary, "plot": str(plot_curves(work / f"{name}.png", curves, settings))}
    atomic_write_json(work / f"{name}.json", result)
    return result


@dataclass(frozen=True)
class SnapshotRun:
    """One chained training run with every chunk's weights kept: ``start.safetensors``, ``chunk_XX.safetensors``."""

    organ: str
    seed: int
    dataset_id: int
    folder: Path
    rows: list[dict[str, Any]]  # held-out Dice per chunk (:func:`run_curve`)
    plans: dict[str, Any]  # the site's shared nnU-Net plans
    plans_identifier: str

    def snapshot(self, k: int) -> Path:
        return self.folder / f"chunk_{k:02d}.safetensors"

    @property
    def final(self) -> Path:
        return self.snapshot(len(self.rows) - 1)


def snapshot_runs(work: Path, seeds: Sequence[int], chunks: int, donor: str = "kidneys",
                  organs: Sequence[str] = ("liver", "spleen", "pancreas"), donor_chunk: int = 50,
                  organ_chunk: int = 25, first_dataset_id: int = 960,
                  log: Callable[[str], None] = print) -> list[SnapshotRun]:
    """Real trained networks as a federation makes them, for the coordinator's benchmarks.

    Per seed one phantom site (cohort seed = training seed) trains ``donor`` from DAHyper's initial base
    (``chunks × donor_chunk`` iterations), then every organ from the trained donor by FedDAH's allocation
    rule (``chunks × organ_chunk``), keeping every chunk's weights. Resumes finished runs; the caller sets
    the nnU-Net folders (``nnunet_env(work)``) before nnU-Net is imported.
    """
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.nnunet.shared_plans import load_template
    from nnunet_feddah.nnunet.weights import save_weights
    from nnunet_feddah.organs import Task

    settings = CurveSettings(organs=(donor, *organs), seeds=tuple(seeds), first_dataset_id=first_dataset_id,
                             keep_chunks=True)
    plans_identifier = load_template(settings.plans_template)["plans_name"]
    runs = []
    for seed in seeds:
        dataset_id = prepare_seed_site(settings, seed, log)
        plans = json.loads(next(Path(os.environ["nnUNet_preprocessed"]).glob(
            f"Dataset{dataset_id:03d}_*/{plans_identifier}.json")).read_text())
        donor_run = None
        for organ in (donor, *organs):
            folder = work / "runs" / f"{organ}_seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            start = folder / "start.safetensors"
            if donor_run is None:
                settings_now = replace(settings, iterations=chunks * donor_chunk, chunk=donor_chunk)
                if not start.is_file():
                    slots = [0, *Task.parse(organ).labels]
                    save_weights(start, {k: (v[slots] if is_head(k) else v) for k, v in hypernet_base(plans).items()},
                                 {"start": "DAHyper's initial base"})
            else:
                settings_now = replace(settings, iterations=chunks * organ_chunk, chunk=organ_chunk, donor=donor)
                if not start.is_file():
                    donor_start_file(donor_run.final, donor, organ, plans, folder)
            rows = run_curve(settings_now, organ, seed, dataset_id, plans_identifier, folder, log, start)
            run = SnapshotRun(organ, seed, dataset_id, folder, rows, plans, plans_identifier)
            donor_run = donor_run or run
            runs.append(run)
    return runs
