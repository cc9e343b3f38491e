"""Federated dataset fingerprint: nnU-Net's fingerprint of the union of every site's data, no image leaving a site.

Why: the shared plans decide spacing and CT normalisation for every site, and nnU-Net's premise is that the
dataset fingerprint decides the plans. Planning from one site's statistics is "one site plans for everyone";
averaging the sites' medians and percentiles (FednnU-Net) is wrong, because the percentile of a union is not the
mean of the percentiles; pooling voxel values (Kaapana's accurate mode) sends them off the site.

Site side (:func:`site_statistics`): nnU-Net's own reader and ``crop_to_nonzero`` and nnU-Net's foreground
definition (cropped label > 0, as in ``DatasetFingerprintExtractor.collect_foreground_intensities``) on every
training case, reduced to what may leave the site: per-case spacing, cropped shape and relative size after
cropping (metadata nnU-Net's planner needs), and per channel sums and a histogram on a fixed grid (1 HU bins
for CT) in which every non-empty bin holds at least ``min_count`` voxels — smaller bins are merged with their
neighbours (:func:`release_histogram`). No voxel value and no per-case intensity figure is released; the file
lists exactly what it contains.

**Every case weighs the same**, as in nnU-Net: its extractor draws the same number of foreground samples from
every case (with replacement, so that small cases are not underrepresented), so its statistics are those of an
equal-weight mixture of the cases, not of the pooled voxels. The sums are therefore over per-case means (the
sum of the cases' means and of their mean squares) and each histogram bin carries, beside its voxel count, its
*case mass* (sum over cases of the case's voxels in the bin / the case's foreground voxels). Weighting by voxels
instead would let a site with a finer scanner (more voxels per case) dominate.

Coordinator side (:func:`merge_statistics`): mean and std exact from the sums; median and the 0.5 / 99.5
percentiles by inverting the sum of the sites' case-mass CDFs, each with a guaranteed error bound (one bin,
1 HU, where no bin around it was merged); spacings, shapes and relative sizes concatenated. The result is an
ordinary ``dataset_fingerprint.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.errors import FedDAHError

SITE_FORMAT = "nnunet-feddah-site-fingerprint/1"
MERGED_FORMAT = "nnunet-feddah-merged-fingerprint/1"
DEFAULT_MIN_COUNT = 10
#: Fewest cases with foreground a site releases statistics of: one case's sums would be that case's own figures.
MIN_CASES = 2
#: nnU-Net's fingerprint percentiles (``DatasetFingerprintExtractor``): 0.5, 50 (median), 99.5.
PERCENTILES = {"percentile_00_5": 0.5, "median": 50.0, "percentile_99_5": 99.5}
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


class FingerprintError(FedDAHError, ValueError):
    """A case that cannot be read, a statistics file that cannot be merged; names the case/file, field and fix."""


@dataclass(frozen=True)
class IntensityGrid:
    """The fixed histogram bins every site uses: ``bins`` bins of ``width`` from ``low``, plus one bin below
    and one above (open-ended). Sites must share it, so it is fixed per modality, never fitted to the data."""

    low: float
    width: float
    bins: int

    def edges(self) -> np.ndarray:
        """``bins + 3`` edges: ``-inf``, the ``bins + 1`` grid edges, ``+inf`` (under- and overflow bins)."""
        inner = self.low + self.width * np.arange(self.bins + 1, dtype=np.float64)
        return np.concatenate([[-np.inf], inner, [np.inf]])

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Voxel counts per bin (``bins + 2`` entries, under- and overflow first and last)."""
        index = np.floor((values.astype(np.float64) - self.low) / self.width)
        index = np.clip(index, -1, self.bins).astype(np.int64) + 1
        return np.bincount(index, minlength=self.bins + 2).astype(np.int64)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> IntensityGrid:
        try:
            grid = cls(float(data["low"]), float(data["width"]), int(data["bins"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FingerprintError(f"{where}: field 'grid' must be {{low, width, bins}} ({exc})") from exc
        if not (grid.width > 0 and grid.bins > 0 and math.isfinite(grid.low)):
            raise FingerprintError(f"{where}: field 'grid' needs width > 0, bins > 0 and a finite low: {data}")
        return grid


#: CT: 1 HU bins centred on integer HU over the full CT range -1024 .. 3071 (percentile error <= 1 HU where the
#: privacy guard merged no bin).
CT_GRID = IntensityGrid(low=-1024.5, width=1.0, bins=4096)


def release_histogram(counts: np.ndarray, min_count: int = DEFAULT_MIN_COUNT) -> list[list[int]]:
    """Runs ``[first_bin, stop_bin, count]`` covering every bin, each non-empty run holding >= ``min_count``.

    Walking up the grid, a non-empty run stays open (absorbing the bins after it, empty or not) until it holds
    ``min_count`` voxels; empty bins between runs are released as empty runs (an empty bin says only that no
    voxel fell there); a last run that stays short is merged into the full run before it, with the empty runs
    between them. A channel with fewer than ``min_count`` voxels in all becomes a single run.
    """
    if min_count < 1:
        raise FingerprintError(f"min_count must be >= 1 (got {min_count})")
    bounds: list[list[Any]] = []  # [start, stop, empty]
    start, held = 0, 0
    for i, c in enumerate(int(v) for v in counts):
        if held == 0 and c == 0:
            if bounds and bounds[-1][2] and bounds[-1][1] == i:
                bounds[-1][1] = i + 1
            else:
                bounds.append([i, i + 1, True])
            start = i + 1
            continue
        held += c
        if held >= min_count:
            bounds.append([start, i + 1, False])
            start, held = i + 1, 0
    if held:
        while bounds and bounds[-1][2]:
            start = bounds.pop()[0]
        if bounds:
            start = bounds.pop()[0]
        bounds.append([start, len(counts), False])
    cumulative = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    return [[a, b, int(cumulative[b] - cumulative[a])] for a, b, _ in bounds]


def _foreground_values(image_files: Sequence[str], label_file: str, reader_writer_class: type,
                       case: str) -> tuple[list[float], list[int], float, list[np.ndarray]]:
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
        segmentation, _ = reader.read_seg(label_file)
    except Exception as exc:  # nnU-Net's readers raise anything from RuntimeError to ITK errors
        raise FingerprintError(f"case {case!r}: cannot read {list(image_files)} / {label_file}: "
                               f"{type(exc).__name__}: {exc}; re-export the case or remove it from imagesTr") from exc
    if images.shape[1:] != segmentation.shape[1:]:
        raise FingerprintError(f"case {case!r}: image shape {images.shape[1:]} != label shape "
                               f"{segmentation.shape[1:]} ({label_file}); the label must match its image")
    if not np.isfinite(images).all():
        raise FingerprintError(f"case {case!r}: {list(image_files)} contains NaN or infinite values")
    cropped, seg_cropped, _ = crop_to_nonzero(images, segmentation)
    foreground = seg_cropped[0] > 0
    relative = float(np.prod(cropped.shape[1:]) / np.prod(images.shape[1:]))
    return ([float(s) for s in properties["spacing"]], [int(s) for s in cropped.shape[1:]], relative,
            [cropped[c][foreground] for c in range(cropped.shape[0])])


def site_statistics(dataset: str | int, grid: IntensityGrid = CT_GRID, min_count: int = DEFAULT_MIN_COUNT,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """What a site releases for the federated fingerprint of its raw training cases (nothing per voxel)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_feddah.nnunet.shared_plans import raw_dataset_name
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
    first = next(iter(cases.values()))["images"][0]
    reader_class = determine_reader_writer_from_dataset_json(dataset_json, first, allow_nonmatching_filename=True,
                                                             verbose=False)
    spacings, shapes, relative = [], [], []
    counts = [np.zeros(grid.bins + 2, np.int64) for _ in channels]
    masses = [np.zeros(grid.bins + 2, np.float64) for _ in channels]
    means, squares, with_foreground = [0.0] * len(channels), [0.0] * len(channels), [0] * len(channels)
    for case, files in sorted((str(k), v) for k, v in cases.items()):  # nnU-Net's ids are numpy strings
        if len(files["images"]) != len(channels):
            raise FingerprintError(f"case {case!r}: {len(files['images'])} image file(s) for {len(channels)} "
                                   f"channel(s) of {raw / 'dataset.json'}; add the missing channel")
        spacing, shape, rel, values = _foreground_values(files["images"], files["label"], reader_class, case)
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


def _runs(stats: Mapping[str, Any], channel: str, edges: np.ndarray, where: str) -> np.ndarray:
    """A site's released runs of one channel as rows ``(low edge, high edge, case mass)``, checked.

    Also audits the site's privacy guard: a non-empty run below the file's ``min_count`` is refused.
    """
    entry = stats["channels"][channel]
    runs = np.asarray(entry["histogram"], dtype=np.float64).reshape(-1, 4)
    n = len(edges) - 1
    if (runs.size == 0 or runs[0, 0] != 0 or runs[-1, 1] != n or (runs[1:, 0] != runs[:-1, 1]).any()
            or (runs[:, 2:] < 0).any() or int(runs[:, 2].sum()) != int(entry["voxels"])
            or not math.isclose(float(runs[:, 3].sum()), float(entry["cases"]), rel_tol=1e-9, abs_tol=1e-9)):
        raise FingerprintError(f"{where}: channels.{channel}.histogram must be [first, stop, voxels, case_mass] "
                               f"runs covering all {n} bins of the grid in order, their voxels summing to "
                               f"channels.{channel}.voxels and their case mass to channels.{channel}.cases")
    short = runs[(runs[:, 2] > 0) & (runs[:, 2] < int(stats.get("min_count", 1)))]
    if len(short):
        raise FingerprintError(f"{where}: channels.{channel}.histogram releases a bin of {int(short[0, 2])} voxels, "
                               f"below the file's min_count {stats.get('min_count')}; write it again with "
                               f"`nnfeddah fingerprint site`")
    return np.stack([edges[runs[:, 0].astype(int)], edges[runs[:, 1].astype(int)], runs[:, 3]], axis=1)


def merged_percentile(runs: Sequence[np.ndarray], grid: IntensityGrid, q: float) -> tuple[float, float]:
    """The ``q``-th percentile of the union of the sites' voxels, and a guaranteed bound on its error.

    Estimate: the CDF of the union is the sum of the sites' piecewise-linear CDFs (each run spreads its count
    uniformly), inverted between the run edges. Bound: whatever the voxels inside the runs are, the true
    percentile x* has ``mass of runs ending at or below x* <= target <= mass of runs starting below x*``;
    the smallest run start ``a`` and the largest run end ``b`` allowing that bracket x*, and the bound is
    ``max(estimate - a, b - estimate)`` — one bin width (1 HU on the CT grid) where no bin was merged.
    """
    finite = (grid.low, grid.low + grid.width * grid.bins)
    rows = np.concatenate([r for r in runs if len(r)])
    rows = rows[rows[:, 2] > 0]
    lo, hi, count = np.clip(rows[:, 0], *finite), np.clip(rows[:, 1], *finite), rows[:, 2]
    target = float(count.sum()) * q / 100.0
    points = np.unique(np.concatenate([lo, hi]))
    width = np.maximum(hi - lo, 1e-12)
    masses = np.array([(count * np.clip((p - lo) / width, 0.0, 1.0)).sum() for p in points])
    k = int(np.searchsorted(masses, target, side="left"))
    if k == 0:
        value = float(points[0])
    elif k >= len(points):
        value = float(points[-1])
    else:
        p0, p1 = points[k - 1], points[k]
        value = float(p0 + (p1 - p0) * (target - masses[k - 1]) / max(masses[k] - masses[k - 1], 1e-12))
    by_start, by_end = np.argsort(lo, kind="stable"), np.argsort(hi, kind="stable")
    a = float(lo[by_start][min(int(np.searchsorted(np.cumsum(count[by_start]), target, side="left")), len(lo) - 1)])
    b = float(hi[by_end][min(int(np.searchsorted(np.cumsum(count[by_end]), target, side="right")), len(hi) - 1)])
    return value, max(value - a, b - value, 0.0)


def merge_statistics(statistics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every site's statistics -> ``{"fingerprint": nnU-Net dataset_fingerprint, "report": bounds and sizes}``.

    ``statistics`` maps a label (file name or site) to its statistics. Sites must share the grid, the channels
    and the labels; the fingerprint's spacings/shapes run over the sites in the given order.
    """
    if not statistics:
        raise FingerprintError("no site statistics to merge")
    items = list(statistics.items())
    for where, stats in items:
        if stats.get("format") != SITE_FORMAT:
            raise FingerprintError(f"{where}: field 'format' is {stats.get('format')!r}, expected {SITE_FORMAT!r}; "
                                   f"write it with `nnfeddah fingerprint site`")
        for key in ("grid", "cases", "channels", "dataset"):
            if not isinstance(stats.get(key), dict):
                raise FingerprintError(f"{where}: field '{key}' is missing or not an object; write the file again "
                                       f"with `nnfeddah fingerprint site`")
    first_where, first = items[0]
    grid = IntensityGrid.from_json(first["grid"], first_where)
    for where, stats in items[1:]:
        if IntensityGrid.from_json(stats["grid"], where) != grid:
            raise FingerprintError(f"{where}: field 'grid' {stats['grid']} differs from {first_where}'s "
                                   f"{first['grid']}; every site must use the same grid")
        if set(stats["channels"]) != set(first["channels"]):
            raise FingerprintError(f"{where}: field 'channels' has {sorted(stats['channels'])}, {first_where} has "
                                   f"{sorted(first['channels'])}; the sites must image the same channels")
        for key in ("labels", "channel_names", "file_ending", "image_reader_writer"):
            if stats["dataset"].get(key) != first["dataset"].get(key):
                raise FingerprintError(f"{where}: field 'dataset.{key}' differs from {first_where}'s; the sites "
                                       f"must describe the same task ({stats['dataset'].get(key)} vs "
                                       f"{first['dataset'].get(key)})")
    edges = grid.edges()
    properties, report = {}, {}
    for channel in first["channels"]:
        runs = [_runs(stats, channel, edges, where) for where, stats in items]
        cases = sum(int(stats["channels"][channel]["cases"]) for _, stats in items)
        if cases == 0:
            raise FingerprintError(f"channel {channel}: no site has foreground voxels; label the training cases")
        mean = sum(float(stats["channels"][channel]["sum_of_case_means"]) for _, stats in items) / cases
        square = sum(float(stats["channels"][channel]["sum_of_case_mean_squares"]) for _, stats in items) / cases
        std = math.sqrt(max(square - mean * mean, 0.0))
        entry: dict[str, float] = {"mean": mean, "std": std}
        bounds: dict[str, float] = {}
        for key, q in PERCENTILES.items():
            entry[key], bounds[key] = merged_percentile(runs, grid, q)
        nonempty = np.concatenate([r[r[:, 2] > 0] for r in runs])
        entry["min"], entry["max"] = float(np.nanmin(nonempty[:, 0])), float(np.nanmax(nonempty[:, 1]))
        if not math.isfinite(entry["min"]):
            entry["min"] = grid.low
        if not math.isfinite(entry["max"]):
            entry["max"] = grid.low + grid.width * grid.bins
        properties[channel] = {k: float(entry[k]) for k in
                               ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")}
        report[channel] = {"voxels": sum(int(stats["channels"][channel]["voxels"]) for _, stats in items),
                           "cases": cases, "error_bound": bounds,
                           "min_max_are_bin_edges": True, "sites": len(items)}
    spacings = [s for _, stats in items for s in stats["cases"]["spacings"]]
    shapes = [s for _, stats in items for s in stats["cases"]["shapes_after_crop"]]
    relative = [s for _, stats in items for s in stats["cases"]["relative_size_after_cropping"]]
    fingerprint = {"spacings": spacings, "shapes_after_crop": shapes,
                   "foreground_intensity_properties_per_channel": properties,
                   "median_relative_size_after_cropping": float(np.median(relative))}
    dataset = {**first["dataset"], "numTraining": sum(int(stats["cases"]["count"]) for _, stats in items)}
    return {"format": MERGED_FORMAT, "fingerprint": fingerprint, "report": report,
            "sites": [where for where, _ in items], "dataset": dataset,
            "cases_per_site": [int(stats["cases"]["count"]) for _, stats in items]}


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


def parse_grid(text: str) -> IntensityGrid:
    """``LOW:WIDTH:BINS`` (e.g. ``-1024.5:1:4096``, the CT default) -> a grid, with the flag named on error."""
    try:
        low, width, bins = text.split(":")
        return IntensityGrid.from_json({"low": low, "width": width, "bins": bins}, "--grid")
    except ValueError as exc:
        raise FingerprintError(f"--grid {text!r}: expected LOW:WIDTH:BINS, e.g. -1024.5:1:4096 ({exc})") from exc


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
