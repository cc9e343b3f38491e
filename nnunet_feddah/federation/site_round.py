"""One site's round, engine-agnostic: weights + round settings in → FedDAHTrainer in-process → weights + metrics out.

Every round leaves its files in ``<work>/<site>/round_NNNN_<task>/`` (the weights received, the round
config, the trained weights and the metrics) so a site can audit what it sent. The trainer gets the
:class:`RoundConfig` object itself; ``round.json`` is the record of it (and what ``nnUNetv2_train`` would
read through ``$FEDDAH_ROUND_CONFIG``).

nnU-Net 2.8.1 reads ``nnUNet_raw``/``_preprocessed``/``_results`` lazily — ``nnunetv2.paths`` wraps each in
an object that looks at ``os.environ`` on every use, and no nnunetv2 module joins them at import
(tests/test_site_round.py checks both) — so one process can train sites with different nnU-Net roots:
the in-process executor points the variables at each site's folders for the duration of its round.

The Flower ClientApp calls :func:`run_site_round`; ``python -m nnunet_feddah.site`` starts a site's
SuperNode. This module itself imports no Flower.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation.jobs import SiteJob, SiteResult
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.nnunet.datasets import dataset_name, nnunet_folders
from nnunet_feddah.nnunet.round_config import RoundConfig
from nnunet_feddah.nnunet.weights import load_weights, save_weights
from nnunet_feddah.paths import require_nnunet_env


class SiteEnvironmentError(FedDAHError, OSError):
    """This site cannot train: its shared plans are not installed."""


def site_fingerprint(preprocessed_dataset: Path, plans_identifier: str) -> str:
    plans_file = preprocessed_dataset / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise SiteEnvironmentError(f"{plans_file} does not exist: install the shared plans at this site with "
                                   f"`nnfeddah plans install` first")
    return json.loads(plans_file.read_text()).get("feddah", {}).get("architecture_fingerprint", "")


def run_site_round(job: SiteJob, dataset: int | str, plans_identifier: str, work_dir: Path,
                   device: str = "cpu") -> SiteResult:
    """Train the job's weights for its task on this site's data (the nnUNet_* folders); raises on any failure."""
    from nnunet_feddah.nnunet.trainer import train_round

    started = time.perf_counter()
    folders = require_nnunet_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    name = dataset_name(dataset)
    fingerprint = site_fingerprint(folders["nnUNet_preprocessed"] / name, plans_identifier)
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
    metrics = train_round(name, plans_identifier, config, device=device)
    weights, _ = load_weights(round_dir / "trained.safetensors")
    return SiteResult(job.site, job.round, job.task, weights, metrics, time.perf_counter() - started)


class InProcessExecutor:
    """Runs every job in this process, one after the other (2 CPU cores: parallel training would only thrash).

    Each site trains under its own nnU-Net folders (its ``nnunet_root``, else the environment's). A failing
    site becomes an error string for the coordinator — a missed round, not a crashed federation.
    """

    def __init__(self, plan: FederationPlan, work_dir: Path, device: str = "cpu") -> None:
        self.plan, self.work_dir, self.device = plan, Path(work_dir), device

    def __call__(self, jobs: Mapping[str, SiteJob], deadline_s: float) -> dict[str, SiteResult | str]:
        results: dict[str, SiteResult | str] = {}
        for site, job in jobs.items():
            site_plan = self.plan.site(site)
            try:
                with nnunet_folders(self.plan.nnunet_folders(site)):
                    results[site] = run_site_round(job, site_plan.dataset, self.plan.plans_identifier,
                                                   self.work_dir, self.device)
            except Exception as exc:  # a site's failure is reported, never raised into the round loop
                results[site] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        return results

    def ask(self, stage: str, requests: Mapping[str, Mapping[str, Any]], deadline_s: float) -> dict[str, Any]:
        """The fingerprint round's transport in this process (:data:`~.plans_round.Ask`), each site in its folders."""
        from nnunet_feddah.federation.plans_round import answer

        replies: dict[str, Any] = {}
        for site, request in requests.items():
            try:
                with nnunet_folders(self.plan.nnunet_folders(site)):
                    replies[site] = answer(self.plan, site, stage, request)
            except Exception as exc:  # named per site by the round, which then stops before anything is kept
                replies[site] = f"{type(exc).__name__}: {exc}"
        return replies
