"""Federated dataset fingerprint: nnU-Net's fingerprint of the union of every site's data, no image leaving a site.

Why: the shared plans decide spacing and CT normalisation for every site, and nnU-Net's premise is that the
dataset fingerprint decides the plans. Planning from one site's statistics is "one site plans for everyone";
averaging the sites' medians and percentiles (FednnU-Net) is wrong, because the percentile of a union is not the
mean of the percentiles; pooling voxel values (Kaapana's accurate mode) sends them off the site.

Site side (:func:`site_statistics`): nnU-Net's own reader, case listing and ``crop_to_nonzero`` and nnU-Net's
foreground definition (cropped label > 0, as in ``DatasetFingerprintExtractor.collect_foreground_intensities``)
on every training case — all foreground voxels, not nnU-Net's random sample — reduced to what may leave the
site (:data:`CONTENTS`, written into the file): per-case spacing, cropped shape and relative size after
cropping, and per channel sums over per-case means and a guarded fixed-grid histogram with voxel counts and
case masses (every case weighs the same, as in nnU-Net's sampling). No voxel value, no per-case intensity
figure, no case id; a site with fewer than :data:`MIN_CASES` labelled cases refuses.

Coordinator side: :func:`~.fingerprint_merge.merge_statistics` (plain numpy) makes the fingerprint;
:func:`plan_federated` runs nnU-Net's own ``ExperimentPlanner`` on it for a free plan, and
``nnfeddah plans install --template … --dataset-fingerprint`` fills a template from it.

CLI: ``nnfeddah fingerprint site -d 501 --out site1.json``; ``nnfeddah fingerprint merge *.json --out F [--plan D]``.
Over a running federation the same two steps are its fingerprint round (:mod:`nnunet_feddah.federation.plans_round`);
for site datasets on one machine, :func:`install_from_site_statistics` (``nnfeddah amos``'s default).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.nnunet.case_checks import CaseError, check_case, label_values
from nnunet_feddah.nnunet.fingerprint_merge import (
    CT_GRID,
    DEFAULT_MIN_COUNT,
    PERCENTILES,
    SITE_FORMAT,
    FingerprintError,
    IntensityGrid,
    merge_statistics,
    parse_grid,
    release_histogram,
)

#: Fewest cases with foreground a site releases statistics of: one case's sums would be that case's own figures.
MIN_CASES = 2
#: Exactly what a site statistics file holds, written into it so a site's data officer can check it.
CONTENTS = (
    "cases.spacings: voxel spacing of every training case (nnU-Net's reader), in case order, no case ids",
    "cases.shapes_after_crop: shape of every training case after nnU-Net's crop_to_nonzero",
    "cases.relative_size_after_cropping: cropped / original voxel count of every training case",
    "channels.<i>.voxels, .cases: foreground voxels of channel i over all training cases, cases that have any",
    "channels.<i>.sum_of_case_means, .sum_of_case_mean_squares: over the cases, each case's foreground mean and "
    "mean of squares (every case weighs the same, as in nnU-Net's fingerprint)",
    "channels.<i>.histogram: [first_bin, stop_bin, voxels, case_mass] runs on the grid; every non-empty run holds "
    "at least min_count voxels (smaller bins merged with a neighbour); empty runs are released as 0, 0",
    "dataset: labels, channel_names, file_ending and numTraining of dataset.json, nnU-Net's image reader class",
)


def _foreground_values(image_files: Sequence[str], label_file: str, reader_writer_class: type,
                       case: str, allowed_labels: set[int]) -> tuple[list[float], list[int], float, list[np.ndarray]]:
    """One case as nnU-Net's fingerprint extractor sees it: spacing, cropped shape, relative size, foreground.

    nnU-Net's reader, nnU-Net's ``crop_to_nonzero``, and its foreground: cropped label > 0 (crop_to_nonzero
    writes -1 outside the body mask), exactly as ``DatasetFingerprintExtractor.analyze_case`` and
    ``collect_foreground_intensities`` do — only without sampling, since nothing but sums and histograms leaves.
    """
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    missing = [f for f in [*image_files, label_file] if not Path(f).is_file()]
    if missing:
        raise FingerprintError(f"case {case!r}: {missing[0]} does not exist (a missing channel or label file); "
                               f"every channel of dataset.json's channel_names needs an image per case")
    try:
        reader = reader_writer_class()
        images, properties = reader.read_images(list(image_files))
        segmentation, label_properties = reader.read_seg(label_file)
    except Exception as exc:  # nnU-Net's readers raise anything from RuntimeError to ITK errors
        raise FingerprintError(f"case {case!r}: cannot read {list(image_files)} / {label_file}: "
                               f"{type(exc).__name__}: {exc}; re-export the case or remove it from imagesTr") from exc
    try:  # geometry, finite values, declared labels: each names its file
        check_case(case, image_files, label_file, images, properties, segmentation, label_properties, allowed_labels)
    except CaseError as exc:
        raise FingerprintError(str(exc)) from None
    cropped, seg_cropped, _ = crop_to_nonzero(images, segmentation)
    foreground = seg_cropped[0] > 0
    relative = float(np.prod(cropped.shape[1:]) / np.prod(images.shape[1:]))
    return ([float(s) for s in properties["spacing"]], [int(s) for s in cropped.shape[1:]], relative,
            [cropped[c][foreground] for c in range(cropped.shape[0])])


def site_statistics(dataset: str | int, grid: IntensityGrid = CT_GRID, min_count: int = DEFAULT_MIN_COUNT,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """What a site releases for the federated fingerprint of its raw training cases (nothing per voxel)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_feddah.nnunet.shared_plans import image_reader_class, raw_dataset_name
    from nnunet_feddah.paths import require_nnunet_env

    started = time.perf_counter()
    name = raw_dataset_name(dataset)
    raw = require_nnunet_env("nnUNet_raw")["nnUNet_raw"] / name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    channels = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not channels:
        raise FingerprintError(f"{raw / 'dataset.json'}: field 'channel_names' is missing; nnU-Net needs it")
    cases = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    if "dataset" not in dataset_json:  # nnU-Net lists cases by their images: a case without any is skipped silently
        ending = dataset_json.get("file_ending", ".nii.gz")
        labelled = {p.name[: -len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}")}
        orphans = sorted(labelled - set(cases))
        if orphans:
            case = orphans[0]
            raise FingerprintError(f"case {case!r}: {raw / 'labelsTr' / (case + ending)} has no image; "
                                   f"{raw / 'imagesTr' / (case + '_0000' + ending)} (channel 0) is missing")
    if not cases:
        raise FingerprintError(f"{raw / 'imagesTr'}: no training cases")
    reader_class = image_reader_class(dataset_json, cases)
    spacings, shapes, relative = [], [], []
    counts = [np.zeros(grid.bins + 2, np.int64) for _ in channels]
    masses = [np.zeros(grid.bins + 2, np.float64) for _ in channels]
    means, squares, with_foreground = [0.0] * len(channels), [0.0] * len(channels), [0] * len(channels)
    for case, files in sorted((str(k), v) for k, v in cases.items()):  # nnU-Net's ids are numpy strings
        if len(files["images"]) != len(channels):
            raise FingerprintError(f"case {case!r}: {len(files['images'])} image file(s) for {len(channels)} "
                                   f"channel(s) of {raw / 'dataset.json'}; add the missing channel")
        spacing, shape, rel, values = _foreground_values(files["images"], files["label"], reader_class, case,
                                                         label_values(dataset_json))
        spacings.append(spacing)
        shapes.append(shape)
        relative.append(rel)
        for c, v in enumerate(values):
            if not v.size:
                continue  # nnU-Net draws no sample from a case without foreground either
            v64 = v.astype(np.float64)
            case_counts = grid.counts(v64)
            counts[c] += case_counts
            masses[c] += case_counts / v64.size
            means[c] += float(v64.mean())
            squares[c] += float(np.square(v64).mean())
            with_foreground[c] += 1
    for c, k in enumerate(channels):
        if with_foreground[c] < MIN_CASES:
            raise FingerprintError(f"{raw}: only {with_foreground[c]} training case(s) with foreground in channel "
                                   f"{k!r}; statistics of fewer than {MIN_CASES} cases would be one case's own "
                                   f"figures, so this site cannot take part (label more cases)")
    stats = {
        "format": SITE_FORMAT, "dataset_name": name, "contents": list(CONTENTS), "min_count": int(min_count),
        "grid": asdict(grid),
        "cases": {"count": len(spacings), "spacings": spacings, "shapes_after_crop": shapes,
                  "relative_size_after_cropping": relative},
        "channels": {str(c): {"name": str(channels[k]), "voxels": int(counts[c].sum()), "cases": with_foreground[c],
                              "sum_of_case_means": means[c], "sum_of_case_mean_squares": squares[c],
                              "histogram": [[a, b, n, float(masses[c][a:b].sum())]
                                            for a, b, n in release_histogram(counts[c], min_count)]}
                     for c, k in enumerate(channels)},
        "dataset": {**{k: dataset_json[k] for k in ("labels", "channel_names", "file_ending", "numTraining")
                       if k in dataset_json}, "image_reader_writer": reader_class.__name__},
    }
    log(f"[fingerprint] {name}: {len(spacings)} cases, "
        + ", ".join(f"channel {c} {v['voxels']} foreground voxels in {len(v['histogram'])} bins"
                    for c, v in stats["channels"].items())
        + f" ({time.perf_counter() - started:.1f} s)")
    return stats


PLANNING_MARKER = "feddah_planning_dataset"


def plan_federated(merged: Mapping[str, Any], dataset_name: str, plans_name: str = "nnUNetPlans",
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """nnU-Net's own ``ExperimentPlanner`` on the merged fingerprint: a free plan for the union of the sites.

    The planner reads a raw ``dataset.json`` and a ``dataset_fingerprint.json``; the coordinator has no images,
    so ``dataset_name`` (``DatasetNNN_Name``) is a *planning dataset*: its ``dataset.json`` describes the union
    (labels, channels, file ending, numTraining = every site's cases, nnU-Net's ``dataset`` key naming each
    case by site — the files stay at the sites and are never opened; the reader is the one the sites used),
    and its fingerprint is the merged one. Returns the plans; they go to the sites with
    ``nnfeddah plans install --plans-file``.
    """
    import contextlib
    import io

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnunet_feddah.paths import require_nnunet_env

    if not dataset_name.startswith("Dataset") or not dataset_name[7:10].isdigit():
        raise FingerprintError(f"planning dataset {dataset_name!r}: use nnU-Net's DatasetNNN_Name form")
    folders = require_nnunet_env("nnUNet_raw", "nnUNet_preprocessed")
    raw = folders["nnUNet_raw"] / dataset_name
    if (raw / "dataset.json").is_file() and PLANNING_MARKER not in json.loads((raw / "dataset.json").read_text()):
        raise FingerprintError(f"{raw}: a real dataset, not a planning dataset of `nnfeddah fingerprint`; "
                               f"choose another DatasetNNN_Name for planning")
    ending = merged["dataset"].get("file_ending", ".nii.gz")
    cases = {f"{Path(site).stem}__{i:04d}": {"images": [f"{Path(site).stem}/imagesTr/case{i:04d}_0000{ending}"],
                                              "label": f"{Path(site).stem}/labelsTr/case{i:04d}{ending}"}
             for site, n in zip(merged["sites"], merged["cases_per_site"], strict=True) for i in range(n)}
    dataset_json = {**{k: v for k, v in merged["dataset"].items() if k != "image_reader_writer"},
                    "overwrite_image_reader_writer": merged["dataset"]["image_reader_writer"],
                    "dataset": cases,
                    PLANNING_MARKER: {"sites": list(merged["sites"]),
                                      "note": "the union of the sites' training cases; the files stay at the sites"}}
    atomic_write_json(raw / "dataset.json", dataset_json)
    atomic_write_json(folders["nnUNet_preprocessed"] / dataset_name / "dataset_fingerprint.json", merged["fingerprint"])
    started = time.perf_counter()
    # the planner's VRAM estimate calls torch.set_num_threads(nnUNet_n_proc_DA), which is 0 in our CPU
    # defaults (augmentation in the training process): give it one thread for the estimate
    saved = os.environ.get("nnUNet_n_proc_DA")
    if saved is not None and int(saved) < 1:
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the planner prints whole plans dicts
            plans = ExperimentPlanner(dataset_name, plans_name=plans_name).plan_experiment()
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    log(f"[fingerprint] nnU-Net's planner on the merged fingerprint: "
        f"{folders['nnUNet_preprocessed'] / dataset_name / (plans_name + '.json')} ({time.perf_counter() - started:.1f} s)")
    return plans


def install_from_site_statistics(datasets: Sequence[str | int], template: str, folder: Path,
                                 num_processes: int = 2, verify: bool = True,
                                 log: Callable[[str], None] = print) -> dict[str, str]:
    """Shared plans for site datasets that live on this machine, planned from the merge of their statistics.

    What ``nnfeddah amos`` does by default (one machine holding a consortium's sites): each dataset's
    statistics, their merged fingerprint and its report land in ``folder``, and ``template`` is filled from
    the merge and installed at every dataset exactly as ``nnfeddah plans install --dataset-fingerprint``
    does. Returns ``{dataset: architecture fingerprint}``.
    """
    from nnunet_feddah.nnunet.shared_plans import install, raw_dataset_name

    statistics = {}
    for dataset in datasets:
        name = raw_dataset_name(dataset)
        statistics[name] = site_statistics(name, log=log)
        write_site_statistics(Path(folder) / f"{name}.json", statistics[name])
    merged = merge_statistics(statistics)
    fingerprint_file = Path(folder) / "dataset_fingerprint.json"
    atomic_write_json(fingerprint_file, merged["fingerprint"])
    atomic_write_json(Path(folder) / "dataset_fingerprint.merge_report.json",
                      {k: merged[k] for k in ("format", "report", "sites", "dataset")})
    return install(datasets, template=template, num_processes=num_processes, verify=verify, log=log,
                   dataset_fingerprint=fingerprint_file)


def write_site_statistics(path: Path, stats: Mapping[str, Any]) -> Path:
    """Atomically write a site's statistics file (the one file that leaves the site)."""
    atomic_write_json(path, stats)
    return path


def read_site_statistics(path: Path) -> dict[str, Any]:
    """A site statistics file, with a clear error for a missing or non-JSON file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise FingerprintError(f"{path}: no such site statistics file; write it with `nnfeddah fingerprint site`") from exc
    except json.JSONDecodeError as exc:
        raise FingerprintError(f"{path}: not JSON ({exc}); write it again with `nnfeddah fingerprint site`") from exc


def main(argv: list[str] | None = None) -> int:
    """``nnfeddah fingerprint site -d 501 --out site1.json`` / ``nnfeddah fingerprint merge a.json b.json --out F``."""
    import argparse

    from nnunet_feddah.errors import run_cli

    parser = argparse.ArgumentParser(prog="nnfeddah fingerprint", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    site = sub.add_parser("site", help="a site's releasable statistics of its raw training cases")
    site.add_argument("-d", "--dataset", required=True, help="dataset id or name in nnUNet_raw")
    site.add_argument("--out", required=True, help="statistics JSON to write (the file that leaves the site)")
    site.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT,
                      help=f"fewest voxels a released histogram bin may hold (default {DEFAULT_MIN_COUNT})")
    site.add_argument("--grid", default="-1024.5:1:4096", help="histogram grid LOW:WIDTH:BINS shared by all sites "
                                                              "(default: 1 HU bins over -1024..3071)")
    merge = sub.add_parser("merge", help="merge site statistics files into one nnU-Net dataset_fingerprint.json")
    merge.add_argument("statistics", nargs="+", help="site statistics files")
    merge.add_argument("--out", required=True, help="dataset_fingerprint.json to write (the report goes beside it)")
    merge.add_argument("--plan", metavar="DatasetNNN_Name", help="also run nnU-Net's default planner on it in this "
                                                                 "planning dataset (a free plan for the union)")
    merge.add_argument("--plans-name", default="nnUNetPlans", help="plans identifier for --plan")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.cmd == "site":
            stats = site_statistics(args.dataset, parse_grid(args.grid), args.min_count)
            print(f"[fingerprint] wrote {write_site_statistics(Path(args.out), stats)}")
            return
        merged = merge_statistics({p: read_site_statistics(Path(p)) for p in args.statistics})
        out = Path(args.out)
        atomic_write_json(out, merged["fingerprint"])
        report = out.with_name(out.stem + ".merge_report.json")
        atomic_write_json(report, {k: merged[k] for k in ("format", "report", "sites", "dataset")})
        for channel, entry in merged["fingerprint"]["foreground_intensity_properties_per_channel"].items():
            bounds = merged["report"][channel]["error_bound"]
            print(f"[fingerprint] channel {channel}: mean {entry['mean']:.2f} std {entry['std']:.2f} "
                  + " ".join(f"{k} {entry[k]:.2f} (±{bounds[k]:.2f})" for k in PERCENTILES))
        print(f"[fingerprint] wrote {out} and {report} from {len(args.statistics)} site(s)")
        if args.plan:
            plan_federated(merged, args.plan, args.plans_name)

    return run_cli("nnfeddah fingerprint", run)


if __name__ == "__main__":
    raise SystemExit(main())
