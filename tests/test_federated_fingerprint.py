"""Federated fingerprint (issue 15): what a site releases, and the merged fingerprint against the pooled one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_feddah.nnunet.federated_fingerprint import site_statistics
from nnunet_feddah.nnunet.fingerprint_merge import (
    CT_GRID,
    PERCENTILES,
    SITE_FORMAT,
    FingerprintError,
    IntensityGrid,
    merge_statistics,
    release_histogram,
)

SITES = (781, 782, 783)  # three phantom sites with different scanners
POOLED = 789


def _hand_statistics(cases: list[np.ndarray], grid: IntensityGrid, min_count: int = 10) -> dict:
    """A site statistics record built directly from its cases' foreground values (the merge's algebra only)."""
    cases = [c.astype(np.float64) for c in cases]
    counts = sum(grid.counts(c) for c in cases)
    mass = sum(grid.counts(c) / c.size for c in cases)
    return {"format": SITE_FORMAT, "grid": {"low": grid.low, "width": grid.width, "bins": grid.bins},
            "min_count": min_count,
            "cases": {"count": len(cases), "spacings": [[1.0, 1.0, 1.0]] * len(cases),
                      "shapes_after_crop": [[1, 1, c.size] for c in cases],
                      "relative_size_after_cropping": [1.0] * len(cases)},
            "channels": {"0": {"name": "CT", "voxels": int(counts.sum()), "cases": len(cases),
                               "sum_of_case_means": float(sum(c.mean() for c in cases)),
                               "sum_of_case_mean_squares": float(sum(np.square(c).mean() for c in cases)),
                               "histogram": [[a, b, n, float(mass[a:b].sum())]
                                             for a, b, n in release_histogram(counts, min_count)]}},
            "dataset": {"labels": {"background": 0, "x": 1}, "channel_names": {"0": "CT"}}}


def _equal_case_weight(cases: list[np.ndarray]) -> tuple[float, float, Callable[[float], float]]:
    """Mean, std and percentile of the equal-weight mixture of the cases (what nnU-Net's fingerprint estimates)."""
    values = np.concatenate(cases).astype(np.float64)
    weights = np.concatenate([np.full(c.size, 1.0 / c.size) for c in cases])
    mean = float(np.sum(weights * values) / len(cases))
    std = float(np.sqrt(np.sum(weights * np.square(values)) / len(cases) - mean**2))
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order]) / len(cases)

    def percentile(q: float) -> float:
        return float(values[order][min(int(np.searchsorted(cumulative, q / 100.0)), len(values) - 1)])

    return mean, std, percentile


def test_release_guard_keeps_every_nonempty_bin_above_min_count():
    rng = np.random.default_rng(0)
    counts = CT_GRID.counts(np.concatenate([rng.normal(60, 15, 5000), rng.normal(300, 200, 40), [-3000, 5000]]))
    runs = release_histogram(counts, min_count=10)
    assert runs[0][0] == 0 and runs[-1][1] == len(counts)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))  # contiguous, in order
    assert sum(r[2] for r in runs) == counts.sum()
    assert all(r[2] == 0 or r[2] >= 10 for r in runs)
    assert any(r[1] - r[0] > 1 and r[2] > 0 for r in runs)  # the sparse tails were merged
    assert release_histogram(np.array([0, 3, 0, 2]), 10) == [[0, 4, 5]]  # fewer than min_count in all: one run
    with pytest.raises(FingerprintError, match="min_count"):
        release_histogram(counts, min_count=0)


