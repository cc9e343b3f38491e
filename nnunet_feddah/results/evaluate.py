"""Evaluation of a federation over time: every task seen so far, after every time step, at every site.

Reads a coordinator state folder: ``steps/strategy-rNNNN.safetensors`` is the strategy as it was at
the end of each time step (:attr:`FederationPlan.time_steps`). For each of them, every task some site
had trained by then is generated (FedDAH) or looked up (baselines), and run with nnU-Net's predictor
on the held-out cases (``imagesTs``/``labelsTs`` of the raw dataset) of every site whose dataset
annotates all the task's organs. Dice is nnU-Net's (``compute_tp_fp_fn_tn``) in the original image
geometry, per organ and case; a task's Dice at a site is the mean over its organs of the case-mean.

Output (``evaluation.json``): a Dice matrix per site and the site mean, per-organ Dice over time, and
the continual-learning metrics of :mod:`nnunet_feddah.results.fcl_metrics`. No test-time mirroring (a choice
for speed on CPU; the same for every strategy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.errors import FedDAHError, run_cli
from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.plan import FederationPlan, FederationPlanError, check_same_plan
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.nnunet.datasets import DatasetNotFoundError, dataset_under
from nnunet_feddah.organs import BY_LABEL, Task, annotated_organs
from nnunet_feddah.results.amos_channels import amos_dataset_json
from nnunet_feddah.results.fcl_metrics import DiceMatrix, fcl_metrics, mean_matrix, nanmean
from nnunet_feddah.results.inference import PreparedImage, SharedPlans, TaskModel, label_dice
from nnunet_feddah.results.nnunet_folder import read_json

EVALUATION_FILE = "evaluation.json"
EVALUATION_FORMAT = "nnunet-feddah-evaluation/1"


class EvaluationError(FedDAHError, ValueError):
    """A state or site that cannot be evaluated; the message names the file/field and the fix."""


@dataclass
class SiteTestSet:
    """A site's held-out cases, preprocessed once and reused for every task and time step."""

    site: str
    dataset: str
    organs: tuple[int, ...]  # AMOS ids the site annotates
    shared: SharedPlans
    images: dict[str, PreparedImage]
    references: dict[str, np.ndarray]

    def can_evaluate(self, task: Task) -> bool:
        return bool(self.images) and set(task.labels) <= set(self.organs)


def load_test_set(plan: FederationPlan, site: str, log: Callable[[str], None] = print) -> SiteTestSet:
    """The site's ``imagesTs``/``labelsTs`` (raw dataset), read and preprocessed with the shared plans."""
    folders = plan.nnunet_folders(site)
    try:
        name = dataset_under(plan.site(site).dataset, folders["nnUNet_preprocessed"])
    except DatasetNotFoundError as exc:
        raise EvaluationError(f"site {site}: {exc}") from exc
    raw = folders["nnUNet_raw"] / name
    dataset_json = read_json(raw / "dataset.json", f"raw dataset.json of site {site}", EvaluationError)
    plans = read_json(folders["nnUNet_preprocessed"] / name / f"{plan.plans_identifier}.json",
                      f"shared plans of site {site}; run `nnfeddah plans install`", EvaluationError)
    shared = SharedPlans(plans, amos_dataset_json(dataset_json))
    organs = tuple(o.label for o in annotated_organs(dataset_json))
    images, references = {}, {}
    if (raw / "imagesTs").is_dir() and (raw / "labelsTs").is_dir():
        reader = shared.reader()
        for case, files in shared.input_cases(raw / "imagesTs").items():
            label_file = raw / "labelsTs" / f"{case}{shared.file_ending}"
            if not label_file.is_file():
                log(f"[evaluate] {site}: {case} has no {label_file.name} in labelsTs; not evaluated")
                continue
            images[case] = shared.prepare(case, files)
            references[case] = np.asarray(reader.read_seg(str(label_file))[0][0])
    if not images:
        log(f"[evaluate] {site}: no labelled held-out cases in {raw}/imagesTs + labelsTs; site not evaluated")
    return SiteTestSet(site, name, organs, shared, images, references)


