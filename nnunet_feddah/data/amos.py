"""AMOS22 download -> FedDAH site datasets (one nnU-Net raw dataset per site) -> shared plans.

Why: FedDAH is meant for real multi-site abdominal CT with *partial* annotations. AMOS22 is one pooled
public dataset, so a federation has to be cut out of it: its CT cases are split into N sites, each site
keeps only the organs its task stream needs (the other organs become background, as in a hospital that
never labelled them), and each site keeps a labelled held-out test split for the forgetting matrix.

nnU-Net's own conversion (``nnunetv2/dataset_conversion/Dataset218_Amos2022_task1.py``) decides *which*
files make the dataset: CT cases only (by AMOS id: training <= 410, validation <= 409; AMOS's MRI cases
are 0501-0600), validation merged into training, ``_0000`` channel files, channel ``CT``, AMOS's label
names and ids, ``NibabelIOWithReorient``. It writes one pooled dataset into ``nnUNet_raw``; we run it
with its copy and dataset.json steps *recorded* instead of performed, and use the recorded file list
and conventions for the site datasets. That reuses nnU-Net's rules exactly without copying ~20 GB twice.
AMOS's ``imagesTs`` has no public labels, so it cannot be a held-out *evaluation* split and is left out.

Split rule (deterministic; written into every site's dataset.json under ``feddah.split``):

* ``metadata``: cases are grouped by a scanner column of AMOS's metadata CSV (default
  ``Manufacturer's Model Name``, found as ``labeled_data_meta_*.csv`` next to or above the download, or
  ``--metadata``); whole groups go to sites, largest group first to the site with the fewest cases (ties:
  lower site number), so sites differ in scanner as real hospitals do. Cases missing from the CSV form
  the group ``unknown``.
* ``random``: the sorted CT ids are permuted with ``numpy.random.default_rng(seed)`` and dealt round-robin.
* ``auto`` (default): ``metadata`` when a CSV with the column is found and has at least N groups, else
  ``random``.

Then, per site, ``round(test_fraction * n)`` cases (at least 1, leaving at least 1 for training) drawn
with ``default_rng([seed, site_number])`` become ``imagesTs``/``labelsTs``.

Holds: nnU-Net's case selection, the sites, the split, the writing of site datasets and the CLI; what it
shares with :mod:`.phantom` (organs per site, ``--annotate``, replacing our own folders) is in :mod:`.sites`.
Over 400 lines as one module: each step feeds the next through the case and site types of this one conversion.

CLI: ``nnfeddah amos AMOS22_DIR --plan amos_4site`` (see docs/AMOS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

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
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.federation.plan_reader import load_plan
from nnunet_feddah.nnunet import datasets
from nnunet_feddah.organs import BY_LABEL, ORGANS, Organ, organs_in_dataset_json
from nnunet_feddah.paths import require_nnunet_env

GENERATOR = "nnunet_feddah.amos"  # written into dataset.json: kept across module moves so older folders are still recognised
DEFAULT_FIRST_ID = 511
DEFAULT_SITES = 4
DEFAULT_TEST_FRACTION = 0.2
AMOS_CT_MAX_ID = 500  # AMOS22 ids 0001-0500 are CT, 0501-0600 MRI
SPLIT_COLUMN = "Manufacturer's Model Name"
ID_COLUMN = "amos_id"
METADATA_PATTERNS = ("labeled_data_meta*.csv", "*meta*.csv")
SPLIT_RULES = ("auto", "metadata", "random")


class AmosError(FedDAHError, ValueError):
    """Input or output that cannot be converted; the message names the file or flag and the fix."""


@dataclass(frozen=True)
class AmosCase:
    """One labelled CT case as nnU-Net's AMOS conversion selected it."""

    identifier: str  # amos_0001
    image: Path
    label: Path
    source: str  # training / validation (AMOS's own split, merged by nnU-Net)


@dataclass(frozen=True)
class AmosSource:
    """What nnU-Net's conversion chose: the labelled CT cases and the dataset.json conventions."""

    cases: tuple[AmosCase, ...]
    dataset_json_kwargs: Mapping[str, Any]  # channel_names, labels, file_ending, reader/writer, reference, ...
    unlabelled_test: int  # AMOS imagesTs CT cases (no public labels; not used)