def test_merge_is_exact_in_moments_and_within_one_bin_in_percentiles():
    """Three 'scanners' with different offsets, noise and case sizes; the statistics of the union of their cases
    (every case weighing the same, as in nnU-Net), not an average of the sites' statistics."""
    rng = np.random.default_rng(1)
    sites = [[rng.normal(60, 15, 80_000), rng.normal(62, 15, 120_000)], [rng.normal(95, 30, 70_000)],
             [rng.normal(40, 8, 30_000), rng.normal(45, 9, 20_000), rng.normal(38, 8, 25_000)]]
    merged = merge_statistics({f"site{i}": _hand_statistics(cases, CT_GRID) for i, cases in enumerate(sites)})
    mean, std, percentile = _equal_case_weight([c for cases in sites for c in cases])
    props = merged["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
    assert props["mean"] == pytest.approx(mean, rel=1e-12)
    assert props["std"] == pytest.approx(std, rel=1e-9)
    for key, q in PERCENTILES.items():
        bound = merged["report"]["0"]["error_bound"][key]
        # 1 HU bins; in the 99.5 % tail the guard merged some sites' sparse bins, and the bound says so
        assert bound <= (1.0 if key == "median" else 2.0), (key, bound)
        assert abs(props[key] - percentile(q)) <= bound
    naive_median = np.mean([np.median(np.concatenate(cases)) for cases in sites])  # averaging the sites' medians
    assert abs(naive_median - percentile(50)) > 5 * abs(props["median"] - percentile(50))


def test_the_error_bound_holds_where_the_guard_merged_bins():
    """Sparse sites and a high min_count: wide released bins, and the truth still lies within the bound."""
    rng = np.random.default_rng(2)
    for trial in range(20):
        sites = [[rng.normal(rng.uniform(-50, 150), rng.uniform(5, 80), int(rng.integers(30, 400)))
                  for _ in range(int(rng.integers(1, 3)))] for _ in range(int(rng.integers(1, 5)))]
        merged = merge_statistics({f"s{i}": _hand_statistics(c, CT_GRID, min_count=25) for i, c in enumerate(sites)})
        _, _, percentile = _equal_case_weight([c for cases in sites for c in cases])
        props = merged["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
        for key, q in PERCENTILES.items():
            bound = merged["report"]["0"]["error_bound"][key]
            assert abs(props[key] - percentile(q)) <= bound + 1e-9, (trial, key, bound)


def test_merge_refuses_mismatched_sites():
    a = _hand_statistics([np.arange(100.0)], CT_GRID)
    b = _hand_statistics([np.arange(100.0)], IntensityGrid(-1000.0, 2.0, 100))
    with pytest.raises(FingerprintError, match="grid"):
        merge_statistics({"a.json": a, "b.json": b})
    c = _hand_statistics([np.arange(100.0)], CT_GRID)
    c["dataset"]["labels"] = {"background": 0, "y": 1}
    with pytest.raises(FingerprintError, match="dataset.labels"):
        merge_statistics({"a.json": a, "c.json": c})
    d = json.loads(json.dumps(a))
    d["channels"]["0"]["histogram"][0][2] += 1
    with pytest.raises(FingerprintError, match="channels.0.histogram"):
        merge_statistics({"a.json": a, "d.json": d})
    e = json.loads(json.dumps(a))  # a site that bypassed its own guard is refused
    e["min_count"] = 1000
    with pytest.raises(FingerprintError, match="below the file's min_count 1000"):
        merge_statistics({"a.json": a, "e.json": e})
    with pytest.raises(FingerprintError, match="format"):
        merge_statistics({"e.json": {"format": "something else"}})
    with pytest.raises(FingerprintError, match="field 'channels' is missing"):
        merge_statistics({"f.json": {k: v for k, v in a.items() if k != "channels"}})


@pytest.fixture(scope="module")
def scanner_sites(nnunet_work: Path) -> dict:
    """Three phantom sites (different scanners) and one pooled dataset holding all their training cases."""
    from nnunet_feddah.data import phantom

    raw = nnunet_work / "nnUNet_raw"
    phantom.write_cohort(raw, num_sites=3, num_train=3, num_test=0, seed=11, first_dataset_id=SITES[0])
    names = sorted(p.name for p in raw.iterdir() if p.name[7:10] in {str(s) for s in SITES})
    pooled = raw / f"Dataset{POOLED}_FedDAHPooledFingerprint"
    if pooled.exists():
        shutil.rmtree(pooled)
    (pooled / "imagesTr").mkdir(parents=True)
    (pooled / "labelsTr").mkdir()
    for name in names:
        for kind in ("imagesTr", "labelsTr"):
            for f in (raw / name / kind).iterdir():
                os.link(f, pooled / kind / f"{name[:10]}_{f.name}")
    dataset_json = json.loads((raw / names[0] / "dataset.json").read_text())
    dataset_json["numTraining"] = 3 * len(names)
    (pooled / "dataset.json").write_text(json.dumps(dataset_json))
    return {"raw": raw, "names": names, "pooled": pooled.name}


def _pooled_foreground(pooled: Path) -> list[np.ndarray]:
    """Every pooled case's foreground voxels, read straight from the files (no nnU-Net, no project code).

    The phantom's CT is nowhere 0 (air is -1000 HU), so nnU-Net's crop_to_nonzero keeps the whole image.
    """
    values = []
    for label_file in sorted((pooled / "labelsTr").iterdir()):
        image_file = pooled / "imagesTr" / label_file.name.replace(".nii.gz", "_0000.nii.gz")
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))).astype(np.float64)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
        values.append(image[labels > 0])
    return values


