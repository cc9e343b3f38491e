"""AMOS-like synthetic abdominal CT cohort, written as one nnU-Net v2 raw dataset per hospital site.

Why a phantom: federated continual learning needs several sites whose images differ (scanner,
spacing, contrast timing, noise) and whose annotations are *partial* (site 1 labels only the kidneys,
site 2 the liver, ...), and the tests need that in seconds on a laptop. Every patient shows all 15
AMOS organs (:mod:`nnunet_feddah.organs`); a site's label files keep only the organs it annotates and
write the others as background, exactly the situation of real partially-labelled hospital data.

Anatomy (:mod:`nnunet_feddah.data.anatomy`) is drawn in patient LPS millimetres — x towards the
patient's left, y posterior, z cranial; arrays are ``[z, y, x]`` and the NIfTI files carry an identity
direction, so viewers show ordinary axial CT. The scanner profile then adds partial-volume blur, a
contrast change ``hu * hu_scale + hu_offset``, a smooth bias field and correlated noise.

Determinism: patient ``i`` of a site is drawn from ``SeedSequence([seed, crc32(site_name), i])``;
the first ``num_train`` patients are the training cases, the next ``num_test`` the held-out ones.
Images never depend on which organs a site annotates.

Holds: the scanner profiles, the per-case image model and the writing of site datasets and cohorts;
what it shares with :mod:`.amos` (organs per site, ``--annotate``, replacing our own folders) is in :mod:`.sites`.

CLI: ``nnfeddah phantom --out DIR --sites 4 --annotate 1=kidneys --annotate 2=liver``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_feddah.data.anatomy import FOV_MM, fov_shape, smooth_field, synthesize
from nnunet_feddah.data.sites import (
    OrganSpec,
    check_target,
    organs_per_site,
    parse_annotate,
    resolve_organs,
    writing_folder,
    written_by,
)
from nnunet_feddah.errors import FedDAHError, run_cli
from nnunet_feddah.nnunet.datasets import folder_name
from nnunet_feddah.organs import BY_LABEL, ORGANS, Organ

GENERATOR = "nnunet_feddah.phantom"  # written into dataset.json: kept across module moves so older folders are still recognised
#: Reference voxel spacing (z, y, x) per cohort size; sites scale it by 1.0-1.2 (z) and 1.0-1.15 (in-plane).
SIZE_SPACING: dict[str, tuple[float, float, float]] = {"cpu": (8.0, 6.0, 6.0), "large": (2.5, 1.8, 1.8)}
#: Matrix of a cpu-size case at the reference spacing (site 1); other sites cover the same FOV_MM.
DEFAULT_SHAPE: tuple[int, int, int] = fov_shape(SIZE_SPACING["cpu"])
HU_RANGE = (-1024, 3071)
_PARTIAL_VOLUME_VOX = 0.45  # Gaussian sigma (voxels) that mimics averaging the anatomy over a voxel


class PhantomError(FedDAHError, ValueError):
    """Bad input or an unsafe output folder; the message names the parameter or flag and the fix."""


@dataclass(frozen=True)
class ScannerProfile:
    """What makes one site's images look different from another's (so that sites are non-IID)."""

    name: str
    spacing_zyx: tuple[float, float, float]  # mm
    hu_scale: float  # contrast multiplier around water
    hu_offset: float  # HU shift (calibration, contrast phase)
    noise_sigma: float  # HU standard deviation of the (in-plane correlated) noise
    blur_mm: float = 1.0  # in-plane reconstruction-kernel blur (Gaussian sigma, mm)
    bias_hu: float = 0.0  # amplitude of a smooth additive bias field (beam hardening, scatter)


def default_profiles(num_sites: int, size: str = "cpu") -> list[ScannerProfile]:
    """``num_sites`` clearly different scanners; site 1 has the reference spacing of ``size``.

    Each parameter walks its range with a different irrational step, so any number of sites is
    deterministic and neighbouring sites never look alike.
    """
    if size not in SIZE_SPACING:
        raise PhantomError(f"size {size!r} is unknown; use one of {sorted(SIZE_SPACING)}")
    ref = SIZE_SPACING[size]

    def walk(i: int, step: float, start: float, lo: float, hi: float) -> float:
        return lo + (hi - lo) * ((start + i * step) % 1.0)

    profiles = []
    for i in range(num_sites):
        inplane = ref[1] * walk(i, 0.414214, 0.0, 1.0, 1.15)
        scale = walk(i, 0.732051, 0.5, 0.9, 1.1)
        liver_shift = walk(i, 0.381966, 25 / 60, -25.0, 35.0)  # what the scanner does to ~110 HU parenchyma
        profiles.append(ScannerProfile(
            name=f"Site{i + 1}",
            spacing_zyx=(round(ref[0] * walk(i, 0.618034, 0.0, 1.0, 1.2), 3), round(inplane, 3), round(inplane, 3)),
            hu_scale=round(scale, 3),
            hu_offset=round(liver_shift - 110.0 * (scale - 1.0), 1),
            noise_sigma=round(walk(i, 0.316625, 0.2, 8.0, 30.0), 1),
            blur_mm=round(inplane * walk(i, 0.162278, 0.3, 0.15, 0.6), 2),
            bias_hu=round(walk(i, 0.207107, 0.1, 0.0, 25.0), 1),
        ))
    return profiles


def scanner_appearance(rng: np.random.Generator, hu: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Clean anatomy HU -> what ``profile``'s scanner shows: blur, contrast, bias field, noise, HU clipping."""
    spacing = np.asarray(profile.spacing_zyx, float)
    blur = np.sqrt(_PARTIAL_VOLUME_VOX**2 + (np.array([0.0, profile.blur_mm, profile.blur_mm]) / spacing) ** 2)
    img = ndimage.gaussian_filter(hu.astype(np.float32), blur)
    img = img * profile.hu_scale + profile.hu_offset
    if profile.bias_hu:
        img += profile.bias_hu * smooth_field(rng, img.shape, [3, 4, 4])
    noise = ndimage.gaussian_filter(rng.standard_normal(img.shape, dtype=np.float32), (0.0, 0.6, 0.6))
    img += noise * (profile.noise_sigma / (noise.std() + 1e-6))  # CT noise is correlated in-plane
    return np.clip(img, *HU_RANGE).astype(np.float32)


