"""One site's round, engine-agnostic: weights + round settings in → FedDAHTrainer in-process → weights + metrics out.

Every round leaves its files in ``<work>/<site>/round_NNNN_<task>/`` (the weights received, the round
config, the trained weights and the metrics) so a site can audit what it sent. nnU-Net reads its folder
variables when it is imported, so one process serves one nnU-Net root; sites sharing a root (the
demo, the tests) can share a process.

The Flower ClientApp calls :func:`run_site_round`; ``python -m nnunet_feddah.site`` starts a site's
SuperNode. This module itself imports no Flower.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

from nnunet_feddah.federation.coordinator import SiteJob, SiteResult
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.nnunet.round_config import RoundConfig
from nnunet_feddah.nnunet.weights import load_weights, save_weights


class SiteEnvironmentError(OSError):
    """This process cannot train for the requested site (its nnU-Net folders differ from the process's)."""


def site_fingerprint(preprocessed_dataset: Path, plans_identifier: str) -> str:
    plans_file = preprocessed_dataset / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise SiteEnvironmentError(f"{plans_file} does not exist: install the shared plans at this site with "
                                   f"`nnfeddah plans install` first")
    return json.loads(plans_file.read_text()).get("feddah", {}).get("architecture_fingerprint", "")


def run_site_round(job: SiteJob, dataset: int | str, plans_identifier: str, work_dir: Path,
                   device: str = "cpu") -> SiteResult:
    """Train the job's weights for its task on this site's data; raises on any failure."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_feddah.nnunet.trainer import train_round
    from nnunet_feddah.paths import require_nnunet_env

    started = time.perf_counter()
    folders = require_nnunet_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    dataset_name = maybe_convert_to_dataset_name(dataset)
    fingerprint = site_fingerprint(folders["nnUNet_preprocessed"] / dataset_name, plans_identifier)
    round_dir = Path(work_dir) / job.site / f"round_{job.round:04d}_{job.task}"
    round_dir.mkdir(parents=True, exist_ok=True)
    save_weights(round_dir / "received.safetensors", job.weights,
                 {"architecture_fingerprint": fingerprint, "task": job.task, "organs": ",".join(map(str, job.organs)),
                  "round": job.round})
    config = RoundConfig.from_mapping({**job.settings, "task": job.task,
                                       "initial_weights": str(round_dir / "received.safetensors"),
                                       "output_weights": str(round_dir / "trained.safetensors"),
                                       "output_metrics": str(round_dir / "metrics.json")},
                                      source=str(round_dir / "round.json"))
    config.save(round_dir / "round.json")
    metrics = train_round(dataset_name, plans_identifier, round_dir / "round.json", device=device)
    weights, _ = load_weights(round_dir / "trained.safetensors")
    return SiteResult(job.site, job.round, job.task, weights, metrics, time.perf_counter() - started)


class InProcessExecutor:
    """Runs every job in this process, one after the other (2 CPU cores: parallel training would only thrash).

    A failing site becomes an error string for the coordinator — a missed round, not a crashed federation.
    """

    def __init__(self, plan: FederationPlan, work_dir: Path, device: str = "cpu") -> None:
        self.plan, self.work_dir, self.device = plan, Path(work_dir), device

    def __call__(self, jobs: Mapping[str, SiteJob], deadline_s: float) -> dict[str, SiteResult | str]:
        results: dict[str, SiteResult | str] = {}
        for site, job in jobs.items():
            site_plan = self.plan.site(site)
            try:
                _check_site_environment(self.plan.nnunet_folders(site))
                results[site] = run_site_round(job, site_plan.dataset, self.plan.plans_identifier, self.work_dir,
                                               self.device)
            except Exception as exc:  # a site's failure is reported, never raised into the round loop
                results[site] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        return results


def _check_site_environment(folders: Mapping[str, Path]) -> None:
    """The site's nnU-Net folders must be the ones this process's nnU-Net was (or will be) imported with."""
    for name, path in folders.items():
        current = os.environ.get(name)
        if current is None:
            os.environ[name] = str(path)
        elif Path(current).resolve() != Path(path).resolve():
            raise SiteEnvironmentError(
                f"{name} is {current} in this process but the site uses {path}; run one site process per "
                f"nnU-Net root (python -m nnunet_feddah.site)")

