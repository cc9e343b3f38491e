"""FedDAHTrainer with real nnU-Net on the phantom federation (CPU, tiny plans)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_feddah.nnunet import network as net
from nnunet_feddah.nnunet.round_config import RoundConfig, RoundConfigError
from nnunet_feddah.nnunet.weights import WeightsFileError, load_weights, save_weights
from nnunet_feddah.organs import Task


def _plans(fed: dict, site: str) -> dict:
    return json.loads((fed["root"] / "nnUNet_preprocessed" / site / f"{fed['plans']}.json").read_text())


def _round(tmp_path: Path, **fields) -> Path:
    config = {"task": "kidneys", "output_weights": str(tmp_path / "out" / "w.safetensors"),
              "output_metrics": str(tmp_path / "out" / "metrics.json"), "epochs": 1, "iterations_per_epoch": 2,
              "val_iterations_per_epoch": 1, "seed": 0, **fields}
    path = tmp_path / "round.json"
    path.write_text(json.dumps(config))
    return path


def _results_folder(fed: dict, site: str) -> Path:
    return fed["root"] / "nnUNet_results" / site / f"FedDAHTrainer__{fed['plans']}__3d_fullres"


def _initial_weights(fed: dict, site: str, task: Task, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = net.build_network(_plans(fed, site), task.num_outputs)
    tensors = {k: v.detach().clone() for k, v in net.unique_tensors(model).items()}
    save_weights(path, tensors, {"architecture_fingerprint": fed["fingerprints"][site], "task": task.key})
    return tensors


def test_nnunetv2_train_finds_the_trainer_and_trains_from_a_weights_file(phantom_federation, tmp_path):
    """The unmodified `nnUNetv2_train` CLI, trainer found through nnUNet_extTrainer."""
    fed, site, task = phantom_federation, phantom_federation["full"], Task.parse("kidneys")
    start = _initial_weights(fed, site, task, tmp_path / "start.safetensors")
    config = _round(tmp_path, initial_weights=str(tmp_path / "start.safetensors"), iterations_per_epoch=2,
                    initial_lr=1e-4)
    env = {**os.environ, "FEDDAH_ROUND_CONFIG": str(config)}
    cli = Path(sys.executable).parent / "nnUNetv2_train"
    proc = subprocess.run([str(cli), site, "3d_fullres", "0", "-tr", "FedDAHTrainer", "-p", fed["plans"],
                           "-device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Using trainer 'FedDAHTrainer' from" in proc.stdout

    trained, meta = load_weights(tmp_path / "out" / "w.safetensors")
    assert meta["task"] == "kidneys" and meta["architecture_fingerprint"] == fed["fingerprints"][site]
    assert set(trained) == set(start)
    assert trained["decoder.seg_layers.2.weight"].shape[0] == 3  # background + 2 kidneys
    # started from the given weights (small lr: close to them) and actually trained (not identical)
    drift = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert 0 < drift < 0.05

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["epochs"] == 1
    assert set(metrics["dice"]) == {"right_kidney", "left_kidney"}
    assert all(0.0 <= d <= 1.0 for d in metrics["dice"].values())
    assert metrics["train_loss"] > 0 and metrics["wall_time_s"]["train"] > 0
    # the trained network's predictions against the received weights' (W_s input): close but not identical
    js = metrics["predictive_js"]
    assert js["cases"] >= 1 and 0 < js["all"] <= js["foreground"] < 0.5, js
    results = json.loads((_results_folder(fed, site) / "dataset.json").read_text())
    assert results["labels"] == {"background": 0, "right kidney": 1, "left kidney": 2}


def test_in_process_round_learns_and_continues_the_lr_curve(phantom_federation, tmp_path, monkeypatch):
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    from nnunet_feddah.nnunet.trainer import train_round

    plotted_after_epochs = []
    nnunet_plot = LocalLogger.plot_progress_png
    monkeypatch.setattr(LocalLogger, "plot_progress_png", lambda self, folder: (
        plotted_after_epochs.append(len(self.my_fantastic_logging["train_losses"])), nnunet_plot(self, folder)))
    fed, site = phantom_federation, phantom_federation["partial"]
    config = _round(tmp_path, task="liver", epochs=2, iterations_per_epoch=4, epoch_offset=10, total_epochs=20)
    metrics = train_round(site, fed["plans"], config)
    # nnU-Net's progress plot is drawn once per round, after its last epoch, not after every epoch
    assert plotted_after_epochs == [2]
    assert (_results_folder(fed, site) / "fold_0" / "progress.png").is_file()
    lrs = metrics["learning_rates"]
    assert lrs == pytest.approx([1e-2 * (1 - e / 20) ** 0.9 for e in (10, 11)], rel=1e-6)
    assert metrics["train_loss_per_epoch"][1] < metrics["train_loss_per_epoch"][0]
    assert metrics["cases_per_organ"] == {"liver": 5}
    tensors, _ = load_weights(tmp_path / "out" / "w.safetensors")
    assert tensors["decoder.seg_layers.0.bias"].shape == (2,)


def test_nnunet_loader_limits_thread_pools_as_before_from_a_cached_scan():
    """nnU-Net augments each batch with every thread pool limited to 1 thread; the trainer only caches the scan."""
    import threadpoolctl
    from nnunetv2.training.dataloading import data_loader

    import nnunet_feddah.nnunet.trainer as trainer

    assert data_loader.threadpool_limits is trainer._threadpool_limits_cached

    def threads() -> dict[str, int]:
        return {lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()}

    before = threads()
    with data_loader.threadpool_limits(limits=1, user_api=None):
        inside, torch_inside = threads(), torch.get_num_threads()
    assert set(inside) == set(before) and any(lib["user_api"] == "openmp" for lib in threadpoolctl.threadpool_info())
    assert set(inside.values()) == {1} and torch_inside == 1
    assert threads() == before


def test_in_process_round_takes_the_config_object_not_the_environment(phantom_federation, tmp_path, monkeypatch):
    """train_round hands its RoundConfig to the trainer: a stale $FEDDAH_ROUND_CONFIG is never read."""
    from nnunet_feddah.nnunet.trainer import train_round

    fed, site = phantom_federation, phantom_federation["partial"]
    monkeypatch.setenv("FEDDAH_ROUND_CONFIG", str(tmp_path / "stale-round-that-does-not-exist.json"))
    config = RoundConfig.from_mapping({"task": "liver", "output_weights": str(tmp_path / "obj" / "w.safetensors"),
                                       "output_metrics": str(tmp_path / "obj" / "m.json"), "epochs": 1,
                                       "iterations_per_epoch": 1, "val_iterations_per_epoch": 1, "seed": 0})
    metrics = train_round(site, fed["plans"], config)
    assert metrics["task"] == "liver" and metrics["iterations"] == 1
    assert (tmp_path / "obj" / "w.safetensors").is_file() and not (tmp_path / "round.json").exists()


def test_label_remapping_is_exact_voxel_by_voxel(phantom_federation):
    """Site labels are AMOS ids; the network sees background + task organs in task order."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_feddah.nnunet.task_data import TaskFocusedDataset, TaskLabelTransform

    fed, site = phantom_federation, phantom_federation["full"]
    folder = fed["root"] / "nnUNet_preprocessed" / site / f"{fed['plans']}_3d_fullres"
    dataset = infer_dataset_class(str(folder))(str(folder))
    case = dataset.identifiers[0]
    _, seg, _, properties = dataset.load_case(case)
    seg = torch.from_numpy(np.asarray(seg[:]).astype(np.int16))
    seg[0, 0, 0, :3] = -1  # nnU-Net's "outside the image" marker must survive

    task = Task.parse("liver+right_kidney+spleen")
    mapped = TaskLabelTransform(task)(segmentation=seg.clone())["segmentation"]
    expected = torch.zeros_like(seg)
    expected[seg == 6], expected[seg == 2], expected[seg == 1], expected[seg == -1] = 1, 2, 3, -1
    assert torch.equal(mapped, expected)
    assert set(torch.unique(mapped).tolist()) == {-1, 0, 1, 2, 3}
    assert (seg == 3).any() and not (mapped[seg == 3] != 0).any()  # left kidney is not in the task

    focused = TaskFocusedDataset(dataset, task).load_case(case)[3]["class_locations"]
    assert set(focused) == {1, 2, 6} and len(properties["class_locations"]) == 15


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_round_config_chooses_the_optimizer_on_the_offset_poly_curve(phantom_federation, tmp_path, monkeypatch,
                                                                      optimizer):
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer, OffsetPolyLRScheduler

    fed, site = phantom_federation, phantom_federation["full"]
    monkeypatch.setenv("FEDDAH_ROUND_CONFIG", str(_round(tmp_path, task="liver", optimizer=optimizer,
                                                         initial_lr=3e-3, epoch_offset=1, total_epochs=2)))
    dataset_json = json.loads((fed["root"] / "nnUNet_preprocessed" / site / "dataset.json").read_text())
    trainer = FedDAHTrainer(_plans(fed, site) | {"continue_training": False}, "3d_fullres", 0, dataset_json,
                            torch.device("cpu"))
    trainer.initialize()
    expected = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    assert type(trainer.optimizer) is expected
    assert isinstance(trainer.lr_scheduler, OffsetPolyLRScheduler) and trainer.lr_scheduler.optimizer is trainer.optimizer
    if optimizer == "adamw":  # nnU-Net's nnUNetTrainerAdam: AMSGrad, the trainer's weight decay
        group = trainer.optimizer.param_groups[0]
        assert group["amsgrad"] and group["weight_decay"] == trainer.weight_decay
    trainer.lr_scheduler.step(0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * (1 - 1 / 2) ** 0.9)