def make_case(rng: np.random.Generator, profile: ScannerProfile,
              shape_zyx: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One patient seen by ``profile``'s scanner: (image float32 HU, uint8 labels with all 15 AMOS ids).

    ``shape_zyx`` defaults to the phantom field of view (:data:`FOV_MM`) at the profile's spacing.
    Anatomy and scanner draw from separate child streams, so the anatomy does not depend on the profile.
    """
    anatomy_seed, scanner_seed = (int(s) for s in rng.integers(0, 2**63 - 1, size=2))
    anatomy = synthesize(np.random.default_rng(anatomy_seed), profile.spacing_zyx, shape_zyx)
    return scanner_appearance(np.random.default_rng(scanner_seed), anatomy.hu, profile), anatomy.labels


def case_rng(seed: int, site_name: str, index: int) -> np.random.Generator:
    """The random stream of patient ``index`` of a site (train cases first, then test cases)."""
    return np.random.default_rng([seed, zlib.crc32(site_name.encode()), index])


def dataset_folder_name(dataset_id: int, site_name: str) -> str:
    return folder_name(dataset_id, f"FedDAHPhantom{site_name}")


def dataset_json(dataset_id: int, site_name: str, profile: ScannerProfile, annotated: Sequence[Organ],
                 num_train: int, num_test: int, seed: int) -> dict:
    """nnU-Net v2 dataset.json declaring all 15 AMOS labels (AMOS spellings) plus the ``feddah`` block."""
    return {
        "name": dataset_folder_name(dataset_id, site_name),
        "description": f"Synthetic AMOS-like abdominal CT (site {site_name}); labels of unannotated organs are 0.",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{o.amos_spelling: o.label for o in ORGANS}},
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "feddah": {
            "annotated_organs": sorted(o.label for o in annotated),
            "site": site_name,
            "scanner": asdict(profile),
            "generator": GENERATOR,
            "seed": seed,
            "num_test": num_test,
        },
    }


def is_phantom_dataset(folder: Path) -> bool:
    """True for a folder this tool wrote (so it may be replaced); anything else is someone's real data."""
    return written_by(folder, GENERATOR)


def _check_target(raw_root: Path, dataset_id: int, site_name: str) -> Path:
    """Validate id and name and refuse to clobber data that is not ours; returns the dataset folder."""
    if not 1 <= dataset_id <= 999:
        raise PhantomError(f"dataset id {dataset_id} is outside 1..999 (nnU-Net's range); choose a smaller --first-id")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", site_name):
        raise PhantomError(f"site name {site_name!r} must be letters and digits, starting with a letter (e.g. 'Site1')")
    return check_target(raw_root, dataset_id, dataset_folder_name(dataset_id, site_name), GENERATOR,
                        error=PhantomError, fix_foreign="choose another --first-id / --out",
                        fix_clash="choose another --first-id or remove it")


def _write_nifti(array: np.ndarray, spacing_zyx: Sequence[float], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in reversed(spacing_zyx)])  # SimpleITK is (x, y, z)
    image.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def write_site_dataset(raw_root: Path, dataset_id: int, site_name: str, profile: ScannerProfile,
                       annotated_organs: OrganSpec, num_train: int, num_test: int,
                       seed: int, shape_zyx: tuple[int, int, int] | None = None) -> Path:
    """Write ``raw_root/DatasetXXX_FedDAHPhantom<site_name>`` atomically and return it.

    Cases are written into a hidden temporary sibling that is renamed into place only when complete,
    so a crash never leaves a half dataset that nnU-Net would pick up. An existing folder is replaced
    only when it is a phantom dataset. ``shape_zyx`` defaults to :data:`FOV_MM` at the profile's spacing.
    """
    raw_root = Path(raw_root)
    organs = resolve_organs(annotated_organs)
    if num_train < 1 or num_test < 0:
        raise PhantomError(f"need at least 1 training case and no negative test count (got {num_train}, {num_test})")
    target = _check_target(raw_root, dataset_id, site_name)
    raw_root.mkdir(parents=True, exist_ok=True)
    keep = np.zeros(max(BY_LABEL) + 1, np.uint8)
    keep[[o.label for o in organs]] = [o.label for o in organs]
    prefix = site_name.lower()
    with writing_folder(target) as tmp:  # a previous phantom is swapped out, then deleted
        for index in range(num_train + num_test):
            images, labels = ("imagesTr", "labelsTr") if index < num_train else ("imagesTs", "labelsTs")
            case = f"{prefix}_{index:04d}"
            image, label = make_case(case_rng(seed, site_name, index), profile, shape_zyx)
            for sub in (images, labels):
                (tmp / sub).mkdir(exist_ok=True)
            _write_nifti(np.rint(image).astype(np.int16), profile.spacing_zyx, tmp / images / f"{case}_0000.nii.gz")
            _write_nifti(keep[label], profile.spacing_zyx, tmp / labels / f"{case}.nii.gz")
        meta = dataset_json(dataset_id, site_name, profile, organs, num_train, num_test, seed)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target