def evaluate_task(test_set: SiteTestSet, model: TaskModel) -> dict[str, Any]:
    """Dice of one task model on one site's held-out cases: per case and organ, per organ, and the task mean."""
    per_case = {}
    for case, image in test_set.images.items():
        prediction, _ = model.predict(image)
        per_case[case] = {BY_LABEL[o].key: v for o, v in label_dice(test_set.references[case], prediction,
                                                                    model.organs).items()}
    organs = {BY_LABEL[o].key: nanmean([scores[BY_LABEL[o].key] for scores in per_case.values()])
              for o in model.organs}
    return {"dice": nanmean(list(organs.values())), "organs": organs, "per_case": per_case}


def _fingerprint(test_sets: Mapping[str, SiteTestSet]) -> str:
    fingerprints = {s.shared.plans.get("feddah", {}).get("architecture_fingerprint") for s in test_sets.values()}
    if len(fingerprints) != 1 or None in fingerprints:
        raise EvaluationError(f"the sites' shared plans disagree on field 'feddah.architecture_fingerprint' "
                              f"({sorted(map(str, fingerprints))}). Fix: install the same shared plans at every site")
    return fingerprints.pop()


def training_columns(plan: FederationPlan, task: Task, steps: Sequence[int]) -> list[int]:
    """Indices of the time steps in whose rounds ``(steps[j-1], steps[j]]`` some site trained ``task``."""
    columns = [j for j, end in enumerate(steps)
               if (plan.last_trained_round(task, end) or 0) > (steps[j - 1] if j else 0)]
    if not columns:
        raise EvaluationError(f"task {task.key} was never trained up to round {steps[-1]}")
    return columns


def last_training_column(plan: FederationPlan, task: Task, steps: Sequence[int]) -> int:
    """Index of the last time step in whose rounds some site trained ``task``."""
    return training_columns(plan, task, steps)[-1]


def snapshot_files(plan: FederationPlan, state_dir: Path) -> dict[int, Path]:
    """The time-step snapshots evaluation needs; every step up to the last committed round must have one."""
    committed = checkpoint.require_committed(state_dir)
    record = committed.record
    try:
        check_same_plan(record, plan, str(committed.path))
    except FederationPlanError as exc:  # the plan's time steps and tasks define the evaluation
        raise EvaluationError(exc.problems[0]) from None
    steps = [r for r in plan.time_steps if r <= record["round"]]
    if not steps:
        raise EvaluationError(f"{committed.path}: field 'round' is {record['round']}, before the first "
                              f"time step (round {plan.time_steps[0]}); nothing to evaluate yet")
    files = {r: checkpoint.snapshot_path(state_dir, r) for r in steps}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise EvaluationError(f"time-step snapshot(s) {missing} missing. Fix: the state was written by an older "
                              f"coordinator or the steps/ folder was removed; re-run the federation into a new --state")
    return files


#: Results of :func:`evaluate_task` by (site, task, :func:`~nnunet_feddah.nnunet.weights.weights_digest`).
ResultCache = dict[tuple[str, str, str], dict[str, Any]]