def test_channels_last_is_the_same_arithmetic_as_nnunets_layout(phantom_federation):
    """The CPU trainer's channels-last layout (a speed choice, docs/TRAINER.md) changes no training step."""
    fed, site = phantom_federation, phantom_federation["full"]
    torch.manual_seed(0)
    batch = torch.randn(2, 1, *_plans(fed, site)["configurations"]["3d_fullres"]["patch_size"])
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        torch.manual_seed(1)
        model = net.build_network(_plans(fed, site), 3).to(memory_format=layout)
        sum(o.square().mean() for o in model(batch)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[1].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5 * grads[0].abs().max())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cpu_round_trains_channels_last_in_the_asked_precision(phantom_federation, tmp_path, precision):
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer, train_round

    if precision == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bfloat16; the trainer keeps float32 there (asserted below)")
    fed, site = phantom_federation, phantom_federation["full"]
    seen: dict[str, object] = {}

    def record(module, inputs, output):
        seen.setdefault("dtype", output.dtype)
        seen.setdefault("channels_last", module.weight.is_contiguous(memory_format=torch.channels_last_3d))

    original = FedDAHTrainer.on_train_start

    def hook_first_conv(trainer):
        original(trainer)
        next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv3d)).register_forward_hook(record)

    config = RoundConfig.load(_round(tmp_path, task="liver", iterations_per_epoch=1, cpu_precision=precision))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FedDAHTrainer, "on_train_start", hook_first_conv)
        metrics = train_round(site, fed["plans"], config)
    assert metrics["precision"] == precision and seen["channels_last"] is True
    assert seen["dtype"] == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
    tensors, _ = load_weights(config.output_weights)  # written in nnU-Net's layout and dtype
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values() if t.is_floating_point())