@dataclass(frozen=True)
class SiteSpec:
    """One site dataset to write: nnU-Net id and folder name, and the organs the site annotates."""

    name: str
    dataset_id: int
    folder: str
    organs: tuple[Organ, ...]


@dataclass(frozen=True)
class SiteSplit:
    """The cases of one site after the held-out split."""

    site: SiteSpec
    train: tuple[str, ...]
    test: tuple[str, ...]
    groups: tuple[str, ...] = field(default=())  # metadata values that went to this site


# --- nnU-Net's case selection ---------------------------------------------------------------------------
@contextlib.contextmanager
def _replaced(module: Any, **attributes: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def collect_ct_cases(amos_dir: os.PathLike | str) -> AmosSource:
    """Run nnU-Net's ``convert_amos_task1`` with copies and dataset.json recorded; return its selection."""
    from nnunetv2.dataset_conversion import Dataset218_Amos2022_task1 as nnunet_amos

    amos_dir = Path(amos_dir)
    if not (amos_dir / "dataset.json").is_file():
        raise AmosError(f"{amos_dir / 'dataset.json'} does not exist; pass the extracted AMOS22 folder (the one with "
                        f"dataset.json, imagesTr, labelsTr, imagesVa, labelsVa, imagesTs)")
    copies: list[tuple[Path, Path]] = []
    captured: dict[str, Any] = {}

    def record_dataset_json(output_folder: str, channel_names: dict, labels: dict, num_training_cases: int,
                            file_ending: str, **kwargs: Any) -> None:
        captured.update(channel_names=channel_names, labels=labels, file_ending=file_ending, **kwargs)

    read_json = nnunet_amos.load_json
    with tempfile.TemporaryDirectory(prefix="amos_scratch_") as scratch, _replaced(
            nnunet_amos, nnUNet_raw=scratch, load_json=lambda path: _with_lists(read_json(path)),
            shutil=SimpleNamespace(copy=lambda src, dst: copies.append((Path(src), Path(dst)))),
            generate_dataset_json=record_dataset_json):
        nnunet_amos.convert_amos_task1(str(amos_dir), 218)  # writes only empty folders into the scratch dir

    images: dict[str, tuple[Path, str]] = {}
    labels: dict[str, Path] = {}
    unlabelled = 0
    for src, dst in copies:
        kind = dst.parent.name
        if kind in ("imagesTr", "labelsTr") and not src.is_file():
            raise AmosError(f"{src} is listed in {amos_dir / 'dataset.json'} but does not exist; re-extract the "
                            f"AMOS22 download (imagesTr, labelsTr, imagesVa, labelsVa)")
        if kind == "imagesTr":
            images[dst.name.removesuffix("_0000" + captured["file_ending"])] = (
                src, "validation" if src.parent.name.endswith("Va") else "training")
        elif kind == "labelsTr":
            labels[dst.name.removesuffix(captured["file_ending"])] = src
        else:
            unlabelled += 1
    if set(images) != set(labels):
        raise AmosError(f"{amos_dir}: cases {sorted(set(images) ^ set(labels))} have an image but no label (or the "
                        f"reverse)")
    if not images:
        raise AmosError(f"{amos_dir / 'dataset.json'} lists no CT training/validation case (AMOS CT ids are <= 410)")
    not_ct = sorted(k for k in images if int(k.rsplit("_", 1)[-1]) > AMOS_CT_MAX_ID)
    if not_ct:  # nnU-Net's own thresholds are stricter; this guards against a changed converter
        raise AmosError(f"nnU-Net's AMOS conversion selected {not_ct}, which are not CT (AMOS CT ids are <= "
                        f"{AMOS_CT_MAX_ID}); check the installed nnunetv2 version (2.8.x expected)")
    cases = tuple(AmosCase(k, images[k][0], labels[k], images[k][1]) for k in sorted(images))
    return AmosSource(cases, captured, unlabelled)


def _with_lists(data: dict) -> dict:
    """An AMOS dataset.json with the ``validation`` and ``test`` lists nnU-Net's converter expects."""
    return {**data, "validation": data.get("validation", []), "test": data.get("test", [])}


# --- sites ----------------------------------------------------------------------------------------------
def site_folder(dataset_id: int, site_name: str) -> str:
    return datasets.folder_name(dataset_id, f"AMOS{site_name}")


def default_sites(num_sites: int = DEFAULT_SITES, first_id: int = DEFAULT_FIRST_ID,
                  annotated: Mapping[int, OrganSpec] | None = None) -> list[SiteSpec]:
    """``num_sites`` sites ``Site1..`` on ids ``first_id..``; ``annotated`` maps a 1-based site to its organs."""
    return [SiteSpec(f"Site{i + 1}", first_id + i, site_folder(first_id + i, f"Site{i + 1}"), organs)
            for i, organs in enumerate(organs_per_site(num_sites, annotated))]


def sites_from_plan(plan: FederationPlan) -> list[SiteSpec]:
    """One site per plan site (plan order), annotating exactly the organs of its task stream.

    A site labels what its stream will train and nothing else, which is the partial-annotation situation
    FedDAH is about; an integer ``dataset`` becomes ``DatasetXXX_AMOSSite<n>``, a name is used as is.
    """
    specs = []
    for i, s in enumerate(plan.sites):
        number = datasets.dataset_id(s.dataset)  # the plan reader accepts only ids and Dataset###_Name names
        folder = site_folder(number, f"Site{i + 1}") if isinstance(s.dataset, int) else s.dataset
        organs = resolve_organs([o for task in s.stream for o in task.organs])
        specs.append(SiteSpec(s.name, number, folder, organs))
    return specs


# --- split ----------------------------------------------------------------------------------------------
def find_metadata(amos_dir: os.PathLike | str) -> Path | None:
    """AMOS's metadata CSV (``labeled_data_meta_0000_0599.csv`` on Zenodo) in the download or its parent."""
    amos_dir = Path(amos_dir)
    for folder in (amos_dir, amos_dir.parent):
        for pattern in METADATA_PATTERNS:
            found = sorted(folder.glob(pattern))
            if found:
                return found[0]
    return None


def read_metadata(csv_path: os.PathLike | str, column: str = SPLIT_COLUMN) -> dict[str, str]:
    """``{amos_XXXX: value of column}`` from AMOS's metadata CSV (``amos_id`` is a plain integer there)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        for needed in (ID_COLUMN, column):
            if needed not in fields:
                raise AmosError(f"{csv_path}: column {needed!r} not found (columns: {fields}); choose another "
                                f"--split-column or --split random")
        out = {}
        for row in reader:
            raw_id = (row.get(ID_COLUMN) or "").strip()
            if raw_id.isdigit():
                out[f"amos_{int(raw_id):04d}"] = (row.get(column) or "").strip() or "unknown"
    return out


def split_random(identifiers: Sequence[str], num_sites: int, seed: int) -> list[list[str]]:
    """Permute the sorted ids with ``default_rng(seed)`` and deal them round-robin (sizes differ by <= 1)."""
    order = np.random.default_rng(seed).permutation(sorted(identifiers))
    return [sorted(str(x) for x in order[k::num_sites]) for k in range(num_sites)]


def split_by_group(identifiers: Sequence[str], groups: Mapping[str, str],
                   num_sites: int) -> tuple[list[list[str]], list[list[str]]]:
    """Whole scanner groups to sites: largest group first to the site with the fewest cases (ties: lowest site).

    Returns the cases and the group values of every site. Greedy packing keeps scanners apart (non-IID
    sites, like real hospitals) while keeping site sizes as even as the groups allow.
    """
    by_group: dict[str, list[str]] = {}
    for identifier in sorted(identifiers):
        by_group.setdefault(groups.get(identifier, "unknown"), []).append(identifier)
    cases: list[list[str]] = [[] for _ in range(num_sites)]
    values: list[list[str]] = [[] for _ in range(num_sites)]
    for group in sorted(by_group, key=lambda g: (-len(by_group[g]), g)):
        target = min(range(num_sites), key=lambda k: (len(cases[k]), k))
        cases[target].extend(by_group[group])
        values[target].append(group)
    return [sorted(c) for c in cases], values


def held_out(cases: Sequence[str], fraction: float, seed: int, site_number: int) -> tuple[list[str], list[str]]:
    """``(train, test)``: ``round(fraction * n)`` test cases, at least 1 (if n >= 2), leaving >= 1 for training."""
    ordered = sorted(cases)
    n_test = round(fraction * len(ordered)) if fraction > 0 else 0
    n_test = min(max(n_test, 1 if fraction > 0 else 0), len(ordered) - 1)
    chosen = set(np.random.default_rng([seed, site_number]).permutation(ordered)[:n_test].tolist())
    return [c for c in ordered if c not in chosen], [c for c in ordered if c in chosen]


def plan_split(identifiers: Sequence[str], sites: Sequence[SiteSpec], seed: int = 0, rule: str = "auto",
               metadata: Mapping[str, str] | None = None, test_fraction: float = DEFAULT_TEST_FRACTION,
               log: Callable[[str], None] = print) -> tuple[list[SiteSplit], str]:
    """Assign cases to sites and to train/test; returns the splits and the rule actually used."""
    if rule not in SPLIT_RULES:
        raise AmosError(f"--split {rule!r} is unknown; use one of {list(SPLIT_RULES)}")
    if not 0 <= test_fraction < 1:
        raise AmosError(f"--test-fraction must be in [0, 1) (got {test_fraction})")
    n = len(sites)
    if len(identifiers) < 2 * n:
        raise AmosError(f"{len(identifiers)} CT cases cannot make {n} sites with a training and a test case each; "
                        f"use fewer --sites")
    groups: list[list[str]] = [[] for _ in range(n)]
    if rule != "random" and metadata is not None:
        distinct = {metadata.get(i, "unknown") for i in identifiers}
        if len(distinct) >= n:
            per_site, groups = split_by_group(identifiers, metadata, n)
            if min(len(c) for c in per_site) >= 2:
                rule = "metadata"
            elif rule == "metadata":
                raise AmosError(f"splitting by scanner leaves a site with fewer than 2 cases ({[len(c) for c in per_site]})"
                                f"; use --split random or fewer --sites")
        elif rule == "metadata":
            raise AmosError(f"the metadata has {len(distinct)} scanner group(s) for {n} sites; use --split random, "
                            f"another --split-column or fewer --sites")
    elif rule == "metadata":
        raise AmosError("--split metadata needs AMOS's metadata CSV: pass --metadata labeled_data_meta_0000_0599.csv")
    if rule != "metadata":
        if rule == "auto":
            log("[amos] no usable scanner metadata: seeded random split")
        rule, per_site, groups = "random", split_random(identifiers, n, seed), [[] for _ in range(n)]
    splits = []
    for k, (site, cases) in enumerate(zip(sites, per_site, strict=True)):
        train, test = held_out(cases, test_fraction, seed, k + 1)
        splits.append(SiteSplit(site, tuple(train), tuple(test), tuple(groups[k])))
    return splits, rule


# --- writing --------------------------------------------------------------------------------------------
def _transfer(src: Path, dst: Path, hardlink: bool) -> None:
    if hardlink:
        with contextlib.suppress(OSError):
            os.link(src, dst)
            return
    shutil.copyfile(src, dst)


def remap_label(src: Path, dst: Path, lut: np.ndarray) -> None:
    """Write ``lut[labels]`` with the source's affine and header (geometry must stay identical to the image)."""
    import nibabel as nib

    image = nib.load(str(src))
    data = np.asanyarray(image.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise AmosError(f"{src}: label file holds non-integer values; it is not an AMOS label map")
        data = rounded.astype(np.int16)
    low, high = int(data.min()), int(data.max())
    if low < 0 or high >= len(lut):
        raise AmosError(f"{src}: label values {low}..{high} are outside the AMOS ids 0..{len(lut) - 1}")
    out = nib.Nifti1Image(lut[data], image.affine, image.header)
    out.set_data_dtype(np.uint8)
    nib.save(out, str(dst))


def is_amos_site(folder: Path) -> bool:
    """True for a site dataset this module wrote (so it may be replaced); anything else is someone's data."""
    return written_by(folder, GENERATOR)


def _check_targets(raw_root: Path, sites: Sequence[SiteSpec]) -> None:
    ids = [s.dataset_id for s in sites]
    if len(set(ids)) != len(ids) or any(not 1 <= i <= 999 for i in ids):
        raise AmosError(f"site dataset ids {ids} must be distinct and within 1..999")
    for s in sites:
        check_target(raw_root, s.dataset_id, s.folder, GENERATOR, error=AmosError, fix_foreign="choose other ids",
                     fix_clash="choose other ids (--first-id or the plan's 'dataset')")


def write_site(raw_root: Path, split: SiteSplit, source: AmosSource, provenance: Mapping[str, Any],
               hardlink: bool = False) -> Path:
    """Write one site dataset atomically (hidden sibling, renamed into place when complete)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    site = split.site
    target = raw_root / site.folder
    by_id = {c.identifier: c for c in source.cases}
    kept = [o.label for o in site.organs]
    lut = np.zeros(max(BY_LABEL) + 1, np.uint8)
    lut[kept] = kept
    identity = len(kept) == len(BY_LABEL)
    ending = source.dataset_json_kwargs["file_ending"]
    with writing_folder(target) as tmp:
        for images, labels, cases in (("imagesTr", "labelsTr", split.train), ("imagesTs", "labelsTs", split.test)):
            (tmp / images).mkdir()
            (tmp / labels).mkdir()
            for identifier in cases:
                case = by_id[identifier]
                _transfer(case.image, tmp / images / f"{identifier}_0000{ending}", hardlink)
                if identity:
                    _transfer(case.label, tmp / labels / f"{identifier}{ending}", hardlink)
                else:
                    remap_label(case.label, tmp / labels / f"{identifier}{ending}", lut)
        kwargs = dict(source.dataset_json_kwargs)
        kwargs.update(
            dataset_name=site.folder, num_training_cases=len(split.train), converted_by=GENERATOR,
            license="AMOS22's terms, see https://zenodo.org/record/7262581",
            description=f"AMOS22 CT, FedDAH site {site.name}: nnU-Net's Dataset218 case selection, split into sites; "
                        f"labels of organs the site does not annotate are 0.",
            feddah={"annotated_organs": kept, "site": site.name, "generator": GENERATOR, **provenance,
                    "num_test": len(split.test), "scanner_groups": list(split.groups),
                    "cases": {"train": list(split.train), "test": list(split.test)}})
        generate_dataset_json(str(tmp), **kwargs)
    return target


def convert(amos_dir: os.PathLike | str, raw_root: os.PathLike | str, sites: Sequence[SiteSpec], seed: int = 0,
            split: str = "auto", metadata_csv: os.PathLike | str | None = None, split_column: str = SPLIT_COLUMN,
            test_fraction: float = DEFAULT_TEST_FRACTION, hardlink: bool = False,
            log: Callable[[str], None] = print) -> list[Path]:
    """Extracted AMOS22 folder -> one nnU-Net raw dataset per site in ``raw_root``; returns their folders."""
    amos_dir, raw_root = Path(amos_dir), Path(raw_root)
    raw_root.mkdir(parents=True, exist_ok=True)
    _check_targets(raw_root, sites)
    source = collect_ct_cases(amos_dir)
    declared = organs_in_dataset_json(source.dataset_json_kwargs)
    missing = sorted({o.key for s in sites for o in s.organs if o.label not in declared})
    if missing:
        raise AmosError(f"{amos_dir / 'dataset.json'}: 'labels' does not declare {missing}, which the sites annotate")
    csv_path = Path(metadata_csv) if metadata_csv is not None else (find_metadata(amos_dir) if split != "random" else None)
    if metadata_csv is not None and not csv_path.is_file():
        raise AmosError(f"--metadata {csv_path} does not exist")
    metadata = None
    if csv_path is not None:
        try:
            metadata = read_metadata(csv_path, split_column)
        except AmosError as exc:
            if split == "metadata" or metadata_csv is not None:
                raise
            log(f"[amos] ignoring {csv_path}: {exc}")
    identifiers = [c.identifier for c in source.cases]
    splits, rule = plan_split(identifiers, sites, seed, split, metadata, test_fraction, log)
    counts = {k: sum(c.source == k for c in source.cases) for k in ("training", "validation")}
    provenance = {"seed": seed, "split": {"rule": rule, "column": split_column if rule == "metadata" else None,
                                          "metadata": str(csv_path) if rule == "metadata" else None,
                                          "test_fraction": test_fraction},
                  "source": {"amos_dir": str(amos_dir.resolve()), "ct_cases": counts,
                             "unlabelled_test_cases_skipped": source.unlabelled_test}}
    log(f"[amos] {len(identifiers)} CT cases ({counts['training']} training + {counts['validation']} validation), "
        f"split {rule!r} into {len(sites)} sites")
    paths = []
    for s in splits:
        start = time.perf_counter()
        paths.append(write_site(raw_root, s, source, provenance, hardlink))
        organs = "all organs" if len(s.site.organs) == len(ORGANS) else "+".join(o.key for o in s.site.organs)
        log(f"[amos] {paths[-1]}: {len(s.train)} train + {len(s.test)} test  {organs}"
            f"{'  scanners: ' + ', '.join(s.groups) if s.groups else ''}  {time.perf_counter() - start:.1f} s")
    return paths


# --- CLI ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnfeddah amos", description=__doc__.split("\n\n")[0])
    parser.add_argument("amos_dir", type=Path, help="extracted AMOS22 folder (dataset.json, imagesTr, labelsTr, ...)")
    parser.add_argument("--out", type=Path, default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("--plan", help="federation plan (path or bundled name, e.g. amos_4site): its sites, dataset "
                                       "ids and streams decide the site datasets and their annotated organs")
    parser.add_argument("--sites", type=int, default=None, help=f"without --plan: number of sites ({DEFAULT_SITES})")
    parser.add_argument("--first-id", type=int, default=None, help=f"without --plan: id of site 1 ({DEFAULT_FIRST_ID})")
    parser.add_argument("--annotate", action="append", default=[], metavar="SITE=ORGANS",
                        help="without --plan: organs a site labels (repeatable; default: all)")
    parser.add_argument("--split", choices=SPLIT_RULES, default="auto", help="site split rule (default auto)")
    parser.add_argument("--metadata", type=Path, default=None, help="AMOS metadata CSV (default: found next to the data)")
    parser.add_argument("--split-column", default=SPLIT_COLUMN, help=f"metadata column (default {SPLIT_COLUMN!r})")
    parser.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                        help=f"held-out test cases per site (default {DEFAULT_TEST_FRACTION})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hardlink", action="store_true", help="hard-link images instead of copying (same disk)")
    parser.add_argument("--no-preprocess", action="store_true", help="only write the raw site datasets")
    parser.add_argument("--template", default="amos", help="shared plans template (default amos)")
    parser.add_argument("--plans-from", choices=("sites", "reference"), default="sites",
                        help="fill the template from the merged fingerprint of every site's statistics (default; "
                             "written to $nnUNet_preprocessed/feddah_fingerprint_<first id>/) or from site 1's "
                             "nnU-Net fingerprint alone")
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    parser.add_argument("--no-verify", action="store_true", help="skip nnU-Net's dataset integrity check")
    args = parser.parse_args(argv)

    def run() -> None:
        env_raw = os.environ.get("nnUNet_raw")
        out = args.out or (Path(env_raw) if env_raw else None)
        if out is None:
            raise AmosError("no output folder: pass --out DIR or set nnUNet_raw (eval \"$(nnfeddah env --root DIR)\")")
        if not args.no_preprocess and (not env_raw or Path(env_raw).resolve() != out.resolve()):
            raise AmosError(f"preprocessing uses $nnUNet_raw ({env_raw}); write the sites there (leave out --out) or "
                            f"pass --no-preprocess")
        if args.plan:
            if args.sites is not None or args.first_id is not None or args.annotate:
                raise AmosError("--plan decides sites, ids and organs; leave out --sites/--first-id/--annotate")
            sites = sites_from_plan(load_plan(args.plan))
        else:
            sites = default_sites(args.sites or DEFAULT_SITES, args.first_id or DEFAULT_FIRST_ID,
                                  parse_annotate(args.annotate))
        start = time.perf_counter()
        convert(args.amos_dir, out, sites, args.seed, args.split, args.metadata, args.split_column,
                args.test_fraction, args.hardlink)
        print(f"[amos] {len(sites)} site dataset(s) in {out} ({time.perf_counter() - start:.1f} s)")
        if not args.no_preprocess:
            from nnunet_feddah.nnunet.federated_fingerprint import install_from_site_statistics
            from nnunet_feddah.nnunet.shared_plans import install

            ids = [s.dataset_id for s in sites]
            if args.plans_from == "sites":
                folder = require_nnunet_env("nnUNet_preprocessed")["nnUNet_preprocessed"] / f"feddah_fingerprint_{ids[0]}"
                fingerprints = install_from_site_statistics(ids, args.template, folder, args.num_processes,
                                                            not args.no_verify)
            else:
                fingerprints = install(ids, template=args.template, num_processes=args.num_processes,
                                       verify=not args.no_verify)
            print(f"[amos] shared plans installed; architecture {next(iter(fingerprints.values()))} "
                  f"({time.perf_counter() - start:.1f} s)")

    return run_cli("nnfeddah amos", run)


if __name__ == "__main__":
    raise SystemExit(main())