def test_merged_fingerprint_matches_nnunets_pooled_fingerprint(scanner_sites: dict):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    stats = {name: site_statistics(name, log=lambda *_: None) for name in scanner_sites["names"]}
    for s in stats.values():  # nothing per case beyond the planner's metadata, nothing per voxel
        assert set(s) == {"format", "dataset_name", "contents", "min_count", "grid", "cases", "channels", "dataset"}
        assert set(s["channels"]["0"]) == {"name", "voxels", "cases", "sum_of_case_means",
                                           "sum_of_case_mean_squares", "histogram"}
        assert all(r[2] == 0 or r[2] >= s["min_count"] for r in s["channels"]["0"]["histogram"])
    merged = merge_statistics(stats)
    pooled = extract_fingerprint_dataset(POOLED, num_processes=2, check_dataset_integrity=False, clean=True,
                                         verbose=False, show_progress_bar=False)
    ours = merged["fingerprint"]
    # cases: the pooled folder sorts as site 1, site 2, site 3 (its ids are prefixed by the site's dataset)
    assert np.allclose(ours["spacings"], pooled["spacings"])
    assert [list(s) for s in ours["shapes_after_crop"]] == [list(s) for s in pooled["shapes_after_crop"]]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(pooled["median_relative_size_after_cropping"])
    cases = _pooled_foreground(scanner_sites["raw"] / scanner_sites["pooled"])
    mean, std, percentile = _equal_case_weight(cases)
    props, theirs = ours["foreground_intensity_properties_per_channel"]["0"], \
        pooled["foreground_intensity_properties_per_channel"][0]
    assert props["mean"] == pytest.approx(mean, rel=1e-9)  # exact: nnU-Net's voxels, every case weighing the same
    assert props["std"] == pytest.approx(std, rel=1e-6)
    lowest, highest = min(c.min() for c in cases), max(c.max() for c in cases)
    assert 0 <= lowest - props["min"] <= 1.0 and 0 <= props["max"] - highest <= 1.0  # the edges of their bins
    assert merged["report"]["0"]["error_bound"]["median"] <= 1.0  # 1 HU bins, dense there: nothing merged
    for key, q in PERCENTILES.items():
        # in the sparse tails the privacy guard widens the released bins; the bound widens with them, and holds
        bound = merged["report"]["0"]["error_bound"][key]
        assert abs(props[key] - percentile(q)) <= bound, key
        assert abs(props[key] - theirs[key]) <= bound + 1.0, key  # nnU-Net samples the voxels; we count them all
    # nnU-Net's own mean and std (from its random sample of ~10^7 voxels per case) agree to sampling error
    assert props["mean"] == pytest.approx(theirs["mean"], abs=0.1)
    assert props["std"] == pytest.approx(theirs["std"], rel=1e-3)


def test_a_case_with_a_missing_channel_or_a_corrupt_image_is_named(scanner_sites: dict, tmp_path: Path):
    raw = scanner_sites["raw"]
    source = raw / scanner_sites["names"][0]
    broken = raw / "Dataset788_FedDAHBrokenFingerprint"
    if broken.exists():
        shutil.rmtree(broken)
    shutil.copytree(source, broken)
    images = sorted((broken / "imagesTr").iterdir())
    images[1].unlink()
    with pytest.raises(FingerprintError, match=images[1].name.replace("_0000.nii.gz", "")):
        site_statistics(788, log=lambda *_: None)
    shutil.copy(images[0], images[1])
    images[2].write_bytes(b"not a nifti file")
    with pytest.raises(FingerprintError, match=f"case '{images[2].name.replace('_0000.nii.gz', '')}'"):
        site_statistics(788, log=lambda *_: None)


