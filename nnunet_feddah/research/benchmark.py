"""The strategy comparison: the same phantom stream and seed under every chosen server strategy.

Runs each strategy's federation in this process (real nnU-Net training at every site, no Flower: the
benchmark compares server strategies, not transports), evaluates every state with
:mod:`nnunet_feddah.results.evaluate` and writes one ``report.json`` + ``report.md`` + plots.

Training is shared where it is provably identical (:mod:`nnunet_feddah.results.replay`): strategies that send
the same weights for the same job (round 1 of every strategy starts from the same initial network) reuse the
first strategy's trained upload, and with ``replay_uploads`` (the many-task stream's cheap mode) each site job
is trained once per seed and its change replayed onto every later strategy's start. A finished run's
evaluation is kept beside it (``<work>/evaluations/<strategy>/``) and reused when the run is resumed
unchanged, e.g. by the default run after a ``--quick`` one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.federation.coordinator import Coordinator
from nnunet_feddah.federation.lock import state_lock
from nnunet_feddah.federation.plan import FederationPlan, plan_hash
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.method.donor import FittedTask, donor_start
from nnunet_feddah.method.registry import STRATEGIES
from nnunet_feddah.nnunet.datasets import nnunet_folders
from nnunet_feddah.nnunet.weights import save_weights
from nnunet_feddah.paths import nnunet_env
from nnunet_feddah.results.fcl_metrics import nanmean
from nnunet_feddah.results.replay import ReplayingExecutor, plan_for
from nnunet_feddah.results.report import CENTRALIZED, markdown_table, write_report

QUICK_STRATEGIES = ("feddah", "fedavg", "fedavg-per-task-donor")
#: The default run: FedDAH, the paper's generators with and without β·L_R, −W_s, and the four baselines.
#: The finer ablations (W_s variants, the encoder, composed starts, idle forms) have their own runs:
#: docs/EVALUATION.md, scripts/bench_compression.py.
DEFAULT_STRATEGIES = ("feddah", "feddah-hypernet", "feddah-noLR", "feddah-noWs", "fedavg", "fedavg-per-task",
                      "fedavg-per-task-donor", "local")


def prepare_phantom_sites(plan: FederationPlan, num_test: int = 4, log: Callable[[str], None] = print) -> None:
    """Write the phantom datasets the plan names (consecutive ids, cohort seed = plan seed) and install the
    shared CPU plans, once; into the nnU-Net folders of the environment.

    Every site annotates exactly the organs of its stream (partially labelled hospital data), so a task is
    evaluated, and pooled for the centralized reference, at the sites that train it.
    """
    from nnunet_feddah.data import phantom
    from nnunet_feddah.nnunet import shared_plans

    ids = sorted(int(s.dataset) for s in plan.sites)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"{plan.source}: the benchmark writes phantom sites with consecutive dataset ids; got {ids}")
    raw, preprocessed = (Path(os.environ[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed"))
    if not all(any(raw.glob(f"Dataset{i:03d}_*")) for i in ids):
        start = time.perf_counter()
        by_id = {int(s.dataset): s for s in plan.sites}
        annotated = {n + 1: "+".join(dict.fromkeys(o.key for t in by_id[i].stream for o in t.organs))
                     for n, i in enumerate(ids)}  # a group task (liver+spleen) repeats organs of earlier tasks
        phantom.write_cohort(raw, num_sites=len(ids), num_train=6, num_test=num_test, seed=plan.seed,
                             annotated=annotated, first_dataset_id=ids[0])
        log(f"[bench] phantom cohort {ids} (seed {plan.seed}): {time.perf_counter() - start:.0f} s")
    if not all(any(preprocessed.glob(f"Dataset{i:03d}_*/{plan.plans_identifier}.json")) for i in ids):
        start = time.perf_counter()
        shared_plans.install(ids, template="cpu", num_processes=2, log=lambda *_: None)
        log(f"[bench] shared plans + preprocessing: {time.perf_counter() - start:.0f} s")


def task_iterations(plan: FederationPlan) -> dict[str, int]:
    """Training iterations the federation spends on each task: Σ over site-rounds of epochs × iterations per epoch."""
    spent: dict[str, int] = {}
    for round_number in range(1, plan.total_rounds + 1):
        per_round = plan.epochs_in(round_number) * plan.local.iterations_per_epoch
        for task in plan.active_sites(round_number).values():
            spent[task.key] = spent.get(task.key, 0) + per_round
    return spent


def first_met_round(plan: FederationPlan, task_key: str) -> int:
    """The round in which some site trains ``task_key`` for the first time."""
    return next(r for r in range(1, plan.total_rounds + 1)
                if any(t.key == task_key for t in plan.active_sites(r).values()))


def reference_donors(plan: FederationPlan, task_key: str) -> list[FittedTask]:
    """What the centralized reference may start ``task_key`` from: the tasks the federation had fitted when it
    met ``task_key`` (first met in an earlier round), each with the last round it was trained before then —
    so :func:`~nnunet_feddah.method.donor.choose_donor` picks the donor FedDAH's allocation picks."""
    start = first_met_round(plan, task_key)
    return [FittedTask(t.key, tuple(t.labels), plan.last_trained_round(t, start - 1))
            for t in plan.tasks if first_met_round(plan, t.key) < start]