def test_training_batches_only_contain_task_labels(phantom_federation, tmp_path, monkeypatch):
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer

    fed, site = phantom_federation, phantom_federation["full"]
    monkeypatch.setenv("FEDDAH_ROUND_CONFIG", str(_round(tmp_path, task="pancreas+liver")))
    plans = _plans(fed, site) | {"continue_training": False}
    dataset_json = json.loads((fed["root"] / "nnUNet_preprocessed" / site / "dataset.json").read_text())
    trainer = FedDAHTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    train_loader, val_loader = trainer.get_dataloaders()
    seen = set()
    for loader in (train_loader, val_loader):
        for _ in range(3):
            target = next(loader)["target"][0]
            seen |= set(torch.unique(target).tolist())
    assert seen <= {0, 1, 2} and {1, 2} & seen
    assert trainer.label_manager.num_segmentation_heads == 3


def test_standalone_without_round_config_trains_every_annotated_organ(phantom_federation, monkeypatch):
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer

    fed, site = phantom_federation, phantom_federation["partial"]
    monkeypatch.delenv("FEDDAH_ROUND_CONFIG", raising=False)
    dataset_json = json.loads((fed["root"] / "nnUNet_preprocessed" / site / "dataset.json").read_text())
    trainer = FedDAHTrainer(_plans(fed, site) | {"continue_training": False}, "3d_fullres", 0, dataset_json,
                            torch.device("cpu"))
    assert trainer.task.key == "right_kidney+left_kidney+liver"
    assert trainer.num_epochs == 1000 and trainer.round_config is None
    assert trainer.weights_path.name == "feddah_weights.safetensors"


