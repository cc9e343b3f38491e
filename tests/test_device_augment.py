"""Device augmentation: nnU-Net's training augmentation on whole batches in plain torch (exercised on CPU tensors).

Checked against nnU-Net itself: the configuration is read off ``nnUNetTrainer.get_training_transforms``,
each transform's output equals batchgeneratorsv2's for the same draws, the draws follow the same
distributions as batchgeneratorsv2's own samplers, and the trainer's batches have nnU-Net's shapes/dtypes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from nnunet_feddah.nnunet.augment.batch_transforms import spatial_transform
from nnunet_feddah.nnunet.augment.device_augment import (
    DeviceAugmentConfig,
    DeviceAugmenter,
    DeviceAugmentError,
    apply_params,
    check_batch,
    cuda_or_cpu,
    describe,
    sample_params,
)
from nnunet_feddah.nnunet.augment.settings import config_from_pipeline
from nnunet_feddah.nnunet.round_config import (
    DEVICE_AUGMENTATION_ENV,
    RoundConfig,
    RoundConfigError,
    device_augmentation_requested,
)

ROTATION = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)  # nnU-Net's 3D (not dummy-2D) rotation_for_DA
DS_SCALES = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]


def nnunet_pipeline(patch=(48, 64, 64), dummy_2d=False, mask=(False,), cascaded=False, regions=None):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.get_training_transforms(patch, ROTATION, DS_SCALES, (0, 1, 2), dummy_2d,
                                                 use_mask_for_norm=list(mask), is_cascaded=cascaded,
                                                 foreground_labels=[1, 2], regions=regions, ignore_label=None)


@pytest.fixture(scope="module")
def config() -> DeviceAugmentConfig:
    return config_from_pipeline(nnunet_pipeline())


def only(config: DeviceAugmentConfig, **fields) -> DeviceAugmentConfig:
    """The config with every random transform switched off except the given fields; no mirroring, no DS."""
    off = {"p_rotation": 0, "p_scaling": 0, "p_noise": 0, "p_blur": 0, "p_brightness": 0, "p_contrast": 0,
           "p_lowres": 0, "p_gamma_inverted": 0, "p_gamma": 0, "mirror_axes": (), "ds_scales": None}
    return dataclasses.replace(config, **{**off, **fields})


def phantom_like(shape=(48, 64, 64), channels=1, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth CT-like image with blobs and their labels (including nnU-Net's -1 padding at one border)."""
    gen = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    seg = torch.zeros(shape, dtype=torch.int16)
    seg[(z - 0.2) ** 2 + y ** 2 + (x + 0.3) ** 2 < 0.2] = 1
    seg[(z + 0.3) ** 2 + (y - 0.3) ** 2 + (x - 0.3) ** 2 < 0.1] = 2
    seg[:2] = -1
    image = seg.float().clamp(min=0)[None].repeat(channels, 1, 1, 1) + 0.3 * torch.randn((channels, *shape), generator=gen)
    return image, seg[None]


# --- configuration read from nnU-Net ----------------------------------------------------------------------
def test_config_is_nnunets_own_pipeline(config):
    """The values nnU-Net 2.8.1 writes into get_training_transforms (nnUNetTrainer.py) and its transforms."""
    assert config.patch_size == (48, 64, 64)
    assert (config.p_rotation, config.rotation) == (0.2, ROTATION)
    assert (config.p_scaling, config.scaling, config.p_synchronize_scaling) == (0.2, (0.7, 1.4), 1.0)
    assert (config.p_noise, config.noise_std) == (0.1, (0.0, 0.1))
    assert (config.p_blur, config.blur_p_per_channel, config.blur_sigma) == (0.2, 0.5, (0.5, 1.0))
    assert (config.p_brightness, config.brightness) == (0.15, (0.75, 1.25))
    assert (config.p_contrast, config.contrast) == (0.15, (0.75, 1.25))
    assert (config.p_lowres, config.lowres_p_per_channel, config.lowres_scale) == (0.25, 0.5, (0.5, 1.0))
    assert (config.p_gamma_inverted, config.p_gamma, config.gamma) == (0.1, 0.3, (0.7, 1.5))
    assert config.mirror_axes == (0, 1, 2) and config.padding_label == -1
    assert config.ds_scales == tuple(tuple(s) for s in DS_SCALES)


