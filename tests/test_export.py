"""Export of a coordinator state as an nnU-Net results folder, and the real ``nnUNetv2_predict`` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_feddah.federation.coordinator import Coordinator, SiteResult
from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.nnunet.network import build_network, hypernet_base, is_head, load_unique_tensors, unique_tensors
from nnunet_feddah.organs import BY_LABEL, Task
from nnunet_feddah.paths import bundled_plans_dir, ext_trainer_dir
from nnunet_feddah.results import amos_channels, export, nnunet_folder

STREAM = ["kidneys", "liver"]


def _synthetic_executor(jobs, deadline):
    """'Trained' uploads without training: the sent weights plus a small seeded change."""
    out = {}
    for site, job in jobs.items():
        g = torch.Generator().manual_seed(job.round)
        weights = {k: v + 0.02 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
                   for k, v in job.weights.items()}
        metrics = {"task": job.task, "train_loss": 0.5, "iterations": 2,
                   "dice": {BY_LABEL[job.organs[0]].key: 0.5}, "mean_dice": 0.5,
                   "num_training_cases": 4}
        out[site] = SiteResult(site, job.round, job.task, weights, metrics, 0.1)
    return out


@pytest.fixture(scope="module")
def exported(phantom_federation, tmp_path_factory) -> dict:
    """A FedDAH state after two synthetic rounds (kidneys, then liver) of a one-site plan, exported."""
    fed = phantom_federation
    site = fed["full"]
    plans = json.loads((fed["root"] / "nnUNet_preprocessed" / site / f"{fed['plans']}.json").read_text())
    plan = parse_plan({
        "name": "export", "plans_identifier": fed["plans"], "rounds_per_step": 1,
        "sites": [{"name": "a", "dataset": site, "stream": STREAM}],
        "local": {"epochs": 1, "iterations_per_epoch": 2},
        "strategy": {"name": "feddah", "params": {}},
    }, "export.json")
    tmp = tmp_path_factory.mktemp("export")
    state = tmp / "state"
    coordinator = Coordinator.open(plan, state, hypernet_base(plans), is_head,
                                   plans["feddah"]["architecture_fingerprint"], log=lambda *_: None)
    coordinator.run(_synthetic_executor)
    start = time.perf_counter()
    folder = export.export_tasks(state, plan, site, None, out_results=tmp / "results")
    return {"folder": folder, "state": state, "strategy": coordinator.strategy, "plans": plans, "site": site,
            "results": tmp / "results", "fed": fed, "seconds": time.perf_counter() - start}


def test_padded_heads_predict_the_task_network_in_amos_ids():
    """16-output network with suppressed rows == the task network, its labels mapped to AMOS ids."""
    plans = json.loads((bundled_plans_dir() / "template_cpu.json").read_text())
    task = Task.parse("spleen+pancreas")
    torch.manual_seed(0)
    small = build_network(plans, task.num_outputs, deep_supervision=False)
    weights = {k: v.detach().clone() for k, v in unique_tensors(small).items()}
    with torch.no_grad():  # make the heads decisive so the argmax is not all background
        for k in weights:
            if is_head(k):
                weights[k] *= 20
        load_unique_tensors(small, weights)
        padded = amos_channels.pad_heads_to_amos(weights, list(task.labels), is_head)
        amos = build_network(plans, amos_channels.NUM_SLOTS, deep_supervision=False)
        amos.load_state_dict(nnunet_folder.nnunet_state_dict(plans, padded, 1))
        x = torch.randn(1, 1, 48, 64, 64)
        want = np.asarray([0, *task.labels])[small(x).argmax(1).numpy()]  # task outputs -> AMOS ids
        logits = amos(x)
        got = logits.argmax(1).numpy()
    assert set(np.unique(want)) > {0}, "test input too easy: the task network predicts only background"
    np.testing.assert_array_equal(got, want)
    others = [s for s in range(amos_channels.NUM_SLOTS) if s not in (0, *task.labels)]
    gap = logits[:, [0]] - logits[:, others]
    assert torch.allclose(gap, torch.full_like(gap, amos_channels.SUPPRESSION_MARGIN), atol=1e-3)


def test_export_writes_a_standard_results_folder(exported):
    folder, strategy, plans = exported["folder"], exported["strategy"], exported["plans"]
    assert folder == exported["results"] / exported["site"] / "FedDAHTrainer__FedDAHPlansCPU__3d_fullres"
    assert json.loads((folder / "plans.json").read_text()) == plans
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert sorted(dataset_json["labels"].values()) == list(range(16))
    assert sorted(p.name for p in (folder / "fold_0").iterdir()) == ["kidneys.pth", "liver.pth"]
    manifest = json.loads((folder / nnunet_folder.MANIFEST).read_text())
    assert manifest["tasks"]["kidneys"]["amos_labels"] == [0, 2, 3] and manifest["round"] == 2

    ckpt = torch.load(folder / "fold_0" / "kidneys.pth", map_location="cpu", weights_only=True)
    assert ckpt["trainer_name"] == "FedDAHTrainer" and ckpt["init_args"]["configuration"] == "3d_fullres"
    assert ckpt["inference_allowed_mirroring_axes"] == (0, 1, 2) and ckpt["init_args"]["fold"] == 0
    assert ckpt["feddah"]["task_dataset_json"]["labels"] == {"background": 0, "right kidney": 1, "left kidney": 2}
    # the predictor builds the network with deep supervision off and loads strictly
    network = build_network(plans, 16, deep_supervision=False)
    network.load_state_dict(ckpt["network_weights"])
    task_net = build_network(plans, 3, deep_supervision=False)
    load_unique_tensors(task_net, strategy.task_weights("kidneys"))
    with torch.no_grad():
        x = torch.randn(1, 1, 48, 64, 64)
        want = task_net(x)
        got = network(x)
    torch.testing.assert_close(got[:, [0, 2, 3]], want)  # task rows are exactly the generated weights
    assert exported["seconds"] < 30


def test_unknown_task_names_state_and_field(exported):
    with pytest.raises(export.ExportError, match=r"'pancreas' is not in the coordinator state .*strategy-r0002"
                                                 r".*field 'tasks'.*kidneys, liver"):
        export.export_tasks(exported["state"], None, exported["site"], "FedDAHPlansCPU", tasks=["pancreas"],
                            out_results=exported["results"])
    with pytest.raises(export.ExportError, match="checkpoint.json"):
        export.export_tasks(exported["results"], None, exported["site"], "FedDAHPlansCPU",
                            out_results=exported["results"])


@pytest.mark.slow
def test_nnunetv2_predict_uses_an_exported_task(exported, tmp_path):
    import SimpleITK as sitk

    fed, site = exported["fed"], exported["site"]
    images = fed["root"] / "nnUNet_raw" / site / "imagesTs"
    env = {**os.environ, "nnUNet_raw": str(fed["root"] / "nnUNet_raw"),
           "nnUNet_preprocessed": str(fed["root"] / "nnUNet_preprocessed"),
           "nnUNet_results": str(exported["results"]), "nnUNet_extTrainer": str(ext_trainer_dir())}
    command = nnunet_folder.predict_command(site, fed["plans"], "kidneys", str(images), str(tmp_path / "pred"))
    command[0] = str(Path(sys.executable).parent / command[0])
    proc = subprocess.run([*command, "-npp", "0", "-nps", "0", "--disable_progress_bar"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    inputs = sorted(images.glob("*_0000.nii.gz"))
    assert inputs
    for image_file in inputs:
        out = tmp_path / "pred" / image_file.name.replace("_0000.nii.gz", ".nii.gz")
        assert out.is_file(), sorted(p.name for p in (tmp_path / "pred").iterdir())
        image, seg = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(out))
        assert seg.GetSize() == image.GetSize()
        np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 2, 3}  # AMOS ids of the kidneys