@pytest.mark.parametrize("case", ["unknown_organ", "organ_not_annotated", "other_architecture", "other_task_head",
                                  "missing_env"])
def test_bad_input_fails_clearly_and_writes_nothing(phantom_federation, tmp_path, monkeypatch, case):
    from nnunet_feddah.nnunet.task_data import TaskNotAvailableError
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer

    fed, site = phantom_federation, phantom_federation["partial"]
    plans = _plans(fed, site) | {"continue_training": False}
    dataset_json = json.loads((fed["root"] / "nnUNet_preprocessed" / site / "dataset.json").read_text())
    fields, error, message = {}, None, None
    if case == "unknown_organ":
        fields, error, message = {"task": "kidneys+appendix"}, RoundConfigError, "field 'task'.*appendix.*Known organs"
    elif case == "organ_not_annotated":
        fields, error, message = {"task": "spleen"}, TaskNotAvailableError, "needs \\['spleen'\\].*annotated_organs"
    elif case == "other_architecture":
        other = json.loads(json.dumps(plans))
        other["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 48]
        model = net.build_network(other, 3)
        save_weights(tmp_path / "foreign.safetensors", net.unique_tensors(model),
                     {"architecture_fingerprint": net.architecture_fingerprint(other)})
        fields = {"initial_weights": str(tmp_path / "foreign.safetensors")}
        error, message = WeightsFileError, "foreign.safetensors.*'architecture_fingerprint'"
    elif case == "other_task_head":
        _initial_weights(fed, site, Task.parse("liver"), tmp_path / "liver.safetensors")
        fields = {"initial_weights": str(tmp_path / "liver.safetensors")}
        error, message = net.ArchitectureMismatchError, "liver.safetensors.*task kidneys.*wrong shape.*seg_layers"
    else:
        monkeypatch.delenv("nnUNet_results")
        error, message = OSError, "nnUNet_results not set.*nnfeddah env"
    monkeypatch.setenv("FEDDAH_ROUND_CONFIG", str(_round(tmp_path, **fields)))
    results = _results_folder(fed, site)
    existed = results.exists()
    with pytest.raises(error, match=message):
        FedDAHTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert not (tmp_path / "out").exists()
    assert results.exists() == existed


def test_round_config_validation_names_file_and_field(tmp_path):
    path = _round(tmp_path, epochs=0)
    with pytest.raises(RoundConfigError, match=f"{path}.*field 'epochs'"):
        RoundConfig.load(path)
    path.write_text(json.dumps({"task": "liver", "output_weights": "w", "output_metrics": "m", "epoch": 3}))
    with pytest.raises(RoundConfigError, match="unknown field.*'epoch'"):
        RoundConfig.load(path)
    path.write_text(json.dumps({"task": "liver", "output_weights": "w", "output_metrics": "m", "epoch_offset": 5,
                                "epochs": 2, "total_epochs": 6}))
    with pytest.raises(RoundConfigError, match="'total_epochs'"):
        RoundConfig.load(path)
    path.write_text(json.dumps({"task": "liver", "output_weights": "w", "output_metrics": "m",
                                "cpu_precision": "half"}))
    with pytest.raises(RoundConfigError, match=f"{path}.*field 'cpu_precision' must be one of"):
        RoundConfig.load(path)
    path.write_text(json.dumps({"task": "liver", "output_weights": "w.safetensors", "output_metrics": "m.json"}))
    assert RoundConfig.load(path).output_weights == str(tmp_path / "w.safetensors")
