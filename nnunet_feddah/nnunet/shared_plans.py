"""One architecture for every site: install a shared plans file and preprocess each site with it.

DAHyper generates the weights of *one* network, so every site must train exactly the same
architecture on data preprocessed the same way (spacing, CT normalisation). A plans *template*
(``plans/template_cpu.json``, ``plans/template_amos.json``) fixes the 3d_fullres configuration; the
dataset-derived fields (intensity statistics for CT normalisation, median spacing/shape, image
reader) are filled from nnU-Net's fingerprint of one *reference* site. The result is copied to the
other sites with nnU-Net's ``move_plans_between_datasets`` and every site is preprocessed with
nnU-Net's ``preprocess_dataset``. The plans carry ``feddah.architecture_fingerprint`` so a site with a
different network can be refused later.

In a real federation the reference site runs ``install --template`` and shares the written plans
JSON; every other hospital runs ``install --plans-file`` on its own machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.errors import FedDAHError, run_cli
from nnunet_feddah.nnunet.case_checks import check_raw_dataset
from nnunet_feddah.nnunet.datasets import DatasetNotFoundError, dataset_id, dataset_name
from nnunet_feddah.paths import CONFIGURATION, bundled_plans_dir, require_nnunet_env

TEMPLATES = {"cpu": "template_cpu.json", "amos": "template_amos.json"}


class SharedPlansError(FedDAHError, ValueError):
    """Plans that cannot be installed; the message names the file/field and the fix."""


def load_template(name_or_path: str) -> dict:
    """A bundled template by name (``cpu``, ``amos``) or any template/plans JSON by path."""
    path = bundled_plans_dir() / TEMPLATES[name_or_path] if name_or_path in TEMPLATES else Path(name_or_path)
    if not path.is_file():
        raise SharedPlansError(f"plans template {name_or_path!r} not found; use one of {sorted(TEMPLATES)} or a path")
    template = json.loads(path.read_text())
    for key in ("plans_name", "configurations"):
        if key not in template:
            raise SharedPlansError(f"plans template {path}: field '{key}' is missing")
    if CONFIGURATION not in template["configurations"]:
        raise SharedPlansError(f"plans template {path}: field 'configurations.{CONFIGURATION}' is missing")
    return template


def raw_dataset_name(dataset: str | int) -> str:
    """``501`` or ``Dataset501_X`` -> the dataset folder name, with a clear error if it is not in nnUNet_raw."""
    raw = require_nnunet_env("nnUNet_raw")["nnUNet_raw"]
    try:
        name = dataset_name(dataset)
    except DatasetNotFoundError as exc:
        raise SharedPlansError(f"{exc} (write it first, e.g. `nnfeddah phantom`)") from exc
    if not (raw / name / "dataset.json").is_file():
        raise SharedPlansError(f"dataset {dataset!r} not found: {raw / name / 'dataset.json'} does not exist")
    return name


def image_reader_class(dataset_json: dict, cases: Mapping[str, Mapping[str, Any]]) -> type:
    """nnU-Net's reader/writer class for a raw dataset, decided from dataset.json and its first case's image."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    example = next(iter(cases.values()))["images"][0]
    return determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                     verbose=False)


def plans_from_template(template: dict, reference: str, fingerprint: dict | None = None) -> dict:
    """Fill a template's dataset-derived fields from a fingerprint: the reference site's own by default, or
    ``fingerprint`` (e.g. the federated one of every site, ``nnfeddah fingerprint merge``)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folders = require_nnunet_env()
    if fingerprint is None:
        fingerprint = json.loads((folders["nnUNet_preprocessed"] / reference / "dataset_fingerprint.json").read_text())
    raw = folders["nnUNet_raw"] / reference
    dataset_json = json.loads((raw / "dataset.json").read_text())
    reader = image_reader_class(dataset_json, get_filenames_of_train_images_and_targets(str(raw), dataset_json))
    return fill_template(template, fingerprint, reference, reader.__name__)


def fill_template(template: dict, fingerprint: Mapping[str, Any], dataset: str, image_reader_writer: str) -> dict:
    """The template with its dataset-derived fields from ``fingerprint`` (no image needed: a coordinator can
    fill it from the merged fingerprint alone): median spacing and shape, nnU-Net's CT normalisation
    statistics, the median image size at the template's spacing, and the sites' image reader."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    plans = copy.deepcopy(template)
    plans.pop("feddah_template", None)
    transpose = plans.get("transpose_forward", [0, 1, 2])
    spacing = np.median(np.asarray(fingerprint["spacings"]), 0)[transpose]
    shape = np.median(np.asarray(fingerprint["shapes_after_crop"]), 0)[transpose]
    target = plans["configurations"][CONFIGURATION]["spacing"]
    plans.update({
        "dataset_name": dataset,
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [int(round(s)) for s in shape],
        "image_reader_writer": image_reader_writer,
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
    })
    plans["configurations"][CONFIGURATION]["median_image_size_in_voxels"] = [
        int(s) for s in compute_new_shape(shape, spacing, target)]
    return plans


