"""Shared fixtures: a throwaway nnU-Net work folder with a small phantom federation installed.

Building it (phantom -> nnU-Net fingerprints -> shared CPU plans -> preprocessing) takes ~30 s, so it
is done once per test session and shared read-only; tests that write results use their own folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nnunet_feddah.paths import nnunet_env

SITE_FULL = 701  # annotates all 15 organs
SITE_PARTIAL = 702  # annotates kidneys and liver only
PLANS = "FedDAHPlansCPU"


@pytest.fixture(scope="session")
def nnunet_work(tmp_path_factory) -> Path:
    """A work folder whose nnU-Net variables are set for the whole session."""
    root = tmp_path_factory.mktemp("nnunet_work")
    saved = {k: os.environ.get(k) for k in nnunet_env(root)}
    os.environ.update(nnunet_env(root))
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def phantom_federation(nnunet_work: Path) -> dict:
    """Two phantom sites with the shared CPU plans installed and preprocessed."""
    from nnunet_feddah.data import phantom
    from nnunet_feddah.nnunet import shared_plans

    phantom.write_cohort(nnunet_work / "nnUNet_raw", num_sites=2, num_train=5, num_test=1, seed=7,
                         annotated={1: "all", 2: "kidneys+liver"}, first_dataset_id=SITE_FULL)
    fingerprints = shared_plans.install([SITE_FULL, SITE_PARTIAL], template="cpu", num_processes=2,
                                        log=lambda *_: None)
    names = list(fingerprints)
    return {"root": nnunet_work, "full": names[0], "partial": names[1], "plans": PLANS,
            "fingerprints": fingerprints}
