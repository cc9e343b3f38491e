"""FedDAHTrainer starting from a DAHyper checkpoint (real nnU-Net on the phantom federation, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunet_feddah.method.amr import AMR
from nnunet_feddah.method.dahyper import DAHyper, DAHyperConfig
from nnunet_feddah.method.hypernet_file import HypernetFileError, save_hypernet
from nnunet_feddah.nnunet import network as net
from nnunet_feddah.nnunet.round_config import RoundConfig, RoundConfigError


def _site(fed: dict, site: str) -> tuple[dict, dict]:
    folder = fed["root"] / "nnUNet_preprocessed" / site
    plans = json.loads((folder / f"{fed['plans']}.json").read_text()) | {"continue_training": False}
    return plans, json.loads((folder / "dataset.json").read_text())


def _hypernet(plans: dict, path: Path, fingerprint: str | None = None) -> DAHyper:
    """A DAHyper with 'kidneys' (fitted to a perturbed upload, so it is not nnU-Net's init) and 'left_first'."""
    hyper = DAHyper(net.hypernet_base(plans), net.is_head, DAHyperConfig())
    amr = AMR(hyper)
    amr.allocate("kidneys", [2, 3])
    generator = torch.Generator().manual_seed(1)
    upload = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in hyper.generate("kidneys").items()}
    amr.update("kidneys", upload, round_index=1, source="site")
    amr.allocate("left_first", [3, 2])  # same organs, other output order
    save_hypernet(path, hyper, fingerprint or plans["feddah"]["architecture_fingerprint"])
    return hyper


def _round(tmp_path: Path, **fields) -> Path:
    config = {"task": "kidneys", "output_weights": "out/w.safetensors", "output_metrics": "out/metrics.json",
              "epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "seed": 0,
              "max_validation_cases": 1, **fields}
    path = tmp_path / "round.json"
    path.write_text(json.dumps(config))
    return path


def test_trainer_starts_from_the_generated_weights_and_trains(phantom_federation, tmp_path, monkeypatch):
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer

    fed, site = phantom_federation, phantom_federation["full"]
    plans, dataset_json = _site(fed, site)
    hyper = _hypernet(plans, tmp_path / "hyper.safetensors")
    # relative to the round config file, like the other paths
    monkeypatch.setenv("FEDDAH_ROUND_CONFIG", str(_round(tmp_path, hypernet_checkpoint="hyper.safetensors")))
    trainer = FedDAHTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert trainer.round_config.hypernet_checkpoint == str(tmp_path / "hyper.safetensors")
    trainer.initialize()
    expected = hyper.generate("kidneys")
    loaded = net.unique_tensors(trainer._plain_network())
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    assert loaded["decoder.seg_layers.0.weight"].shape[0] == 3

    trainer.disable_checkpointing = True
    trainer.run_training()
    trainer.perform_actual_validation()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and set(metrics["dice"]) == {"right_kidney", "left_kidney"}
    assert metrics["start_weights"] == {"hypernet_checkpoint": str(tmp_path / "hyper.safetensors"),
                                        "hypernet_task": "kidneys"}
    from nnunet_feddah.nnunet.weights import load_weights

    trained, meta = load_weights(tmp_path / "out" / "w.safetensors")
    assert meta["task"] == "kidneys" and set(trained) == set(expected)
    assert 0 < max((trained[k] - expected[k]).abs().max().item() for k in expected)  # it did train


@pytest.mark.parametrize("case", ["other_fingerprint", "unregistered_task", "organ_order", "both_fields",
                                  "task_without_checkpoint", "missing_checkpoint", "not_a_checkpoint"])
def test_bad_hypernet_input_fails_clearly_and_writes_nothing(phantom_federation, tmp_path, monkeypatch, case):
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer

    fed, site = phantom_federation, phantom_federation["partial"]
    plans, dataset_json = _site(fed, site)
    ckpt = tmp_path / "hyper.safetensors"
    _hypernet(plans, ckpt, "sha256:someotherarchitecture" if case == "other_fingerprint" else None)
    fields: dict = {"hypernet_checkpoint": str(ckpt)}
    error, message = HypernetFileError, None
    if case == "other_fingerprint":
        message = "hyper.safetensors.*'architecture_fingerprint' is sha256:someotherarchitecture"
    elif case == "unregistered_task":
        fields["task"] = "liver"
        message = "hyper.safetensors.*'hypernet_checkpoint'.*no task 'liver'.*'hypernet_task'.*registered tasks.*kidneys"
    elif case == "organ_order":
        fields["hypernet_task"] = "left_first"
        message = "hyper.safetensors.*'left_first'.*organs \\[3, 2\\].*'task' 'kidneys' needs \\[2, 3\\]"
    elif case == "both_fields":
        (tmp_path / "w0.safetensors").write_bytes(b"")
        fields["initial_weights"] = str(tmp_path / "w0.safetensors")
        error, message = RoundConfigError, "round.json.*'initial_weights' and 'hypernet_checkpoint' are both given"
    elif case == "task_without_checkpoint":
        fields = {"hypernet_task": "kidneys"}
        error, message = RoundConfigError, "round.json.*'hypernet_task' needs field 'hypernet_checkpoint'"
    elif case == "missing_checkpoint":
        fields = {"hypernet_checkpoint": "nope.safetensors"}
        error, message = RoundConfigError, "round.json.*'hypernet_checkpoint' points to .*nope.safetensors"
    else:
        (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
        fields = {"hypernet_checkpoint": "junk.safetensors"}
        message = "junk.safetensors is not a readable safetensors file"
    monkeypatch.setenv("FEDDAH_ROUND_CONFIG", str(_round(tmp_path, **fields)))
    results = fed["root"] / "nnUNet_results" / site / f"FedDAHTrainer__{fed['plans']}__3d_fullres"
    existed = results.exists()
    with pytest.raises(error, match=message):
        FedDAHTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert not (tmp_path / "out").exists()
    assert results.exists() == existed


def test_round_config_hypernet_fields(tmp_path):
    (tmp_path / "h.safetensors").write_bytes(b"")
    config = RoundConfig.load(_round(tmp_path, hypernet_checkpoint="h.safetensors"))
    assert config.hypernet_checkpoint == str(tmp_path / "h.safetensors") and config.hypernet_key == "kidneys"
    config = RoundConfig.load(_round(tmp_path, task="right_kidney+left_kidney", hypernet_checkpoint="h.safetensors"))
    assert config.hypernet_key == "kidneys"  # the canonical key of the round's task
    config = RoundConfig.load(_round(tmp_path, hypernet_checkpoint="h.safetensors", hypernet_task="site3/kidneys"))
    assert config.hypernet_key == "site3/kidneys"
    assert RoundConfig.from_mapping(config.to_json()).hypernet_task == "site3/kidneys"
    with pytest.raises(RoundConfigError, match="'hypernet_task' must be a non-empty"):
        RoundConfig.load(_round(tmp_path, hypernet_checkpoint="h.safetensors", hypernet_task=""))