@pytest.mark.parametrize("case", ["dummy_2d", "mask", "cascaded", "regions"])
def test_pipelines_the_device_cannot_reproduce_fail_clearly(case):
    kwargs = {"dummy_2d": {"dummy_2d": True, "patch": (8, 64, 64)}, "mask": {"mask": (True,)},
              "cascaded": {"cascaded": True}, "regions": {"regions": [[1, 2], [2]]}}[case]
    with pytest.raises(DeviceAugmentError, match="cannot reproduce nnU-Net's training pipeline.*'device_augmentation'"):
        config_from_pipeline(nnunet_pipeline(**kwargs))


def test_bad_config_and_bad_batches_fail_clearly(config):
    with pytest.raises(DeviceAugmentError, match="p_noise must be a probability"):
        dataclasses.replace(config, p_noise=1.5)
    with pytest.raises(DeviceAugmentError, match="scaling must be a range"):
        dataclasses.replace(config, scaling=(1.4, 0.7))
    with pytest.raises(DeviceAugmentError, match="patch_size must be 3 positive integers"):
        dataclasses.replace(config, patch_size=(64, 64))
    image, seg = phantom_like((8, 8, 8))
    with pytest.raises(DeviceAugmentError, match="3D batches"):
        check_batch(image, seg)
    with pytest.raises(DeviceAugmentError, match=r"\(b, 1, \*spatial\)"):
        check_batch(image[None], torch.cat((seg, seg))[None])
    with pytest.raises(DeviceAugmentError, match="integer tensor"):
        check_batch(image[None], seg[None].float())


# --- each transform equals batchgeneratorsv2's for the same draws -----------------------------------------
def test_identity_spatial_parameters_return_the_input_exactly(config):
    image, seg = phantom_like()
    params = sample_params(only(config), 1, 1)
    data, target = apply_params(only(config, padding_label=7), params, image[None].clone(), seg[None].clone())
    assert torch.equal(data[0], image) and torch.equal(target[0], seg)
    # forced through the resampling path with an identity matrix: still the input
    eye = torch.eye(3, dtype=torch.float64)[None]
    data, target = spatial_transform(image[None], seg[None], eye, torch.tensor([True]), image.shape[1:], -1)
    assert torch.allclose(data[0], image, atol=1e-5) and torch.equal(target[0], seg)


def test_centre_crop_of_a_larger_patch_equals_nnunets_crop():
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    image, seg = phantom_like((61, 80, 75))
    theirs = SpatialTransform((48, 64, 64), 0, False, p_rotation=0, p_scaling=0, border_mode_seg="constant",
                              padding_value_seg=-1)(image=image.clone(), segmentation=seg.clone())
    data, target = spatial_transform(image[None], seg[None], torch.eye(3, dtype=torch.float64)[None],
                                     torch.tensor([False]), (48, 64, 64), -1)
    assert torch.equal(data[0], theirs["image"]) and torch.equal(target[0], theirs["segmentation"])