def evaluate_state(plan: FederationPlan, state_dir: os.PathLike | str, device: str = "cpu",
                   log: Callable[[str], None] = print, cache: ResultCache | None = None) -> dict[str, Any]:
    """Dice matrices (per site and mean), per-organ Dice over time and FCL metrics of one coordinator state.

    Bit-identical weights give identical predictions, so a task whose weights did not change between two
    time steps (a baseline's idle task), or that two strategies of one benchmark seed hold alike (round 1's
    average), is predicted once: ``cache`` carries the results across calls on the same held-out cases
    (default: within this state only). ``evaluations`` in the result counts the predictions run and reused.
    """
    from nnunet_feddah.nnunet.network import is_head
    from nnunet_feddah.nnunet.weights import weights_digest

    started = time.perf_counter()
    state_dir = Path(state_dir)
    files = snapshot_files(plan, state_dir)
    test_sets = {s: load_test_set(plan, s, log) for s in plan.site_names}
    fingerprint = _fingerprint(test_sets)
    steps = list(files)
    tasks = list(plan.tasks_trained_by(steps[-1]))
    keys = [t.key for t in tasks]
    per_site = {s: np.full((len(tasks), len(steps)), np.nan) for s in test_sets}
    organ_values: dict[str, dict[str, list[float]]] = {}  # organ -> site -> Dice per step
    details: dict[str, Any] = {}
    strategy_name = None
    torch_device = torch.device(device)
    cache = {} if cache is None else cache
    counts = {"run": 0, "reused": 0}
    memory = {}  # what the server holds at each time step, against the number of tasks it holds
    for j, round_index in enumerate(steps):
        strategy = checkpoint.load_strategy(files[round_index], fingerprint, is_head)
        strategy_name = strategy.name
        trained = strategy.tasks(trained_only=True)
        memory[str(round_index)] = {"tasks": len(trained), "bytes": int(strategy.bytes_held())}
        for task in plan.tasks_trained_by(round_index):
            i = keys.index(task.key)
            if task.key not in trained:  # every upload of it so far was rejected: there is no model to report
                log(f"[evaluate] round {round_index} {task.key}: no accepted upload yet; not evaluated")
                continue
            for site, test_set in test_sets.items():
                if not test_set.can_evaluate(task):
                    continue
                weights = strategy.weights_at_site(site, task.key)
                key = (site, task.key, weights_digest(weights))
                if key in cache:
                    counts["reused"] += 1
                else:
                    model = TaskModel.from_weights(test_set.shared, weights, list(task.labels), task.key,
                                                   torch_device)
                    cache[key] = evaluate_task(test_set, model)
                    counts["run"] += 1
                result = cache[key]
                per_site[site][i, j] = result["dice"]
                for organ, value in result["organs"].items():
                    organ_values.setdefault(organ, {}).setdefault(site, [math.nan] * len(steps))[j] = value
                details.setdefault(f"r{round_index}", {}).setdefault(task.key, {})[site] = result
                log(f"[evaluate] round {round_index} {task.key:<16} {site:<8} Dice {result['dice']:.3f}")
    matrices = {s: DiceMatrix(keys, steps, v) for s, v in per_site.items() if test_sets[s].images}
    if not matrices:
        raise EvaluationError("no site has labelled held-out cases (imagesTs + labelsTs); nothing was evaluated")
    mean = mean_matrix(matrices)
    columns = {t.key: training_columns(plan, t, steps) for t in tasks}
    metrics = fcl_metrics(mean, {k: c[-1] for k, c in columns.items()}, {k: c[0] for k, c in columns.items()})
    last_trained = {k: c[-1] for k, c in columns.items()}
    per_organ = {organ: [nanmean([values[j] for values in by_site.values()]) for j in range(len(steps))]
                 for organ, by_site in organ_values.items()}
    return {
        "format": EVALUATION_FORMAT, "plan": plan.name, "seed": plan.seed, "strategy": strategy_name,
        "state": str(state_dir.resolve()), "steps": steps, "tasks": keys,
        "dice_matrix": mean.to_json(), "per_site": {s: m.to_json() for s, m in matrices.items()},
        "per_organ": per_organ,
        "server_bytes_by_step": memory,
        "last_trained_step": {k: steps[v] for k, v in last_trained.items()},
        "cases": {s: sorted(t.images) for s, t in test_sets.items()},
        **metrics,
        "details": details,
        "evaluations": counts,
        "seconds": time.perf_counter() - started,
    }


