"""Shared plans: every site gets the identical architecture, installed with nnU-Net's own machinery."""

from __future__ import annotations

import json
import shutil

import pytest

from nnunet_feddah.nnunet import shared_plans


def test_sites_share_one_architecture_and_normalisation(phantom_federation):
    fed = phantom_federation
    fingerprints = fed["fingerprints"]
    assert len(set(fingerprints.values())) == 1
    plans = {site: json.loads((fed["root"] / "nnUNet_preprocessed" / site / f"{fed['plans']}.json").read_text())
             for site in fingerprints}
    a, b = plans.values()
    assert a["dataset_name"] != b["dataset_name"]
    assert a["configurations"] == b["configurations"]
    assert a["foreground_intensity_properties_per_channel"] == b["foreground_intensity_properties_per_channel"]
    assert a["feddah"]["architecture_fingerprint"] == next(iter(fingerprints.values()))
    for site in fingerprints:  # recomputed from the installed files, and preprocessed data exists
        assert shared_plans.site_fingerprint(site, fed["plans"]) == fingerprints[site]
        folder = fed["root"] / "nnUNet_preprocessed" / site / f"{fed['plans']}_3d_fullres"
        assert len(list(folder.glob("*.pkl"))) == 5


def test_plans_file_from_the_reference_site_installs_at_another_hospital(phantom_federation, tmp_path):
    """The real-federation path: a third site receives the shared plans JSON, not the reference's data."""
    from nnunet_feddah.data import phantom

    fed = phantom_federation
    raw = fed["root"] / "nnUNet_raw"
    new_site = phantom.write_cohort(tmp_path / "raw", num_sites=1, num_train=2, num_test=0, seed=99,
                                    first_dataset_id=703)[0]
    shutil.copytree(new_site, raw / new_site.name)
    shared_file = fed["root"] / "nnUNet_preprocessed" / fed["full"] / f"{fed['plans']}.json"
    exported = tmp_path / "shared_plans.json"
    shutil.copy(shared_file, exported)
    try:
        got = shared_plans.install([703], plans_file=str(exported), log=lambda *_: None)
        assert got == {new_site.name: fed["fingerprints"][fed["full"]]}
        installed = json.loads((fed["root"] / "nnUNet_preprocessed" / new_site.name / f"{fed['plans']}.json")
                               .read_text())
        assert installed["dataset_name"] == new_site.name
        assert installed["foreground_intensity_properties_per_channel"] == json.loads(
            shared_file.read_text())["foreground_intensity_properties_per_channel"]
    finally:
        shutil.rmtree(raw / new_site.name, ignore_errors=True)
        shutil.rmtree(fed["root"] / "nnUNet_preprocessed" / new_site.name, ignore_errors=True)


def test_amos_template_gives_a_different_fingerprint():
    from nnunet_feddah.nnunet.network import architecture_fingerprint

    cpu, amos = shared_plans.load_template("cpu"), shared_plans.load_template("amos")
    assert architecture_fingerprint(cpu) != architecture_fingerprint(amos)


def test_cli_errors_name_the_problem(phantom_federation, capsys, monkeypatch):
    assert shared_plans.main(["install", "--template", "nosuch", "-d", "701"]) == 2
    assert "plans template 'nosuch' not found" in capsys.readouterr().err
    assert shared_plans.main(["install", "--template", "cpu", "-d", "999"]) == 2
    assert "dataset '999' not found" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_raw")
    assert shared_plans.main(["install", "--template", "cpu", "-d", "701"]) == 2
    assert "nnUNet_raw not set" in capsys.readouterr().err


def test_fingerprint_cli(phantom_federation, capsys):
    fed = phantom_federation
    assert shared_plans.main(["fingerprint", "-d", fed["full"], "-p", fed["plans"]]) == 0
    assert capsys.readouterr().out.strip() == fed["fingerprints"][fed["full"]]
    with pytest.raises(shared_plans.SharedPlansError, match="does not exist"):
        shared_plans.site_fingerprint(fed["full"], "NoSuchPlans")