def test_rotation_and_scaling_match_nnunets_spatial_transform():
    """Same affine: images agree to float precision; labels agree with nnU-Net's nearest-neighbour mode."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    image, seg = phantom_like((70, 90, 86))
    kwargs = {"patch_size": (48, 64, 64), "patch_center_dist_from_border": 0, "random_crop": False, "p_rotation": 1,
              "rotation": ROTATION, "p_scaling": 1, "scaling": (0.7, 1.4), "border_mode_seg": "constant",
              "padding_value_seg": -1}
    nearest, default = SpatialTransform(**kwargs, mode_seg="nearest"), SpatialTransform(**kwargs)
    agree_nearest, agree_default, agree_linear = [], [], []
    for seed in range(4):
        np.random.seed(seed)
        params = nearest.get_parameters(image=image)
        affine = torch.from_numpy(params["affine"])[None]
        data, target = spatial_transform(image[None], seg[None], affine, torch.tensor([True]), (48, 64, 64), -1)
        assert torch.allclose(data[0], nearest._apply_to_image(image, **params), atol=1e-4)
        agree_nearest.append((target[0] == nearest._apply_to_segmentation(seg, **params)).float().mean().item())
        theirs = default._apply_to_segmentation(seg, **params)
        agree_default.append((target[0] == theirs).float().mean().item())
        _, linear = spatial_transform(image[None], seg[None], affine, torch.tensor([True]), (48, 64, 64), -1, "linear")
        agree_linear.append((linear[0] == theirs).float().mean().item())
        assert set(torch.unique(linear).tolist()) <= {-1, 0, 1, 2}
    assert min(agree_nearest) > 0.999  # only voxels sampled exactly half-way between two labels may differ
    assert min(agree_linear) > 0.999  # the same for batchgeneratorsv2's default per-label linear argmax
    assert min(agree_default) > 0.97  # nearest vs nnU-Net's default: they differ on boundaries only
    print(f"label agreement with batchgeneratorsv2: nearest/nearest {min(agree_nearest):.5f}, "
          f"linear/linear {min(agree_linear):.5f}, nearest/linear {min(agree_default):.4f}-{max(agree_default):.4f}")


def test_affine_matrix_follows_nnunets_axis_conventions():
    from batchgeneratorsv2.transforms.spatial.spatial import create_affine_matrix_3d

    from nnunet_feddah.nnunet.augment.device_augment import rotation_matrix

    angles = torch.tensor([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.0]], dtype=torch.float64)
    for row in angles:
        expected = create_affine_matrix_3d(row.tolist(), [1.2] * 3)
        assert np.allclose((rotation_matrix(row[None]) * 1.2)[0].numpy(), expected)


@pytest.mark.parametrize("name", ["blur", "brightness", "contrast", "lowres", "gamma_inverted", "gamma", "noise"])
def test_intensity_transforms_match_batchgeneratorsv2(config, name):
    """Constant draws (two-sided ranges: >= 1) and probability 1 make both sides deterministic; noise: same std."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

    image, seg = phantom_like((40, 48, 44), channels=2)
    theirs, ours = {
        "blur": (GaussianBlurTransform((0.8, 0.8), p_per_channel=1),
                 {"p_blur": 1, "blur_p_per_channel": 1, "blur_sigma": (0.8, 0.8)}),
        "brightness": (MultiplicativeBrightnessTransform(1.2, False), {"p_brightness": 1, "brightness": (1.2, 1.2)}),
        "contrast": (ContrastTransform(1.2, True, False), {"p_contrast": 1, "contrast": (1.2, 1.2)}),
        "lowres": (SimulateLowResolutionTransform(0.6, False, True, None, p_per_channel=1),
                   {"p_lowres": 1, "lowres_p_per_channel": 1, "lowres_scale": (0.6, 0.6)}),
        "gamma_inverted": (GammaTransform(1.3, 1, False, 1, 1), {"p_gamma_inverted": 1, "gamma": (1.3, 1.3)}),
        "gamma": (GammaTransform(1.4, 0, False, 1, 1), {"p_gamma": 1, "gamma": (1.4, 1.4)}),
        "noise": (None, {"p_noise": 1, "noise_std": (0.05, 0.05)}),
    }[name]
    cfg = only(dataclasses.replace(config, patch_size=(40, 48, 44)), **ours)
    data, _ = apply_params(cfg, sample_params(cfg, 1, 2), image[None].clone(), seg[None].clone())
    if theirs is None:
        assert (data[0] - image).std().item() == pytest.approx(0.05, rel=0.02)
    else:
        assert torch.allclose(data[0], theirs(image=image.clone())["image"], atol=1e-5)


def test_mirroring_flips_image_and_labels_together_and_ds_targets_match_nnunet(config):
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    image, seg = phantom_like()
    cfg = only(config, mirror_axes=(0, 1, 2), ds_scales=config.ds_scales)
    params = sample_params(cfg, 1, 1)
    params.mirror[:] = torch.tensor([True, False, True])
    data, targets = apply_params(cfg, params, image[None].clone(), seg[None].clone())
    flipped = seg.flip([1, 3]).clamp(min=0)
    assert torch.equal(data[0], image.flip([1, 3]))
    expected = DownsampleSegForDSTransform(DS_SCALES)(segmentation=flipped)["segmentation"]
    assert [t.shape[1:] for t in targets] == [e.shape for e in expected]
    assert all(torch.equal(t[0], e) for t, e in zip(targets, expected, strict=True))


