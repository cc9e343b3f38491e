"""The merge algebra of the federated fingerprint: fixed-grid histograms, the privacy guard, exact sums, bounded percentiles.

Plain numpy: no nnU-Net import, so the coordinator's side can be read, tested and audited on its own.
:mod:`.federated_fingerprint` produces the per-site statistics with nnU-Net's own reading, cropping and
foreground, and plans from the merge.

Why each piece:

* **A fixed grid** (:class:`IntensityGrid`; CT: 1 HU bins over -1024 .. 3071 plus an under- and an overflow
  bin): sites must bin identically, so the grid belongs to the modality, never to the data.
* **The guard** (:func:`release_histogram`): a released non-empty bin holds at least ``min_count`` voxels; a
  smaller one stays open and absorbs its neighbours. Empty bins are released as empty.
* **Equal case weight**: nnU-Net's extractor draws the same number of samples from every case, so its
  fingerprint is that of an equal-weight mixture of the cases. Sites therefore send sums over per-case means
  and a per-bin *case mass* (each case's voxels in the bin / its foreground voxels) beside the voxel counts.
* **Bounded percentiles** (:func:`merged_percentile`): the summed case-mass CDF is inverted between run edges,
  with a guaranteed error bound — one bin where the guard merged nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnunet_feddah.errors import FedDAHError

SITE_FORMAT = "nnunet-feddah-site-fingerprint/1"
MERGED_FORMAT = "nnunet-feddah-merged-fingerprint/1"
DEFAULT_MIN_COUNT = 10
#: nnU-Net's fingerprint percentiles (``DatasetFingerprintExtractor``): 0.5, 50 (median), 99.5.
PERCENTILES = {"percentile_00_5": 0.5, "median": 50.0, "percentile_99_5": 99.5}


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
    voxel fell there); a last run that stays short ends at its last voxel and joins the full run before it,
    with the empty runs between them. A channel with fewer than ``min_count`` voxels in all becomes a
    single non-empty run.
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
    if held:  # a short open run [start, n): it ends at its last voxel, the empty bins after it stay empty
        last = start + int(np.flatnonzero(np.asarray(counts[start:]))[-1]) + 1
        while bounds and bounds[-1][2]:
            start = bounds.pop()[0]
        if bounds:
            start = bounds.pop()[0]
        bounds.append([start, last, False])
        if last < len(counts):
            bounds.append([last, len(counts), True])
    cumulative = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    return [[a, b, int(cumulative[b] - cumulative[a])] for a, b, _ in bounds]


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


def parse_grid(text: str) -> IntensityGrid:
    """``LOW:WIDTH:BINS`` (e.g. ``-1024.5:1:4096``, the CT default) -> a grid, with the flag named on error."""
    try:
        low, width, bins = text.split(":")
        return IntensityGrid.from_json({"low": low, "width": width, "bins": bins}, "--grid")
    except ValueError as exc:
        raise FingerprintError(f"--grid {text!r}: expected LOW:WIDTH:BINS, e.g. -1024.5:1:4096 ({exc})") from exc