def run_centralized(plan: FederationPlan, work: Path, base: Mapping[str, Any], device: str = "cpu",
                    first_pooled_id: int = 950, log: Callable[[str], None] = print
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The centralized reference of one seed: per task one nnU-Net on the pooled cases of its annotating
    sites for the iterations the federation spent on it, evaluated on every site's held-out cases.

    Same start as the federation: a task the federation meets after others starts from the reference's own
    model of the donor FedDAH would use (:func:`reference_donors`, head rows by the same rule from ``base``,
    the network's organ-slot weights), the first task from nnU-Net's initialisation. Returns
    ``(evaluation, stats)`` shaped like a strategy's, with one time step (the end of the stream) and no
    forgetting/BWT (the reference never learns tasks one after another). Resumes from its JSON.
    """
    import torch

    from nnunet_feddah.nnunet.network import is_head
    from nnunet_feddah.research.centralized import train_centralized
    from nnunet_feddah.results.evaluate import evaluate_task, load_test_set
    from nnunet_feddah.results.inference import TaskModel

    done = work / "centralized.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        return saved["evaluation"], saved["stats"]
    started = time.perf_counter()
    test_sets = {s: load_test_set(plan, s, log=lambda *_: None) for s in plan.site_names}
    iterations = task_iterations(plan)
    final, per_site, train_s, model_bytes, trained, donors = {}, {}, 0.0, 0, {}, {}
    heads = [name for name in base if is_head(name)]  # base: the organ-slot network, one head row per organ
    for index, task in enumerate(plan.tasks):
        start_file = None
        start = donor_start(task.labels, reference_donors(plan, task.key), trained.__getitem__, base, heads)
        if start is not None:
            donors[task.key] = start[0]
            start_file = save_weights(work / f"start_{task.key}.safetensors", start[1], {"donor": start[0]})
        weights, metrics = train_centralized(plan, task.key, iterations[task.key], dataset_id=first_pooled_id + index,
                                             work_dir=work, initial_weights=start_file, seed=plan.seed, device=device)
        trained[task.key] = weights
        train_s += metrics["wall_time_s"]["train"]
        model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        scores = {}
        for site, test_set in test_sets.items():
            if test_set.can_evaluate(task):
                model = TaskModel.from_weights(test_set.shared, weights, list(task.labels), task.key,
                                               torch.device(device))
                scores[site] = evaluate_task(test_set, model)["dice"]
        per_site[task.key] = scores
        final[task.key] = nanmean(list(scores.values()))
        log(f"[bench] centralized {task.key:<9} {iterations[task.key]} it from "
            f"{donors.get(task.key, 'initialisation')} on {[s['site'] for s in metrics['pooled_sites']]}: "
            f"Dice {final[task.key]:.3f}")
    keys = [t.key for t in plan.tasks]
    last_step = plan.time_steps[-1]
    evaluation = {
        "final_mean_dice": nanmean(list(final.values())), "forgetting": None, "bwt": None,
        "dice_matrix": {"tasks": keys, "steps": [last_step], "values": [[final[k]] for k in keys]},
        "per_site": {site: {"tasks": keys, "steps": [last_step],
                            "values": [[per_site[k].get(site)] for k in keys]} for site in test_sets},
        "old_tasks": [], "final_dice": final, "seconds": time.perf_counter() - started,
    }
    stats = {"server_bytes": model_bytes * len(keys), "server_update_s": 0.0, "wall_s": train_s,
             "bytes_per_site_round": 0, "site_rounds": 0, "rounds": 0, "task_iterations": iterations,
             "donors": donors}
    atomic_write_json(done, {"evaluation": evaluation, "stats": stats})
    return evaluation, stats


def run_seed(plan: FederationPlan, strategies: Sequence[str], work: Path, out: Path, device: str = "cpu",
             centralized: bool = True, phantom: bool = True, counts: dict[str, int] | None = None,
             log: Callable[[str], None] = print, replay_uploads: bool = False) -> dict[str, tuple[dict, dict]]:
    """Every strategy (and the centralized reference) on one seed; resumes finished runs.

    ``phantom``: write this seed's phantom cohort first (else the plan's sites must already exist).
    ``counts`` receives the numbers of site rounds trained and replayed. ``replay_uploads``: train each site
    job once and replay its change for every later strategy (module docstring).
    """
    from nnunet_feddah.federation.site_round import InProcessExecutor
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.results.evaluate import (
        EVALUATION_FILE,
        ResultCache,
        evaluate_state,
        run_stats,
        saved_evaluation,
        write_evaluation,
    )
    from nnunet_feddah.results.report import format_metric

    if phantom:
        prepare_phantom_sites(plan, log=log)
    site = next(iter(validate_sites(plan, check_cases=False).values()))
    base = hypernet_base(json.loads(site.plans_file.read_text()))
    executor = ReplayingExecutor(InProcessExecutor(plan, work / "sites", device),
                                 # uploads are replayed whatever their start: never across plans
                                 store=work / (f"replay_uploads_{plan_hash(plan)}" if replay_uploads else "replay"),
                                 replay_uploads=replay_uploads)
    predictions: ResultCache = {}  # one seed's held-out cases: identical weights are evaluated once
    results: dict[str, tuple[dict, dict]] = {}
    work.mkdir(parents=True, exist_ok=True)
    for name in strategies:
        variant = plan_for(plan, name)
        state = work / "states" / name
        with open(work / f"{name}.log", "a") as coordinator_log, state_lock(state, f"benchmark ({name})"):
            coordinator = Coordinator.open(variant, state, base, is_head, site.fingerprint,
                                           log=lambda line, fh=coordinator_log: print(line, file=fh, flush=True))
            resumed_finished = coordinator.finished
            replayed_before, run_start = executor.replayed_s, time.perf_counter()
            gaps_before = len(executor.start_gaps)
            coordinator.run(executor)
        run_s = time.perf_counter() - run_start
        gaps = executor.start_gaps[gaps_before:]
        wall_file = work / "states" / f"{name}.wall.json"  # the measured wall time survives a re-run of the bench
        if not resumed_finished:  # saved before the evaluation, so an interrupted evaluation does not lose it
            atomic_write_json(wall_file, {"wall_s": run_s + (executor.replayed_s - replayed_before),
                                          **({"replay_start_gap_mean": sum(gaps) / len(gaps),
                                              "replay_start_gap_max": max(gaps)} if gaps else {})})
        kept = work / "evaluations" / name  # beside the run, so a quick and a default report share it
        evaluation = resumed_finished and saved_evaluation(kept / EVALUATION_FILE, state)
        if evaluation:
            evaluated = "evaluation of the finished run reused"
        else:
            evaluation = evaluate_state(variant, state, device, log=lambda *_: None, cache=predictions)
            write_evaluation(kept, evaluation)
            evaluated = (f"evaluation {evaluation['seconds']:.0f} s ({evaluation['evaluations']['run']} task-site "
                         f"evaluations run, {evaluation['evaluations']['reused']} reused)")
        write_evaluation(out / f"seed_{plan.seed}" / name, evaluation)
        stats = run_stats(state)
        if wall_file.is_file():
            stats.update(json.loads(wall_file.read_text()))
        stats["evaluation_s"] = evaluation["seconds"]
        results[name] = (evaluation, stats)
        log(f"[bench] seed {plan.seed} {name:<21} final Dice {format_metric(evaluation['final_mean_dice'])} "
            f"forgetting {format_metric(evaluation['forgetting'])} BWT {format_metric(evaluation['bwt'])}  run "
            f"{run_s:.0f} s (+{executor.replayed_s - replayed_before:.0f} s replayed), {evaluated}")
    if replay_uploads and strategies:  # the replay of the strategy that trained every job is its live run, bit for bit
        first = strategies[0]
        same = replay_reproduces(plan_for(plan, first), work / "states", first, base, site.fingerprint, executor)
        results[first][1]["replay_reproduces_live"] = int(same)
        log(f"[bench] seed {plan.seed} {first} replayed from the stored uploads into a fresh state: "
            f"{'bit-identical to the live run' if same else 'DIFFERENT from the live run'}")
    if centralized:
        results[CENTRALIZED] = run_centralized(plan, work / CENTRALIZED, base, device, log=log)
    if counts is not None:
        counts["trained_jobs"] = counts.get("trained_jobs", 0) + executor.trained
        counts["replayed_jobs"] = counts.get("replayed_jobs", 0) + executor.replayed
    return results


def replay_reproduces(plan: FederationPlan, states: Path, name: str, base: Mapping[str, Any], fingerprint: str,
                      executor: ReplayingExecutor) -> bool:
    """Run ``name`` again into a fresh state with every job replayed; True when its committed strategy file and
    every time-step snapshot hash like the live run's (the evidence that upload replay gives the same states)."""
    import shutil

    from nnunet_feddah.federation import checkpoint
    from nnunet_feddah.nnunet.network import is_head

    fresh = states / f"{name}.replay_check"
    shutil.rmtree(fresh, ignore_errors=True)
    trained_before, replayed_before, replayed_s_before = executor.trained, executor.replayed, executor.replayed_s
    gaps_before = len(executor.start_gaps)
    Coordinator.open(plan, fresh, base, is_head, fingerprint, log=lambda *_: None).run(executor)
    # the check is not part of any strategy's run: its replays are not counted in the report's job totals
    executor.replayed, executor.replayed_s = replayed_before, replayed_s_before
    del executor.start_gaps[gaps_before:]
    live, again = (checkpoint.require_committed(s).record for s in (states / name, fresh))
    shutil.rmtree(fresh)
    return executor.trained == trained_before and (live["strategy_sha256"], live.get("snapshots")) == (
        again["strategy_sha256"], again.get("snapshots"))


def run_benchmark(plan: FederationPlan, strategies: Sequence[str], seeds: Sequence[int], work: Path, out: Path,
                  iterations_per_epoch: int | None = None, device: str = "cpu", centralized: bool = True,
                  phantom: bool = True, log: Callable[[str], None] = print, replay_uploads: bool = False,
                  **report_extra: Any) -> Path:
    """Run, evaluate and report every strategy over every seed; returns the report.json path.

    With ``phantom`` each seed has its own nnU-Net folders under ``work/seed_<s>`` (a phantom cohort drawn
    with that seed, training seeds derived from it), so seeds share neither data nor training; without it
    every seed trains on the plan's existing sites and only the training seeds change. Finished runs resume.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    started = time.perf_counter()
    results_by_seed, counts = {}, {}
    for seed in seeds:
        seed_plan = plan_for(plan, plan.strategy.name, iterations_per_epoch, seed)
        seed_work = work / f"seed_{seed}"
        with nnunet_folders(nnunet_env(seed_work) if phantom else None):
            results_by_seed[seed] = run_seed(seed_plan, strategies, seed_work, out, device, centralized, phantom,
                                             counts, log, replay_uploads)
    report = write_report(out, results_by_seed, plan.name, iterations_per_epoch=seed_plan.local.iterations_per_epoch,
                          epochs=seed_plan.local.epochs, device=device, bench_wall_s=time.perf_counter() - started,
                          replay_uploads=replay_uploads, **counts, **report_extra)
    log(markdown_table(json.loads(report.read_text())))
    return report