# --- the draws follow nnU-Net's distributions -------------------------------------------------------------
N = 20000


@pytest.fixture(scope="module")
def draws(config):
    return sample_params(config, N, 2, torch.Generator().manual_seed(0))


def rate(mask: torch.Tensor) -> float:
    return mask.double().mean().item()


def same_distribution(ours, theirs) -> None:
    assert stats.ks_2samp(np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)).pvalue > 1e-3


def test_probabilities_of_each_transform(config, draws):
    tol = 4 * math.sqrt(0.25 / N)  # four standard errors of a rate
    off_diagonal = draws.affine - torch.diag_embed(torch.diagonal(draws.affine, dim1=1, dim2=2))
    rotated = off_diagonal.abs().amax((1, 2)) > 1e-12
    assert rate(draws.spatial) == pytest.approx(1 - 0.8 * 0.8, abs=tol)
    assert rate(draws.noise) == pytest.approx(0.1, abs=tol)
    assert rate(draws.blur) == pytest.approx(0.2 * 0.5, abs=tol)
    assert rate(draws.blur.any(1)) == pytest.approx(0.2 * (1 - 0.5 ** 2), abs=tol)
    assert rate(draws.brightness_on) == pytest.approx(0.15, abs=tol)
    assert torch.equal(draws.brightness_on[:, 0], draws.brightness_on[:, 1])  # per sample, then every channel
    assert rate(draws.contrast_on) == pytest.approx(0.15, abs=tol)
    assert rate(draws.lowres) == pytest.approx(0.25 * 0.5, abs=tol)
    assert rate(draws.gamma_inverted_on) == pytest.approx(0.1, abs=tol)
    assert rate(draws.gamma_on) == pytest.approx(0.3, abs=tol)
    assert [rate(draws.mirror[:, a]) for a in range(3)] == pytest.approx([0.5] * 3, abs=tol)
    assert rate(rotated) == pytest.approx(0.2, abs=tol)
    assert rate(draws.affine.det().sub(1).abs() > 1e-9) == pytest.approx(0.2, abs=tol)  # only scaling changes det


def test_ranges_are_nnunets(config, draws):
    factors = torch.linalg.svdvals(draws.affine)
    scaled = (factors - 1).abs().amax(1) > 1e-9
    assert torch.allclose(factors[scaled], factors[scaled][:, :1].expand(-1, 3))  # one factor for all axes
    same_distribution(factors[scaled][:, 0], np.random.default_rng(0).uniform(0.7, 1.4, 4000))
    same_distribution(draws.noise_std, np.random.default_rng(1).uniform(0, 0.1, 4000))
    same_distribution(draws.blur_sigma.flatten(), np.random.default_rng(2).uniform(0.5, 1.0, 4000))
    same_distribution(draws.lowres_scale.flatten(), np.random.default_rng(3).uniform(0.5, 1.0, 4000))
    for values, (lo, hi) in ((draws.brightness, (0.75, 1.25)), (draws.contrast, (0.75, 1.25)),
                             (draws.gamma, (0.7, 1.5)), (draws.gamma_inverted, (0.7, 1.5))):
        values = values.flatten()
        assert rate(values < 1) == pytest.approx(0.5, abs=0.02) and lo <= values.min() and values.max() <= hi
        same_distribution(values[values < 1], np.random.default_rng(4).uniform(lo, 1, 4000))
        same_distribution(values[values >= 1], np.random.default_rng(5).uniform(1, hi, 4000))


