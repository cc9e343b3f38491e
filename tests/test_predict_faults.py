"""``nnfeddah predict`` on bad input: crafted checkpoints are refused unloaded, bad images are skipped per case."""

from __future__ import annotations

import builtins
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_feddah.errors import EXIT_FAILED
from nnunet_feddah.nnunet.network import build_network, is_head, unique_tensors
from nnunet_feddah.results import export, nnunet_folder
from nnunet_feddah.results.amos_channels import NUM_SLOTS, amos_dataset_json, pad_heads_to_amos
from nnunet_feddah.results.inference import InferenceError, SharedPlans, TaskModel, load_checkpoint
from nnunet_feddah.results.predict import MERGE_LOG
from nnunet_feddah.results.predict import main as predict_main


@pytest.fixture(scope="module")
def model_folder(phantom_federation, tmp_path_factory) -> dict:
    """An exported model folder (one task, kidneys, untrained weights) built by export's own functions.

    The same checkpoint dict (``nnunet_checkpoint``), ``torch.save``, plans/dataset.json and manifest as
    ``export_tasks`` writes, without a coordinator state: the input checks and the loader are under test.
    """
    fed = phantom_federation
    site = fed["full"]
    preprocessed = fed["root"] / "nnUNet_preprocessed" / site
    plans = json.loads((preprocessed / f"{fed['plans']}.json").read_text())
    dataset_json = amos_dataset_json(json.loads((preprocessed / "dataset.json").read_text()))
    organs = [2, 3]
    torch.manual_seed(0)
    task_weights = unique_tensors(build_network(plans, 1 + len(organs), deep_supervision=False))
    weights = pad_heads_to_amos(task_weights, organs, is_head)
    folder = tmp_path_factory.mktemp("faults") / site / nnunet_folder.model_folder_name(fed["plans"])
    target = folder / "fold_0" / nnunet_folder.checkpoint_name("kidneys")
    target.parent.mkdir(parents=True)
    provenance = {"task": "kidneys", "organs": organs, "output_labels": list(range(NUM_SLOTS))}
    torch.save(nnunet_folder.nnunet_checkpoint(nnunet_folder.nnunet_state_dict(plans, weights, 1), plans,
                                               dataset_json, feddah=provenance), target)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    export._write_manifest(folder, [export.ExportedTask("kidneys", tuple(organs), target)], "feddah", folder, 1,
                           plans["feddah"]["architecture_fingerprint"], site, fed["plans"], "3d_fullres")
    images = fed["root"] / "nnUNet_raw" / site / "imagesTs"
    return {"folder": folder, "images": images, "good": sorted(images.iterdir())[0]}