def write_cohort(raw_root: Path, num_sites: int = 4, num_train: int = 6, num_test: int = 2, seed: int = 0,
                 annotated: Mapping[int, OrganSpec] | None = None,
                 first_dataset_id: int = 501, size: str = "cpu",
                 log: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``num_sites`` site datasets with ids ``first_dataset_id...``; returns their folders.

    ``annotated`` maps a 1-based site number to the organs that site labels (default: all 15).
    All targets are checked before the first one is written. ``log`` receives one line per dataset.
    """
    raw_root = Path(raw_root)
    organs_of = organs_per_site(num_sites, annotated)
    profiles = default_profiles(num_sites, size)
    plan = [(first_dataset_id + i, p, organs_of[i]) for i, p in enumerate(profiles)]
    for dataset_id, profile, _ in plan:
        _check_target(raw_root, dataset_id, profile.name)
    paths = []
    for dataset_id, profile, organs in plan:
        start = time.perf_counter()
        paths.append(write_site_dataset(raw_root, dataset_id, profile.name, profile, organs, num_train, num_test, seed))
        if log:
            log(f"{paths[-1]}  {num_train} train + {num_test} test cases  "
                f"{'+'.join(o.key for o in organs) if len(organs) < len(ORGANS) else 'all organs'}  "
                f"{time.perf_counter() - start:.1f} s")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnfeddah phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("--sites", type=int, default=4, help="number of hospital sites (default 4)")
    parser.add_argument("--train", type=int, default=6, help="training cases per site (default 6)")
    parser.add_argument("--test", type=int, default=2, help="held-out test cases per site (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--first-id", type=int, default=501, help="dataset id of site 1 (default 501)")
    parser.add_argument("--size", choices=sorted(SIZE_SPACING), default="cpu",
                        help=f"cpu: ~{'x'.join(map(str, DEFAULT_SHAPE))} voxels; large: ~2.5x1.8x1.8 mm (default cpu)")
    parser.add_argument("--annotate", action="append", default=[], metavar="SITE=ORGANS",
                        help="organs a site labels, e.g. 1=kidneys+liver or 2=all (repeatable; default: all)")
    args = parser.parse_args(argv)

    def write() -> None:
        out = args.out or (Path(os.environ["nnUNet_raw"]) if os.environ.get("nnUNet_raw") else None)
        if out is None:
            raise PhantomError("no output folder: pass --out DIR or set the nnUNet_raw environment variable")
        if args.train < 1 or args.test < 0:
            raise PhantomError("--train must be at least 1 and --test at least 0")
        if not (1 <= args.first_id and args.first_id + max(args.sites, 1) - 1 <= 999):
            raise PhantomError(f"--first-id {args.first_id} with --sites {args.sites} gives dataset ids outside 1..999")
        start = time.perf_counter()
        write_cohort(out, args.sites, args.train, args.test, args.seed, parse_annotate(args.annotate),
                     args.first_id, args.size, log=print)
        print(f"wrote {args.sites} site dataset(s) to {out} in {time.perf_counter() - start:.1f} s (FOV {FOV_MM} mm)")

    return run_cli("phantom", write)


if __name__ == "__main__":
    raise SystemExit(main())