def site_fingerprint(name: str, plans_name: str) -> str:
    """Architecture fingerprint of the plans installed at a site (recomputed, not trusted from the file)."""
    from nnunet_feddah.nnunet.network import architecture_fingerprint, num_input_channels

    folders = require_nnunet_env("nnUNet_preprocessed")
    base = folders["nnUNet_preprocessed"] / name
    plans_file = base / f"{plans_name}.json"
    if not plans_file.is_file():
        raise SharedPlansError(f"{plans_file} does not exist; run `nnfeddah plans install` for {name} first")
    dataset_json = json.loads((base / "dataset.json").read_text())
    return architecture_fingerprint(json.loads(plans_file.read_text()), num_input_channels(dataset_json))


def _stamp_fingerprint(plans_file: Path, fingerprint: str, source: str) -> None:
    plans = json.loads(plans_file.read_text())
    plans["feddah"] = {"architecture_fingerprint": fingerprint, "source": source}
    atomic_write_json(plans_file, plans)


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """Hide nnU-Net's chatter (it prints whole plans dicts); show it only if the step fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stderr.write(f"--- nnU-Net output of the failed step ({what}) ---\n{buffer.getvalue()}\n")
        raise


def read_dataset_fingerprint(path: str | Path) -> dict:
    """A ``dataset_fingerprint.json`` (nnU-Net's or a merged one), checked for the fields the plans need."""
    try:
        fingerprint = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SharedPlansError(f"--dataset-fingerprint {path}: cannot be read as JSON ({exc}); write it with "
                               f"`nnfeddah fingerprint merge`") from exc
    for key in ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel"):
        if key not in fingerprint:
            raise SharedPlansError(f"--dataset-fingerprint {path}: field '{key}' is missing; is it a dataset_fingerprint.json?")
    return fingerprint


def install(datasets: Sequence[str | int], template: str | None = None, plans_file: str | None = None,
            reference: str | int | None = None, num_processes: int = 2, verify: bool = True,
            log=print, dataset_fingerprint: str | Path | None = None) -> dict[str, str]:
    """Install shared plans into every dataset and preprocess it; return ``{dataset: fingerprint}``.

    With ``template``, the plans' dataset-derived fields come from the reference site's nnU-Net fingerprint,
    or from ``dataset_fingerprint`` (a merged federated one) when given. The installed plans' ``feddah.source``
    says where they came from (a plans file's own ``feddah.source`` is kept beside its path).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
        move_plans_between_datasets,
    )

    if (template is None) == (plans_file is None):
        raise SharedPlansError("give exactly one of --template (create shared plans) or --plans-file (install them)")
    if dataset_fingerprint is not None and template is None:
        raise SharedPlansError("--dataset-fingerprint fills a --template; a --plans-file already holds its statistics")
    merged = read_dataset_fingerprint(dataset_fingerprint) if dataset_fingerprint is not None else None
    folders = require_nnunet_env()
    names = [raw_dataset_name(d) for d in datasets]
    if not names:
        raise SharedPlansError("no datasets given (-d)")
    ref = raw_dataset_name(reference) if reference is not None else names[0]
    source = template or plans_file
    if dataset_fingerprint is not None:
        source = f"{source} filled from {dataset_fingerprint}"
    shared = load_template(template or plans_file)
    if plans_file is not None and (shared.get("feddah") or {}).get("source"):
        source = f"{plans_file} ({shared['feddah']['source']})"
    plans_name = shared["plans_name"]
    for name in dict.fromkeys([ref, *names]):
        start = time.perf_counter()
        if verify:  # names the file of a NaN image, an undeclared label value or a label off its image's grid
            check_raw_dataset(folders["nnUNet_raw"] / name)
        (folders["nnUNet_preprocessed"] / name).mkdir(parents=True, exist_ok=True)
        with _quiet(f"fingerprint of {name}"):
            extract_fingerprint_dataset(dataset_id(name), num_processes=num_processes,
                                        check_dataset_integrity=verify, clean=True, verbose=False,
                                        show_progress_bar=False)
        shutil.copy(folders["nnUNet_raw"] / name / "dataset.json", folders["nnUNet_preprocessed"] / name / "dataset.json")
        log(f"[plans] {name}: fingerprint{' + integrity check' if verify else ''} in {time.perf_counter() - start:.1f} s")

    if template is not None:
        atomic_write_json(folders["nnUNet_preprocessed"] / ref / f"{plans_name}.json", plans_from_template(shared, ref, merged))
        origin = ref
    else:
        origin = None
    fingerprints: dict[str, str] = {}
    for name in names:
        target = folders["nnUNet_preprocessed"] / name / f"{plans_name}.json"
        with _quiet(f"plans for {name}"):
            if origin is None:  # a plans file from elsewhere: put it in place, let nnU-Net adapt it to this dataset
                atomic_write_json(target, shared)
                move_plans_between_datasets(name, name, plans_name, plans_name)
            elif name != origin:
                move_plans_between_datasets(origin, name, plans_name, plans_name)
        fingerprints[name] = site_fingerprint(name, plans_name)
        _stamp_fingerprint(target, fingerprints[name], source)
    if len(set(fingerprints.values())) != 1:
        raise SharedPlansError(f"sites ended up with different architectures: {fingerprints}")
    for name in names:
        start = time.perf_counter()
        with _quiet(f"preprocessing of {name}"):
            preprocess_dataset(dataset_id(name), plans_name, [CONFIGURATION], [num_processes], verbose=False,
                               show_progress_bar=False)
        log(f"[plans] {name}: preprocessed with {plans_name} in {time.perf_counter() - start:.1f} s")
    return fingerprints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnfeddah plans", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="create (from a template) or install (from a file) shared plans, "
                                          "then preprocess every dataset")
    src = inst.add_mutually_exclusive_group(required=True)
    src.add_argument("--template", help=f"template name ({', '.join(TEMPLATES)}) or path; the first dataset "
                                        f"(or --reference) provides the CT intensity statistics")
    src.add_argument("--plans-file", help="shared plans JSON written by the reference site")
    inst.add_argument("-d", "--datasets", nargs="+", required=True, help="dataset ids or names")
    inst.add_argument("--reference", help="reference dataset for --template (default: the first of -d)")
    inst.add_argument("--dataset-fingerprint", help="fill --template from this dataset_fingerprint.json (the "
                                                    "federated one of `nnfeddah fingerprint merge`) instead of "
                                                    "the reference site's")
    inst.add_argument("-np", "--num-processes", type=int, default=2)
    inst.add_argument("--no-verify", action="store_true", help="skip nnU-Net's dataset integrity check")
    fp = sub.add_parser("fingerprint", help="print the architecture fingerprint of a site's installed plans")
    fp.add_argument("-d", "--dataset", required=True)
    fp.add_argument("-p", "--plans", required=True, help="plans identifier, e.g. FedDAHPlansCPU")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.cmd == "fingerprint":
            print(site_fingerprint(raw_dataset_name(args.dataset), args.plans))
            return
        start = time.perf_counter()
        fingerprints = install(args.datasets, args.template, args.plans_file, args.reference, args.num_processes,
                               not args.no_verify, dataset_fingerprint=args.dataset_fingerprint)
        print(f"[plans] {len(fingerprints)} site(s) share architecture {next(iter(fingerprints.values()))} "
              f"({time.perf_counter() - start:.1f} s)")

    return run_cli("nnfeddah plans", run)


if __name__ == "__main__":
    raise SystemExit(main())