def test_draws_match_batchgeneratorsv2_samplers(config, draws):
    """Two-sample tests against the parameters nnU-Net's own transform objects draw."""
    pipeline = nnunet_pipeline(patch=(8, 8, 8)).transforms
    spatial, noise, blur, brightness, contrast, lowres, gamma_inv, _, mirror = [
        getattr(t, "transform", t) for t in pipeline[:9]]
    image = torch.zeros((2, 8, 8, 8))
    np.random.seed(0)
    torch.manual_seed(0)
    M = 3000
    affines = [spatial.get_parameters(image=image)["affine"] for _ in range(M)]
    theirs = np.stack([a for a in affines if a is not None])
    assert len(theirs) / M == pytest.approx(rate(draws.spatial), abs=0.04)
    ours = draws.affine[draws.spatial].numpy()
    for i, j in ((0, 0), (0, 1), (1, 2), (2, 0), (2, 2)):
        same_distribution(ours[:, i, j], theirs[:, i, j])
    same_distribution(draws.noise_std, [noise.get_parameters(image=image)["sigmas"] for _ in range(M)])
    same_distribution(draws.blur_sigma[draws.blur].flatten(), np.concatenate(
        [np.ravel(blur.get_parameters(image=image)["sigmas"]) for _ in range(M)]))
    same_distribution(draws.brightness.flatten(),
                      torch.cat([brightness.get_parameters(image=image)["multipliers"] for _ in range(M)]))
    same_distribution(draws.contrast.flatten(),
                      torch.cat([contrast.get_parameters(image=image)["multipliers"] for _ in range(M)]))
    same_distribution(draws.lowres_scale[draws.lowres], np.concatenate(
        [lowres.get_parameters(image=image)["scales"].reshape(-1, 3)[:, 0].numpy() for _ in range(M)]))
    same_distribution(draws.gamma_inverted.flatten(),
                      torch.cat([gamma_inv.get_parameters(image=image)["gamma"] for _ in range(M)]))
    theirs_mirror = np.array([[a in mirror.get_parameters(image=image)["axes"] for a in range(3)] for _ in range(M)])
    assert theirs_mirror.mean(0) == pytest.approx([rate(draws.mirror[:, a]) for a in range(3)], abs=0.04)


def test_augmented_batches_stay_in_range_and_labels_in_the_label_set(config):
    image, seg = phantom_like((70, 90, 86), channels=1)
    batch, labels = image[None].repeat(4, 1, 1, 1, 1), seg[None].repeat(4, 1, 1, 1, 1)
    augment = DeviceAugmenter(dataclasses.replace(config, p_rotation=1, p_scaling=1), torch.Generator().manual_seed(1))
    for _ in range(3):
        data, targets = augment(batch.clone(), labels.clone())
        assert data.dtype == torch.float32 and data.shape == (4, 1, 48, 64, 64) and torch.isfinite(data).all()
        assert [t.shape for t in targets] == [(4, 1, 48, 64, 64), (4, 1, 24, 32, 32), (4, 1, 12, 16, 16)]
        assert all(t.dtype == torch.int16 and set(torch.unique(t).tolist()) <= {0, 1, 2} for t in targets)
        assert {1, 2} <= set(torch.unique(targets[0]).tolist())


# --- switching it on, falling back --------------------------------------------------------------------------
def test_switch_round_config_field_and_environment(tmp_path):
    base = {"task": "liver", "output_weights": "w", "output_metrics": "m"}
    path = tmp_path / "round.json"
    path.write_text(json.dumps({**base, "device_augmentation": "yes"}))
    with pytest.raises(RoundConfigError, match=f"{path}.*field 'device_augmentation' must be true or false"):
        RoundConfig.load(path)
    on = RoundConfig.from_mapping({**base, "device_augmentation": True})
    off = RoundConfig.from_mapping(base)
    assert off.device_augmentation is False
    assert device_augmentation_requested(on, {}) and not device_augmentation_requested(off, {})
    assert not device_augmentation_requested(None, {})
    assert device_augmentation_requested(off, {DEVICE_AUGMENTATION_ENV: "1"})
    assert device_augmentation_requested(None, {DEVICE_AUGMENTATION_ENV: "true"})
    assert not device_augmentation_requested(on, {DEVICE_AUGMENTATION_ENV: "0"})
    with pytest.raises(RoundConfigError, match=f"{DEVICE_AUGMENTATION_ENV}='maybe'.*set it to 1"):
        device_augmentation_requested(on, {DEVICE_AUGMENTATION_ENV: "maybe"})