def test_offline_transport_two_small_files_per_site(scanner_sites: dict, tmp_path: Path, capsys):
    """`nnfeddah fingerprint site` at each site, `... merge` anywhere: the same fingerprint as the API."""
    from nnunet_feddah.nnunet.federated_fingerprint import main

    files = []
    for name in scanner_sites["names"]:
        files.append(str(tmp_path / f"{name}.json"))
        assert main(["site", "-d", name, "--out", files[-1]]) == 0
    out = tmp_path / "merged" / "dataset_fingerprint.json"
    assert main(["merge", *files, "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    expected = merge_statistics({f: json.loads(Path(f).read_text()) for f in files})["fingerprint"]
    assert written == json.loads(json.dumps(expected))
    assert json.loads(out.with_name("dataset_fingerprint.merge_report.json").read_text())["sites"] == files
    assert "percentile_99_5" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "no such site statistics file" in capsys.readouterr().err


def test_template_plans_from_the_merged_fingerprint(scanner_sites: dict, tmp_path: Path):
    """Equal to the plans of the pooled dataset except the intensity statistics; different from site 1's alone."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    from nnunet_feddah.nnunet import shared_plans

    names = scanner_sites["names"]
    merged = merge_statistics({n: site_statistics(n, log=lambda *_: None) for n in names})["fingerprint"]
    for dataset in (*(int(n[7:10]) for n in names), POOLED):
        extract_fingerprint_dataset(dataset, num_processes=2, check_dataset_integrity=False, clean=True,
                                    verbose=False, show_progress_bar=False)
    template = shared_plans.load_template("cpu")
    ours = shared_plans.plans_from_template(template, names[0], merged)
    pooled = shared_plans.plans_from_template(template, scanner_sites["pooled"])
    alone = shared_plans.plans_from_template(template, names[0])
    key = "foreground_intensity_properties_per_channel"
    strip = lambda p: {k: v for k, v in p.items() if k not in (key, "dataset_name")}  # noqa: E731
    assert strip(ours) == strip(pooled)
    for stat in ("mean", "std", "median", "percentile_00_5", "percentile_99_5"):
        assert abs(ours[key]["0"][stat] - pooled[key]["0"][stat]) <= 1.5, stat  # one bin + nnU-Net's sampling
    # sites with other scanners move the CT normalisation away from what site 1 alone would give
    assert abs(ours[key]["0"]["mean"] - alone[key]["0"]["mean"]) > 2.0
    assert abs(ours[key]["0"]["percentile_99_5"] - alone[key]["0"]["percentile_99_5"]) > 2.0
    fingerprint_file = tmp_path / "dataset_fingerprint.json"
    fingerprint_file.write_text(json.dumps(merged))
    assert shared_plans.read_dataset_fingerprint(fingerprint_file) == merged
    fingerprint_file.write_text("{}")
    with pytest.raises(shared_plans.SharedPlansError, match="field 'spacings' is missing"):
        shared_plans.read_dataset_fingerprint(fingerprint_file)


def test_a_site_with_a_single_labelled_case_refuses(scanner_sites: dict):
    """One case's sums and histogram would be that case's own figures: not released."""
    raw = scanner_sites["raw"]
    single = raw / "Dataset787_FedDAHSingleCase"
    if single.exists():
        shutil.rmtree(single)
    shutil.copytree(raw / scanner_sites["names"][0], single)
    for kind in ("imagesTr", "labelsTr"):
        for f in sorted((single / kind).iterdir())[1:]:
            f.unlink()
    with pytest.raises(FingerprintError, match="only 1 training case"):
        site_statistics(787, log=lambda *_: None)


def test_nnunets_planner_on_the_merged_fingerprint_plans_like_on_the_pooled_dataset(scanner_sites: dict, capsys):
    """A free plan: nnU-Net's default planner, equal to its plans for the pooled dataset but for the intensities."""
    import contextlib
    import io

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    from nnunet_feddah.nnunet.federated_fingerprint import plan_federated

    merged = merge_statistics({n: site_statistics(n, log=lambda *_: None) for n in scanner_sites["names"]})
    ours = plan_federated(merged, "Dataset786_FedDAHFederatedPlan", log=lambda *_: None)
    extract_fingerprint_dataset(POOLED, num_processes=2, check_dataset_integrity=False, clean=True, verbose=False,
                                show_progress_bar=False)
    with contextlib.redirect_stdout(io.StringIO()), pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's planner sets torch threads to it (0 in our CPU defaults)
        pooled = ExperimentPlanner(scanner_sites["pooled"]).plan_experiment()
    key = "foreground_intensity_properties_per_channel"
    strip = lambda p: json.loads(json.dumps({k: v for k, v in p.items() if k not in (key, "dataset_name")}))  # noqa: E731
    assert strip(ours) == strip(pooled)
    assert ours["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    for stat in ("mean", "std", "median", "percentile_00_5", "percentile_99_5"):
        assert abs(ours[key]["0"][stat] - pooled[key]["0"][stat]) <= 1.5 + merged["report"]["0"]["error_bound"].get(
            stat, 0.0), stat
    with pytest.raises(FingerprintError, match="a real dataset"):
        plan_federated(merged, scanner_sites["names"][0], log=lambda *_: None)
