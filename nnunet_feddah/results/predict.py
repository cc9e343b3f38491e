"""``nnfeddah predict``: all learned organs at once — every exported task model on each image, merged.

Reads a results folder written by ``nnfeddah export`` (``plans.json``, ``dataset.json``,
``feddah_export.json``, ``fold_0/<task>.pth``), preprocesses each input image once with nnU-Net, runs
every task's checkpoint through nnU-Net's predictor and merges the per-task probabilities by the rule
of :mod:`nnunet_feddah.results.merge` (a task claims a voxel with its argmax; highest claim wins). The output
is one label map per case in AMOS ids, written by the plans' image writer like ``nnUNetv2_predict``.
``feddah_merge.json`` next to it records per case which task won how many voxels and the contested count.

Every case's files are checked first (:meth:`SharedPlans.check_case`): a truncated, unreadable or 4D
image is reported on one line, listed under ``"skipped"`` in ``feddah_merge.json`` and skipped; the
other cases are still predicted, and the command exits 1 (2 when no case could be predicted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.errors import EXIT_FAILED, EXIT_INVALID, run_cli
from nnunet_feddah.nnunet.datasets import DatasetNotFoundError, dataset_under
from nnunet_feddah.paths import CONFIGURATION
from nnunet_feddah.results.inference import InferenceError, SharedPlans, TaskModel
from nnunet_feddah.results.merge import merge_task_probabilities
from nnunet_feddah.results.nnunet_folder import MANIFEST, model_folder_name, read_json

MERGE_LOG = "feddah_merge.json"


def load_task_models(model_folder: Path, tasks: Sequence[str] | None, device: torch.device,
                     use_mirroring: bool = False) -> tuple[SharedPlans, list[TaskModel]]:
    fix = "; pass the folder `nnfeddah export` wrote"
    manifest = read_json(model_folder / MANIFEST, f"FedDAH export manifest{fix}", InferenceError)
    shared = SharedPlans(read_json(model_folder / "plans.json", f"plans{fix}", InferenceError),
                         read_json(model_folder / "dataset.json", f"dataset.json{fix}", InferenceError),
                         manifest.get("configuration", CONFIGURATION))
    available = manifest.get("tasks", {})
    chosen = list(tasks) if tasks else list(available)
    unknown = [t for t in chosen if t not in available]
    if unknown or not chosen:
        raise InferenceError(f"{model_folder / MANIFEST}: field 'tasks' has {sorted(available) or 'nothing'}; asked "
                             f"for {unknown or chosen}. Fix: choose among those or export the task first")
    models = [TaskModel.from_checkpoint(shared, model_folder / available[t]["checkpoint"], t, available[t]["organs"],
                                        device, use_mirroring) for t in chosen]
    return shared, models


def predict_folder(model_folder: os.PathLike | str, input_folder: os.PathLike | str, output_folder: os.PathLike | str,
                   tasks: Sequence[str] | None = None, device: str = "cpu", use_mirroring: bool = False,
                   save_task_maps: bool = False, log: Callable[[str], None] = print) -> dict:
    """Predict every case of ``input_folder`` with all (or the chosen) tasks and write merged label maps.

    A case whose files fail :meth:`SharedPlans.check_case` is logged, skipped and recorded, so one bad
    download does not cost the rest of the folder and is never predicted from zero-filled data.
    Returns what it writes to ``feddah_merge.json``: ``cases`` (per predicted case: voxels won per task,
    claims, contested count, labels, seconds) and ``skipped`` (``{case: reason}``, empty when none).
    """
    model_folder, output_folder = Path(model_folder), Path(output_folder)
    shared, models = load_task_models(model_folder, tasks, torch.device(device), use_mirroring)
    cases = shared.input_channel_files(input_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    writer = shared.reader()
    summary: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for case, channel_files in cases.items():
        start = time.perf_counter()
        problem = shared.check_case(case, channel_files)
        if problem:
            skipped[case] = problem
            log(f"[predict] {case}: skipped, {problem}")
            continue
        files = [channel_files[i] for i in range(shared.input_channels)]
        image = shared.prepare(case, files)
        probabilities = {}
        for model in models:
            labels, probs = model.predict(image, probabilities=True)
            probabilities[model.name] = probs
            if save_task_maps:
                _write_seg(writer, labels, output_folder / "tasks" / model.name / f"{case}{shared.file_ending}",
                           image.properties)
        merged = merge_task_probabilities(probabilities, {m.name: m.organs for m in models})
        _write_seg(writer, merged.labels, output_folder / f"{case}{shared.file_ending}", image.properties)
        summary[case] = {"won": merged.won, "claims": merged.claims, "contested": merged.contested,
                         "labels": sorted(int(v) for v in np.unique(merged.labels)),
                         "seconds": round(time.perf_counter() - start, 2)}
        log(f"[predict] {case}: {len(models)} task(s), labels {summary[case]['labels']}, contested voxels "
            f"{merged.contested} ({summary[case]['seconds']:.1f} s)")
    record = {
        "rule": "each task claims its argmax organ; unclaimed = background; highest claim probability wins",
        "model_folder": str(model_folder.resolve()), "tasks": [m.name for m in models], "cases": summary,
        "skipped": skipped}
    atomic_write_json(output_folder / MERGE_LOG, record)
    return record


def _write_seg(writer, labels: np.ndarray, path: Path, properties: dict) -> None:
    """Write through a temporary name with the same ending (the writer picks the format from it), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{path.name}")
    try:
        writer.write_seg(labels.astype(np.uint8), str(tmp), properties)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_model_folder(args: argparse.Namespace) -> Path:
    if args.model_folder:
        return Path(args.model_folder)
    if not (args.dataset and args.plans):
        raise InferenceError("give -m MODEL_FOLDER, or -d DATASET and -p PLANS to find it in $nnUNet_results")
    results = os.environ.get("nnUNet_results")
    if not results:
        raise InferenceError("environment variable nnUNet_results is not set (needed with -d/-p). Fix: eval "
                             "\"$(nnfeddah env --root <work folder>)\" or pass -m")
    try:
        name = dataset_under(args.dataset, Path(results), "nnUNet_results")
    except DatasetNotFoundError as exc:
        raise InferenceError(str(exc)) from exc
    return Path(results) / name / model_folder_name(args.plans, args.configuration)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnfeddah predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, dest="input", help="input folder (nnU-Net naming: CASE_0000.nii.gz)")
    parser.add_argument("-o", required=True, dest="output", help="output folder for the merged label maps")
    parser.add_argument("-m", "--model-folder", help="exported results folder (…/FedDAHTrainer__<plans>__3d_fullres)")
    parser.add_argument("-d", "--dataset", help="dataset id/name whose exported folder in $nnUNet_results to use")
    parser.add_argument("-p", "--plans", help="plans identifier (with -d)")
    parser.add_argument("-c", "--configuration", default=CONFIGURATION)
    parser.add_argument("-t", "--tasks", nargs="+", help="task keys to run (default: every exported task)")
    parser.add_argument("-device", "--device", default="cpu", help="cpu (default), cuda or mps")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring (8× slower in 3D)")
    parser.add_argument("--task-maps", action="store_true", help="also write each task's own label map under tasks/")
    args = parser.parse_args(argv)

    def run() -> int | None:
        record = predict_folder(resolve_model_folder(args), args.input, args.output, args.tasks, args.device,
                                args.mirroring, args.task_maps)
        skipped = record["skipped"]
        if not skipped:
            return None
        log = Path(args.output) / MERGE_LOG
        if not record["cases"]:
            print(f"nnfeddah predict: error: none of the {len(skipped)} case(s) could be predicted (reasons above "
                  f"and under 'skipped' in {log}). Fix: replace those files", file=sys.stderr)
            return EXIT_INVALID
        print(f"nnfeddah predict: {len(skipped)} case(s) skipped ({', '.join(skipped)}; reasons above and under "
              f"'skipped' in {log}), {len(record['cases'])} predicted. Fix: replace those files and re-run",
              file=sys.stderr)
        return EXIT_FAILED

    return run_cli("nnfeddah predict", run)


if __name__ == "__main__":
    raise SystemExit(main())
