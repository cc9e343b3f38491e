"""The fingerprint round (issue 15): shared plans planned from every site's statistics, in-process and over Flower."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.plan import FederationPlanError
from nnunet_feddah.federation.plan_reader import load_plan, parse_plan
from nnunet_feddah.federation.plans_round import (
    PLANS_DIR,
    FingerprintRoundError,
    ensure_shared_plans,
    round_plans,
    round_record,
)
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.federation.site_round import InProcessExecutor
from nnunet_feddah.federation.start import shared_plans

SITE_IDS = (761, 762)


@pytest.fixture(scope="module")
def raw_sites(tmp_path_factory) -> Path:
    """Two phantom sites with different scanners, raw data only (5 training cases: nnU-Net's 5-fold split)."""
    from nnunet_feddah.data import phantom

    root = tmp_path_factory.mktemp("fingerprint_round_raw")
    phantom.write_cohort(root / "nnUNet_raw", num_sites=2, num_train=5, num_test=1, seed=5,
                         first_dataset_id=SITE_IDS[0])
    return root


def _plan_file(raw_sites: Path, tmp_path: Path, **fingerprint_round) -> Path:
    """A 2-site, 1-round plan over its own copy of the raw sites, with a fingerprint round."""
    root = tmp_path / "nnunet"
    shutil.copytree(raw_sites / "nnUNet_raw", root / "nnUNet_raw")
    data = {"name": "fingerprint-round", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": 1,
            "nnunet_root": str(root), "round_deadline_s": 600,
            "sites": [{"name": "a", "dataset": SITE_IDS[0], "stream": ["liver"]},
                      {"name": "b", "dataset": SITE_IDS[1], "stream": ["liver"]}],
            "local": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1,
                      "max_validation_cases": 1},
            "strategy": {"name": "feddah"}, "fingerprint_round": {"template": "cpu", **fingerprint_round}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def _never(*_):
    raise AssertionError("the round asked the sites although it had nothing to ask")


def test_in_process_round_plans_from_every_site_and_installs_the_plans_at_each(raw_sites: Path, tmp_path: Path):
    from nnunet_feddah.nnunet.datasets import nnunet_folders
    from nnunet_feddah.nnunet.federated_fingerprint import site_statistics
    from nnunet_feddah.nnunet.fingerprint_merge import merge_statistics

    plan = load_plan(_plan_file(raw_sites, tmp_path))
    state = tmp_path / "state"
    with pytest.raises(FederationPlanError, match="FedDAHPlansCPU.json does not exist"):
        validate_sites(plan)  # no plans anywhere yet
    assert all(d.fingerprint == "" for d in validate_sites(plan, require_plans=False).values())
    lines: list[str] = []
    record = ensure_shared_plans(plan, state, InProcessExecutor(plan, tmp_path / "work").ask, lines.append)

    with nnunet_folders(plan.nnunet_folders("a")):  # what each site released, recomputed here independently
        stats = {s: site_statistics(plan.site(s).dataset, log=lambda *_: None) for s in ("a", "b")}
    key = "foreground_intensity_properties_per_channel"
    both = merge_statistics(stats)["fingerprint"][key]["0"]
    alone = merge_statistics({"a": stats["a"]})["fingerprint"][key]["0"]
    assert record["normalisation"]["0"] == both
    assert abs(both["mean"] - alone["mean"]) > 1.0  # site b's scanner moved the CT normalisation
    found = validate_sites(plan)  # installed and preprocessed at both sites, one architecture
    for data in found.values():
        installed = json.loads(data.plans_file.read_text())
        assert installed[key]["0"] == both
        assert data.fingerprint == record["architecture_fingerprint"]
        assert installed["feddah"]["source"].endswith("(fingerprint round of a, b filling cpu)")
    assert record["training_cases"] == {"a": 5, "b": 5}
    plans, fingerprint, cases = shared_plans(plan, None, state)
    assert (fingerprint, cases) == (record["architecture_fingerprint"], {"a": 5, "b": 5}) and plans[key]["0"] == both
    kept = json.loads((state / PLANS_DIR / "statistics" / "b.json").read_text())
    assert kept == json.loads(json.dumps(stats["b"]))  # what left site b, exactly, for its data officer
    assert record["bytes"]["statistics_up"]["b"] == len(json.dumps(stats["b"]).encode())
    assert any("fingerprint round done" in line for line in lines)
    assert ensure_shared_plans(plan, state, _never) == record  # resumed: not asked again


def test_a_failing_site_stops_the_round_and_nothing_is_kept(raw_sites: Path, tmp_path: Path):
    plan = load_plan(_plan_file(raw_sites, tmp_path))
    broken = sorted(Path(plan.nnunet_folders("b")["nnUNet_raw"]).glob(f"Dataset{SITE_IDS[1]}_*/imagesTr/*.nii.gz"))
    broken[1].write_bytes(b"not a nifti file")
    case = broken[1].name.replace("_0000.nii.gz", "")
    state = tmp_path / "state"
    with pytest.raises(FingerprintRoundError, match=rf"(?s)stage 'statistics'.*b: .*case '{case}'.*run again"):
        ensure_shared_plans(plan, state, InProcessExecutor(plan, tmp_path / "work").ask, lambda *_: None)
    assert round_record(state) is None and checkpoint.read_committed(state, verify=False) is None
    assert not (state / PLANS_DIR / "FedDAHPlansCPU.json").exists()  # nothing was planned from site a alone


def test_a_template_for_other_plans_is_refused_before_any_site_is_asked(raw_sites: Path, tmp_path: Path):
    plan = load_plan(_plan_file(raw_sites, tmp_path, template="amos"))
    with pytest.raises(FingerprintRoundError, match="makes plans 'FedDAHPlansAMOS'.*plans_identifier"):
        ensure_shared_plans(plan, tmp_path / "state", _never)


def test_plan_reader_checks_the_fingerprint_round_section(tmp_path: Path):
    base = {"name": "x", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": 1,
            "sites": [{"name": "a", "dataset": 1, "stream": ["liver"]}],
            "local": {"epochs": 1, "iterations_per_epoch": 2}, "strategy": {"name": "feddah"}}
    plain = parse_plan(base)
    assert plain.fingerprint_round is None and "fingerprint_round" not in plain.to_json()  # old plan hashes hold
    planned = parse_plan({**base, "fingerprint_round": {"template": "cpu", "min_count": 20}})
    assert (planned.fingerprint_round.template, planned.fingerprint_round.min_count) == ("cpu", 20)
    assert parse_plan(planned.to_json()) == planned
    template = tmp_path / "mine.json"
    template.write_text("{}")
    assert parse_plan({**base, "fingerprint_round": {"template": "mine.json"}}, base_dir=tmp_path
                      ).fingerprint_round.template == str(template)
    with pytest.raises(FederationPlanError) as err:
        parse_plan({**base, "fingerprint_round": {"template": "gpu", "min_cont": 3}})
    assert "fingerprint_round.template: 'gpu' is neither a bundled template" in str(err.value)
    assert "fingerprint_round.min_cont: unknown field. Fix: did you mean 'min_count'?" in str(err.value)


@pytest.mark.slow
def test_a_federation_over_flower_plans_in_a_fingerprint_round_then_trains(raw_sites: Path, tmp_path: Path):
    """``coordinate --local`` with no plans at any site: the fingerprint round over real Flower (TLS,
    authenticated SuperNodes) plans and installs them, then round 1 trains on them."""
    plan_file = _plan_file(raw_sites, tmp_path)
    state = tmp_path / "state"
    run = subprocess.run([sys.executable, "-m", "nnunet_feddah.coordinate", "--plan", str(plan_file), "--state",
                          str(state), "--work", str(tmp_path / "work"), "--local"],
                         capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "shared plans: from a fingerprint round" in output
    record = round_record(state)
    assert record is not None and record["sites"] == ["a", "b"]
    plan = load_plan(plan_file)
    for data in validate_sites(plan).values():
        installed = json.loads(data.plans_file.read_text())
        assert installed["foreground_intensity_properties_per_channel"] == record["normalisation"]
    committed = checkpoint.read_committed(state)
    assert committed.round == 1 and committed.fingerprint == record["architecture_fingerprint"]
    assert {s["status"] for s in committed.history[0]["sites"].values()} == {"accepted"}
    log = (state / "coordinator.log").read_text()
    assert "fingerprint round (statistics): asking" in log and "fingerprint round done" in log


@pytest.mark.parametrize("damage", ["truncated", "not_an_object", "field_missing", "plans_file_gone"])
def test_a_damaged_fingerprint_round_record_is_refused_with_the_way_back(tmp_path: Path, damage: str):
    folder = tmp_path / "state" / PLANS_DIR
    folder.mkdir(parents=True)
    record = {"plans_file": "FedDAHPlansCPU.json", "architecture_fingerprint": "sha256:x", "training_cases": {"a": 5}}
    text = {"truncated": json.dumps(record)[:40], "not_an_object": "[1, 2]",
            "field_missing": json.dumps({**record, "training_cases": None})}.get(damage, json.dumps(record))
    (folder / "fingerprint_round.json").write_text(text)
    with pytest.raises(FingerprintRoundError, match=r"(?s)(fingerprint_round|FedDAHPlansCPU)\.json: .*damaged.*Fix"):
        round_plans(tmp_path / "state")
    assert (folder / "fingerprint_round.json").read_text() == text  # nothing was changed