def test_no_cuda_falls_back_to_cpu_tensors(monkeypatch, config):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_or_cpu("cuda") == torch.device("cpu") and cuda_or_cpu(None) == torch.device("cpu")
    assert cuda_or_cpu(torch.device("cpu")) == torch.device("cpu")
    assert "CPU tensors in the main process" in describe(torch.device("cpu"))
    image, seg = phantom_like((52, 70, 70))
    data, targets = DeviceAugmenter(config)(image[None], seg[None])
    assert data.device.type == "cpu" and data.shape == (1, 1, 48, 64, 64)


# --- in the trainer ---------------------------------------------------------------------------------------
def _round(tmp_path: Path, **fields) -> Path:
    config = {"task": "liver+right_kidney", "output_weights": str(tmp_path / "out" / "w.safetensors"),
              "output_metrics": str(tmp_path / "out" / "metrics.json"), "epochs": 1, "iterations_per_epoch": 2,
              "val_iterations_per_epoch": 1, "seed": 0, **fields}
    path = tmp_path / "round.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def _trainer(fed: dict, site: str, tmp_path: Path, monkeypatch, device_augmentation: bool):
    from nnunet_feddah.nnunet.trainer import FedDAHTrainer

    monkeypatch.setenv("FEDDAH_ROUND_CONFIG", str(_round(tmp_path, device_augmentation=device_augmentation)))
    monkeypatch.delenv(DEVICE_AUGMENTATION_ENV, raising=False)
    base = fed["root"] / "nnUNet_preprocessed" / site
    plans = json.loads((base / f"{fed['plans']}.json").read_text()) | {"continue_training": False}
    trainer = FedDAHTrainer(plans, "3d_fullres", 0, json.loads((base / "dataset.json").read_text()),
                            torch.device("cpu"))
    trainer.initialize()
    return trainer


def test_trainer_batches_have_nnunets_shapes_dtypes_and_task_labels(phantom_federation, tmp_path, monkeypatch):
    """Device path vs nnU-Net's own get_training_transforms + data loader, same plans, same site."""
    fed, site = phantom_federation, phantom_federation["full"]
    reference = _trainer(fed, site, tmp_path / "cpu", monkeypatch, device_augmentation=False)
    nnunet_loader, _ = reference.get_dataloaders()
    expected = next(nnunet_loader)
    assert reference._device_augmenter is None

    trainer = _trainer(fed, site, tmp_path / "device", monkeypatch, device_augmentation=True)
    loader, _ = trainer.get_dataloaders()
    assert trainer._device_augmenter.config.patch_size == tuple(trainer.configuration_manager.patch_size)
    seen: set[int] = set()
    for _ in range(3):
        raw = next(loader)  # cropped to nnU-Net's enlarged patch, task labels, -1 padding kept
        assert raw["target"].dtype == torch.int16 and set(torch.unique(raw["target"]).tolist()) <= {-1, 0, 1, 2}
        data, target = trainer._device_augmenter(raw["data"], raw["target"])
        assert data.shape == expected["data"].shape and data.dtype == expected["data"].dtype == torch.float32
        assert [(t.shape, t.dtype) for t in target] == [(t.shape, t.dtype) for t in expected["target"]]
        for t in target:
            seen |= set(torch.unique(t).tolist())
    assert seen <= {0, 1, 2} and {1, 2} & seen  # background, liver, right kidney (AMOS 6 and 2 remapped)
    assert "device augmentation" in Path(trainer.log_file).read_text()


def test_training_with_device_augmentation_learns(phantom_federation, tmp_path, monkeypatch):
    """12 iterations on the CPU plan with augmentation on CPU tensors: ~12 s alone on 2 cores."""
    from nnunet_feddah.nnunet.trainer import train_round

    fed = phantom_federation
    monkeypatch.delenv(DEVICE_AUGMENTATION_ENV, raising=False)
    config = _round(tmp_path, task="liver", epochs=3, iterations_per_epoch=4, device_augmentation=True,
                    max_validation_cases=1)
    metrics = train_round(fed["partial"], fed["plans"], config)
    losses = metrics["train_loss_per_epoch"]
    assert metrics["augmentation"] == "device (cpu)"
    print("train loss per epoch with device augmentation:", losses)
    assert losses[-1] < losses[0], losses