def run_stats(state_dir: os.PathLike | str) -> dict[str, Any]:
    """Server-side costs of a finished run from its state: memory held, AMR/averaging time, bytes per site-round."""
    from nnunet_feddah.nnunet.network import is_head

    committed = checkpoint.require_committed(state_dir)
    strategy = committed.load_strategy(is_head)
    history = committed.history
    any_task = next(iter(_trained_tasks(history)), None)
    model_bytes = sum(t.numel() * t.element_size() for t in strategy.task_weights(any_task).values()) if any_task else 0
    accepted = [line for h in history for line in h["sites"].values() if line["status"] == "accepted"]
    site_rounds = len(accepted)
    lost = [line["update"]["update_lost"] for line in accepted if "update_lost" in line.get("update", {})]
    site_lost = [line["update"]["site_change_lost"] for line in accepted
                 if "site_change_lost" in line.get("update", {})]
    compressed = [event for h in history for event in h.get("strategy", {}).get("compressed", [])]
    return {
        # share of the round's aggregated update the weights sent next lack (only strategies that compress
        # report it; the FedAvg family stores its averages exactly)
        "update_lost_mean": _mean(lost),
        "update_lost_max": max(lost) if lost else None,
        "uploads_over_1pct_lost": sum(1 for x in lost if x > 0.01) if lost else None,
        # share of a site's own change they lack: the aggregation's averaging and W_s included
        "site_change_lost_mean": _mean(site_lost),
        "compressions": len(compressed),
        "compression_lost_of_delta_mean": _mean([e["lost_of_delta"] for e in compressed]),
        "server_bytes": int(strategy.bytes_held()),
        "server_update_s": float(sum(h.get("update_s", 0.0) for h in history)),
        "wall_s": float(sum(h.get("seconds", 0.0) + h.get("checkpoint_s", 0.0) for h in history)),
        "bytes_per_site_round": int(2 * model_bytes),  # the task's weights down + the trained weights up
        "site_rounds": site_rounds,
        "rounds": len(history),
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _trained_tasks(history: Sequence[Mapping[str, Any]]) -> list[str]:
    return [line["task"] for h in history for line in h["sites"].values() if line["status"] == "accepted"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def saved_evaluation(path: os.PathLike | str | None, state_dir: os.PathLike | str) -> dict[str, Any] | None:
    """The ``evaluation.json`` at ``path`` if it was written for ``state_dir`` (else None): a finished state that
    has not changed since need not be predicted again."""
    if path is None or not Path(path).is_file():
        return None
    saved = json.loads(Path(path).read_text())
    same = saved.get("format") == EVALUATION_FORMAT and saved.get("state") == str(Path(state_dir).resolve())
    return saved if same else None


def write_evaluation(out_dir: os.PathLike | str, evaluation: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / EVALUATION_FILE
    atomic_write_json(path, _jsonable(evaluation))
    return path


def main(argv: list[str] | None = None) -> int:
    from nnunet_feddah.results.report import format_metric, write_report

    parser = argparse.ArgumentParser(prog="nnfeddah evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="federation plan JSON the state was run with")
    parser.add_argument("--state", required=True, help="coordinator state folder")
    parser.add_argument("--out", required=True, help="output folder: evaluation.json, report.json, report.md, PNGs")
    parser.add_argument("-device", "--device", default="cpu", help="cpu (default), cuda or mps")
    args = parser.parse_args(argv)

    def run() -> None:
        plan = load_plan(args.plan)
        evaluation = evaluate_state(plan, args.state, args.device)
        stats = run_stats(args.state)
        out = Path(args.out)
        write_evaluation(out, evaluation)
        report = write_report(out, {plan.seed: {evaluation["strategy"]: (evaluation, stats)}}, plan.name)
        metrics = ", ".join(f"{label} {format_metric(evaluation[key])}" for key, label in (
            ("final_mean_dice", "final mean Dice"), ("forgetting", "forgetting"), ("bwt", "BWT")))
        print(f"[evaluate] {evaluation['strategy']}: {metrics} ({evaluation['seconds']:.1f} s); wrote {report}")

    return run_cli("nnfeddah evaluate", run)


if __name__ == "__main__":
    raise SystemExit(main())
