"""Unique tensor naming, architecture fingerprints and the weights file format."""

import json

import pytest
import torch

from nnunet_feddah.nnunet import network as net
from nnunet_feddah.nnunet.weights import WeightsFileError, load_weights, read_header, save_weights
from nnunet_feddah.paths import bundled_plans_dir


def _template(name: str = "template_cpu.json") -> dict:
    return json.loads((bundled_plans_dir() / name).read_text())


def test_unique_tensors_drop_the_state_dict_aliases():
    model = net.build_network(_template(), num_outputs=3)
    unique = net.unique_tensors(model)
    state = model.state_dict()
    assert len(state) > 2 * len(unique)  # all_modules.* and decoder.encoder.* aliases
    assert not any(".all_modules." in k or k.startswith("decoder.encoder.") for k in unique)
    distinct = {t.data_ptr() for t in state.values()}
    assert len(distinct) == len(unique)
    assert sum(t.numel() for t in unique.values()) == sum(p.numel() for p in model.parameters())


def test_strict_load_round_trips_and_refuses_bad_weights():
    plans = _template()
    source, target = net.build_network(plans, 3), net.build_network(plans, 3)
    net.load_unique_tensors(target, {k: v.detach().clone() for k, v in net.unique_tensors(source).items()})
    x = torch.randn(1, 1, 48, 64, 64)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(x)[0], target(x)[0])

    before = {k: v.detach().clone() for k, v in net.unique_tensors(target).items()}
    other_task = net.unique_tensors(net.build_network(plans, 4))
    with pytest.raises(net.ArchitectureMismatchError, match="wrong shape.*seg_layers"):
        net.load_unique_tensors(target, other_task, source="w.safetensors")
    bad = {k: v.detach().clone() for k, v in net.unique_tensors(source).items()}
    bad["encoder.stages.0.0.convs.0.conv.weight"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(net.ArchitectureMismatchError, match="NaN"):
        net.load_unique_tensors(target, bad)
    missing = dict(list(net.unique_tensors(source).items())[1:])
    with pytest.raises(net.ArchitectureMismatchError, match="1 missing"):
        net.load_unique_tensors(target, missing)
    assert all(torch.equal(before[k], v) for k, v in net.unique_tensors(target).items())


def test_fingerprint_ignores_the_task_head_but_not_the_trunk():
    plans = _template()
    fp = net.architecture_fingerprint(plans)
    assert fp.startswith("sha256:") and fp == net.architecture_fingerprint(plans)
    wider = _template()
    wider["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 96]
    assert net.architecture_fingerprint(wider) != fp
    relu = _template()
    relu["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "torch.nn.ReLU"
    assert net.architecture_fingerprint(relu) != fp  # same shapes, different network
    assert net.architecture_fingerprint(plans, input_channels=2) != fp


def test_amos_template_is_the_31m_parameter_network():
    with torch.device("meta"):
        model = net.build_network(_template("template_amos.json"), num_outputs=16)
    assert 30e6 < sum(p.numel() for p in model.parameters()) < 32e6


def test_weights_file_round_trip_and_errors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float32)}
    path = save_weights(tmp_path / "w.safetensors", tensors, {"task": "kidneys"})
    shapes, meta = read_header(path)
    assert shapes == {"a": (3, 4), "b": (5,)} and meta["task"] == "kidneys"
    loaded, _ = load_weights(path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary files left

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsFileError, match="junk.safetensors.*not a readable safetensors"):
        read_header(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsFileError, match="does not exist"):
        read_header(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(WeightsFileError, match="field 'format'"):
        read_header(tmp_path / "foreign.safetensors")


def test_the_same_weights_give_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders its metadata by a per-process hash seed; the writer sorts it (identical states hash
    identically, issue 37). Two fresh interpreters with different hash seeds write one file each."""
    import hashlib
    import os
    import subprocess
    import sys

    script = ("import sys, torch; from nnunet_feddah.nnunet.weights import save_weights; "
              "save_weights(sys.argv[1], {'b': torch.arange(6.).reshape(2, 3), 'a': torch.ones(4)}, "
              "{'task': 'kidneys', 'organs': '2,3', 'dataset': 'Dataset601_x', 'trainer': 'FedDAHTrainer', "
              "'note': 'ü'})")
    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / f"w{seed}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded, meta = load_weights(tmp_path / "w1.safetensors")
    assert torch.equal(loaded["b"], torch.arange(6.).reshape(2, 3)) and meta["note"] == "ü"


def test_paired_cpu_batches_give_the_batch_one_result_and_leave_the_network_as_it_was():
    torch.manual_seed(0)
    model = net.build_network(_template(), num_outputs=3, deep_supervision=False).eval()
    tile = torch.randn(1, 1, 32, 48, 48)
    seen: list[int] = []
    model.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        plain = model(tile)
        with net.paired_cpu_batches(model):
            paired = model(tile)
            model(torch.cat((tile, tile)))  # a real batch of two is not doubled again
    assert seen == [1, 2, 2]
    assert paired.shape == plain.shape == (1, 3, 32, 48, 48)
    assert torch.allclose(paired, plain, atol=1e-4)  # another convolution backend: rounding differs, nothing else
    assert (paired.argmax(1) == plain.argmax(1)).float().mean() > 0.9999
    assert "forward" not in model.__dict__  # the class's forward again
    supervised = net.build_network(_template(), num_outputs=3, deep_supervision=True).eval()
    with torch.no_grad(), net.paired_cpu_batches(supervised):
        outputs = supervised(tile)
    assert isinstance(outputs, list) and all(o.shape[0] == 1 for o in outputs)


def test_predictive_js_is_zero_for_equal_predictions_and_one_for_disjoint_certain_ones():
    from nnunet_feddah.nnunet.validation import predictive_js

    logits = torch.randn(3, 4, 5, 6)
    assert predictive_js(logits, logits) == pytest.approx(0.0, abs=1e-12)
    certain = torch.full((2, 8), -50.0)
    certain[0, :4] = certain[1, 4:] = 50.0
    assert predictive_js(certain, certain.flip(0)) == pytest.approx(1.0, abs=1e-9)
    region = torch.zeros(8, dtype=torch.bool)
    region[:2] = True
    mixed = certain.clone()
    mixed[:, 2:] = certain.flip(0)[:, 2:]
    assert predictive_js(certain, mixed, region) == pytest.approx(0.0, abs=1e-9)  # differs only outside the region
    assert predictive_js(certain, mixed) == pytest.approx(0.75, abs=1e-9)


@pytest.mark.parametrize("shape,mirroring", [((40, 57, 64), False), ((60, 48, 48), False), ((40, 48, 60), True)])
def test_cpu_sliding_window_equals_nnunets_predictor(shape, mirroring):
    """Tiles two at a time (odd counts, test-time mirroring included) give nnU-Net's own sliding-window logits."""
    from nnunet_feddah.results.amos_channels import amos_dataset_json
    from nnunet_feddah.results.inference import PreparedImage, SharedPlans, TaskModel

    torch.manual_seed(0)
    shared = SharedPlans(_template(), amos_dataset_json({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                         "labels": {"background": 0, "liver": 6}}))
    network = net.build_network(shared.plans, 16, 1, deep_supervision=False)
    model = TaskModel(shared, network.state_dict(), [6], "liver", torch.device("cpu"), use_mirroring=mirroring)
    image = PreparedImage("case", torch.randn(1, *shape), {})
    calls: list[int] = []
    model.predictor.network.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    ours = model.logits(image)
    batched_calls, calls[:] = list(calls), []
    with torch.no_grad(), net.paired_cpu_batches(model.predictor.network):
        theirs = model.predictor.predict_logits_from_preprocessed_data(image.data)
    tiles = len(model.predictor._internal_get_sliding_window_slicers(shape))
    per_tile = 8 if mirroring else 1  # nnU-Net's mirror combinations of three axes, plus the plain pass
    assert len(calls) == tiles * per_tile and len(batched_calls) == -(-tiles // 2) * per_tile  # half the calls
    assert ours.shape == theirs.shape == (16, *shape) and ours.dtype == theirs.dtype == torch.half
    assert torch.equal(ours, theirs)  # a tile's logits do not depend on its batch partner: bit for bit
    with torch.no_grad():  # three tiles per call: another oneDNN blocking, so float32 rounding differs, and
        # nnU-Net's float16 accumulators (Gaussian weights up to 10) carry it to a few 1e-2 at most
        grouped = net.cpu_sliding_window(model.predictor, image.data, tiles_per_batch=3)
    assert torch.allclose(grouped.float(), ours.float(), atol=0.05)
    assert (grouped.argmax(0) == ours.argmax(0)).float().mean() > 0.999