class _WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _copy_folder(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def test_exported_checkpoint_loads_weights_only(model_folder):
    path = model_folder["folder"] / "fold_0" / "kidneys.pth"
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no extra safe globals needed
    assert isinstance(raw["init_args"]["device"], torch.device)
    checkpoint = load_checkpoint(path)
    assert checkpoint["trainer_name"] == "FedDAHTrainer" and checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert checkpoint["feddah"]["task"] == "kidneys" and len(checkpoint["network_weights"]) > 0


def test_crafted_checkpoint_is_refused_and_runs_nothing(model_folder, tmp_path, capsys):
    folder = _copy_folder(model_folder["folder"], tmp_path)
    checkpoint_file = folder / "fold_0" / "kidneys.pth"
    genuine = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**genuine, "feddah": {**genuine["feddah"], "x": _WritesMarker(marker)}}, checkpoint_file)

    # the file is effective: a full unpickle does run its code
    probe = tmp_path / "probe"
    torch.save({"x": _WritesMarker(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert probe.exists()

    with pytest.raises(InferenceError, match=r"kidneys\.pth: not a checkpoint written by `nnfeddah export`.*"
                                             r"open.*would run code.*not loaded"):
        load_checkpoint(checkpoint_file)
    out = tmp_path / "out"
    assert predict_main(["-i", str(model_folder["images"]), "-o", str(out), "-m", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "kidneys.pth" in err and "would run code" in err and "Traceback" not in err
    assert not marker.exists(), "unpickling the crafted checkpoint ran its code"
    assert not (out / MERGE_LOG).exists()


def test_garbage_checkpoint_names_the_file(model_folder, tmp_path):
    path = tmp_path / "kidneys.pth"
    path.write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(InferenceError, match=r"kidneys\.pth: not a checkpoint written by `nnfeddah export`"):
        load_checkpoint(path)
    data = (model_folder["folder"] / "fold_0" / "kidneys.pth").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InferenceError, match=r"kidneys\.pth: .*truncated copy"):
        load_checkpoint(path)


def _write_bad_cases(good: Path, folder: Path) -> None:
    import SimpleITK as sitk

    folder.mkdir()
    shutil.copy(good, folder / good.name)
    data = good.read_bytes()
    (folder / "truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    (folder / "garbage_0000.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    volume = sitk.ReadImage(str(good))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(folder / "fourd_0000.nii.gz"))  # a real 4D NIfTI


def test_bad_images_are_skipped_and_the_rest_predicted(model_folder, tmp_path, capsys):
    images = tmp_path / "in"
    _write_bad_cases(model_folder["good"], images)
    out = tmp_path / "out"
    assert predict_main(["-i", str(images), "-o", str(out), "-m", str(model_folder["folder"])]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    good_case = model_folder["good"].name.removesuffix("_0000.nii.gz")
    log = json.loads((out / MERGE_LOG).read_text())
    assert list(log["cases"]) == [good_case] and (out / f"{good_case}.nii.gz").is_file()
    skipped = log["skipped"]
    assert sorted(skipped) == ["fourd", "garbage", "truncated"]
    assert "truncated_0000.nii.gz: truncated gzip stream (EOFError" in skipped["truncated"]
    assert "garbage_0000.nii.gz: corrupt or not a gzip stream (BadGzipFile" in skipped["garbage"]
    assert "fourd_0000.nii.gz: 4D image" in skipped["fourd"] and "expected 3D" in skipped["fourd"]
    for case in skipped:
        assert not (out / f"{case}.nii.gz").exists()
        assert f"{case}: skipped, " in captured.out  # one line per bad case
    assert "3 case(s) skipped" in captured.err

    # every case bad: the record is still written and the exit code is non-zero
    (images / model_folder["good"].name).unlink()
    everything_bad = tmp_path / "out2"
    assert predict_main(["-i", str(images), "-o", str(everything_bad), "-m", str(model_folder["folder"])]) == 2
    log = json.loads((everything_bad / MERGE_LOG).read_text())
    assert log["cases"] == {} and sorted(log["skipped"]) == ["fourd", "garbage", "truncated"]


def test_check_case_catches_channel_and_geometry_mismatches(model_folder, tmp_path):
    import SimpleITK as sitk

    folder = model_folder["folder"]
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    two = SharedPlans(plans, {**dataset_json, "channel_names": {"0": "CT", "1": "CT"}})
    good = str(model_folder["good"])
    assert SharedPlans(plans, dataset_json).check_case("c", {0: good}) is None
    assert "channel file(s) [0], the plans need channels 0..1" in two.check_case("c", {0: good})
    image = sitk.ReadImage(good)
    resized = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:-1])
    resized.CopyInformation(image[:, :, :-1])
    sitk.WriteImage(resized, str(tmp_path / "c_0001.nii.gz"))
    assert "c_0001.nii.gz: shape" in two.check_case("c", {0: good, 1: str(tmp_path / "c_0001.nii.gz")})
    respaced = sitk.Image(image)
    respaced.SetSpacing([s * 2 for s in image.GetSpacing()])
    sitk.WriteImage(respaced, str(tmp_path / "c_0001.nii.gz"))
    assert "c_0001.nii.gz: spacing" in two.check_case("c", {0: good, 1: str(tmp_path / "c_0001.nii.gz")})
    # a 4D array saved as a 3D image with vector pixels: also more than one volume per file
    stacked = np.stack([sitk.GetArrayFromImage(image)] * 2)
    sitk.WriteImage(sitk.GetImageFromArray(stacked), str(tmp_path / "v_0000.nii.gz"))
    problem = SharedPlans(plans, dataset_json).check_case("v", {0: str(tmp_path / "v_0000.nii.gz")})
    assert problem is not None and "v_0000.nii.gz: 4D image" in problem and "expected 3D" in problem
    # a corrupt stream of the right length (bytes flipped in the middle): zlib or CRC error, never silent
    data = bytearray(Path(good).read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
    (tmp_path / "d_0000.nii.gz").write_bytes(bytes(data))
    problem = SharedPlans(plans, dataset_json).check_case("d", {0: str(tmp_path / "d_0000.nii.gz")})
    assert problem is not None and "d_0000.nii.gz: corrupt or not a gzip stream" in problem
    with gzip.open(tmp_path / "e_0000.nii.gz", "wb") as stream:
        stream.write(b"\0" * 352)
    problem = SharedPlans(plans, dataset_json).check_case("e", {0: str(tmp_path / "e_0000.nii.gz")})
    assert problem is not None and "e_0000.nii.gz: not readable by SimpleITKIO" in problem
    # a NaN block: ITK would read it as 0 and the model would segment water; refused naming the file (issue 37)
    poisoned = sitk.GetArrayFromImage(image).astype(np.float32)
    poisoned[:2, :2, :2] = np.nan
    nan_image = sitk.GetImageFromArray(poisoned)
    nan_image.CopyInformation(image)
    sitk.WriteImage(nan_image, str(tmp_path / "n_0000.nii.gz"))
    problem = SharedPlans(plans, dataset_json).check_case("n", {0: str(tmp_path / "n_0000.nii.gz")})
    assert problem is not None and "n_0000.nii.gz: 8 NaN or infinite voxel(s)" in problem


def test_task_model_from_checkpoint_still_loads(model_folder):
    folder = model_folder["folder"]
    shared = SharedPlans(json.loads((folder / "plans.json").read_text()),
                         json.loads((folder / "dataset.json").read_text()))
    model = TaskModel.from_checkpoint(shared, folder / "fold_0" / "kidneys.pth", "kidneys", [2, 3],
                                      torch.device("cpu"))
    assert model.organs == [2, 3]
