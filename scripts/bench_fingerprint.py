"""Pooled vs merged fingerprint: what each way of planning a consortium's CT normalisation gives, on the phantom.

Prints numbers, asserts nothing. One phantom cohort of ``--sites`` sites (distinct scanners) is written to a
throwaway nnU-Net root, plus a *pooled* dataset holding every site's training cases (what a consortium that
could share images would fingerprint). Per route, nnU-Net's CT normalisation statistics (foreground mean,
std, median, 0.5 / 99.5 percentiles):

* ``truth`` — the equal-case-weight statistics of the pooled foreground voxels, read straight from the files
  (nnU-Net's extractor draws the same number of samples per case, so this is what it estimates);
* ``nnU-Net pooled`` — nnU-Net's own ``DatasetFingerprintExtractor`` on the pooled dataset (voxels pooled:
  Kaapana's "accurate" mode; its random sampling is its only error);
* ``merged (ours)`` — the merge of every site's released statistics (:mod:`nnunet_feddah.nnunet.fingerprint_merge`);
* ``site 1 alone`` — nnU-Net's fingerprint of site 1 (the template route; FL4Health's one-client plans);
* ``mean of sites`` — the case-weighted mean of every site's nnU-Net statistics (FednnU-Net's averaging);
* ``moments`` — mean and std from case-weighted per-site moments (Kaapana's "estimate" mode); no percentiles.

Also the size of each site's statistics file and the time to make and merge them.

    .venv/bin/python scripts/bench_fingerprint.py [--sites 4] [--train 6] [--seed 0] [--work work/bench/fingerprint]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from nnunet_feddah.paths import nnunet_env

STATS = ("mean", "std", "median", "percentile_00_5", "percentile_99_5")
POOLED_ID = 899


def _truth(raw: Path) -> dict[str, float]:
    """Equal-case-weight statistics of every pooled case's foreground (label > 0), no project code involved."""
    import SimpleITK as sitk

    cases = []
    for label_file in sorted((raw / "labelsTr").iterdir()):
        image = raw / "imagesTr" / label_file.name.replace(".nii.gz", "_0000.nii.gz")
        values = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float64)
        cases.append(values[sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))) > 0])
    values = np.concatenate(cases)
    weights = np.concatenate([np.full(c.size, 1.0 / c.size) for c in cases]) / len(cases)
    mean = float(np.sum(weights * values))
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])

    def percentile(q: float) -> float:
        return float(values[order][min(int(np.searchsorted(cumulative, q / 100.0)), values.size - 1)])

    return {"mean": mean, "std": float(np.sqrt(np.sum(weights * values ** 2) - mean ** 2)), "median": percentile(50),
            "percentile_00_5": percentile(0.5), "percentile_99_5": percentile(99.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--train", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("work/bench/fingerprint"))
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    os.environ.update(nnunet_env(args.work))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    from nnunet_feddah.data import phantom
    from nnunet_feddah.nnunet.federated_fingerprint import site_statistics
    from nnunet_feddah.nnunet.fingerprint_merge import merge_statistics

    raw = args.work / "nnUNet_raw"
    folders = phantom.write_cohort(raw, num_sites=args.sites, num_train=args.train, num_test=0, seed=args.seed,
                                   first_dataset_id=POOLED_ID - 1 - args.sites)
    pooled = raw / f"Dataset{POOLED_ID}_FedDAHPooled"
    (pooled / "imagesTr").mkdir(parents=True)
    (pooled / "labelsTr").mkdir()
    for folder in folders:
        for kind in ("imagesTr", "labelsTr"):
            for f in (folder / kind).iterdir():
                os.link(f, pooled / kind / f"{folder.name[:10]}_{f.name}")
    meta = json.loads((folders[0] / "dataset.json").read_text())
    (pooled / "dataset.json").write_text(json.dumps({**meta, "numTraining": args.train * len(folders)}))

    started = time.perf_counter()
    released = {f.name: site_statistics(f.name, log=lambda *_: None) for f in folders}
    made = time.perf_counter() - started
    merged = merge_statistics(released)
    merge_s = time.perf_counter() - started - made
    sizes = {n: len(json.dumps(s).encode()) for n, s in released.items()}

    nnunet = {}
    for dataset in [POOLED_ID, *(int(f.name[7:10]) for f in folders)]:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net names every dataset and reader it uses
            extract_fingerprint_dataset(dataset, num_processes=2, check_dataset_integrity=False, clean=True,
                                        verbose=False, show_progress_bar=False)
        name = pooled.name if dataset == POOLED_ID else next(f.name for f in folders if int(f.name[7:10]) == dataset)
        fingerprint = json.loads((args.work / "nnUNet_preprocessed" / name / "dataset_fingerprint.json").read_text())
        nnunet[name] = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    cases = {f.name: released[f.name]["cases"]["count"] for f in folders}
    total = sum(cases.values())
    mean_of_sites = {k: sum(nnunet[n][k] * c for n, c in cases.items()) / total for k in STATS}
    channel = {n: s["channels"]["0"] for n, s in released.items()}
    m1 = sum(c["sum_of_case_means"] for c in channel.values()) / total
    m2 = sum(c["sum_of_case_mean_squares"] for c in channel.values()) / total
    routes = {
        "truth (pooled voxels, equal case weight)": _truth(pooled),
        "nnU-Net pooled (voxels leave the sites)": nnunet[pooled.name],
        "merged (ours)": merged["fingerprint"]["foreground_intensity_properties_per_channel"]["0"],
        "site 1 alone (template route)": nnunet[folders[0].name],
        "mean of sites (FednnU-Net-style)": mean_of_sites,
        "moments only (Kaapana estimate-style)": {"mean": m1, "std": float(np.sqrt(m2 - m1 ** 2))},
    }
    truth = routes["truth (pooled voxels, equal case weight)"]
    bound = merged["report"]["0"]["error_bound"]
    print(f"phantom: {len(folders)} sites x {args.train} training cases (seed {args.seed}); HU; "
          f"(Δ) = route − truth")
    print("| route | " + " | ".join(STATS) + " |")
    print("|---|" + "---|" * len(STATS))
    for route, values in routes.items():
        cells = []
        for k in STATS:
            if k not in values:
                cells.append("—")
            elif route.startswith("truth"):
                cells.append(f"{values[k]:.1f}")
            else:
                cells.append(f"{values[k]:.1f} ({values[k] - truth[k]:+.1f})")
        print(f"| {route} | " + " | ".join(cells) + " |")
    print("merged error bounds (±HU): " + ", ".join(f"{k} {v:.2f}" for k, v in bound.items()))
    print("per-site normalisation (nnU-Net, each site alone): " + "; ".join(
        f"{n[:10]} mean {v['mean']:.1f} p99.5 {v['percentile_99_5']:.1f}" for n, v in nnunet.items() if n != pooled.name))
    print(f"statistics files: {', '.join(f'{n[:10]} {b} B' for n, b in sizes.items())}; made in {made:.1f} s "
          f"({made / len(folders):.2f} s per site), merged in {merge_s:.3f} s")
    out = args.work / "bench_fingerprint.json"
    out.write_text(json.dumps({"routes": routes, "error_bound": bound, "bytes": sizes, "seconds_sites": made,
                               "seconds_merge": merge_s}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
