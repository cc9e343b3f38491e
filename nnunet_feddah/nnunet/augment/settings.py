"""nnU-Net's training pipeline -> :class:`DeviceAugmentConfig`: the device augmentation's numbers, read, not copied.

``nnUNetTrainer.get_training_transforms`` builds a batchgeneratorsv2 ``ComposeTransforms`` whose
probabilities and ranges are written into nnU-Net's source. Reading them off the built objects keeps the
device path on exactly nnU-Net's distributions — for this nnU-Net version and any later one that keeps
the same transforms — and lets a pipeline the device path cannot reproduce (2D, dummy-2D, cascade,
regions, masking, elastic deformation, another order...) fail with a message instead of being silently
approximated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform

from nnunet_feddah.nnunet.augment.device_augment import DeviceAugmentConfig, DeviceAugmentError

FIX = "set the round config field 'device_augmentation' to false / unset FEDDAH_DEVICE_AUGMENTATION"


def _unsupported(what: str) -> DeviceAugmentError:
    return DeviceAugmentError(f"device augmentation cannot reproduce nnU-Net's training pipeline: {what}. "
                              f"Use nnU-Net's CPU augmentation for this configuration ({FIX})")


def _require(transform: Any, **expected: Any) -> None:
    for name, value in expected.items():
        found = getattr(transform, name)
        if found != value:
            raise _unsupported(f"{type(transform).__name__}.{name} is {found!r}, only {value!r} is supported")


def _range(value: Any, name: str) -> tuple[float, float]:
    """A (lo, hi) range from a tuple, a constant or nnU-Net's two-sided BGContrast."""
    if isinstance(value, BGContrast):
        value = value.contrast_range
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and not callable(value[0]):
        return float(value[0]), float(value[1])
    raise _unsupported(f"{name} is {value!r}; only constants and (lo, hi) ranges are supported")


def _two_sided(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, BGContrast):
        raise _unsupported(f"{name} is {value!r}; the device path draws it two-sided like nnU-Net's BGContrast")
    return _range(value, name)


def _spatial(t: SpatialTransform, p: float) -> dict:
    _require(t, random_crop=False, p_elastic_deform=0, p_rot_per_axis=1, mode_image="bilinear",
             padding_mode_image="zeros", border_mode_seg="constant", align_corners=False)
    if p != 1:
        raise _unsupported("the spatial transform is wrapped in a RandomTransform")
    if len(t.patch_size) != 3:
        raise _unsupported(f"patch size {tuple(t.patch_size)} is not 3D (2D and dummy-2D augmentation)")
    return {"patch_size": tuple(int(s) for s in t.patch_size), "p_rotation": float(t.p_rotation),
            "rotation": _range(t.rotation, "rotation"), "p_scaling": float(t.p_scaling),
            "scaling": _range(t.scaling, "scaling"),
            "p_synchronize_scaling": float(t.p_synchronize_scaling_across_axes),
            "padding_label": int(t.padding_value_seg)}


def _noise(t: GaussianNoiseTransform, p: float) -> dict:
    _require(t, p_per_channel=1, synchronize_channels=True)
    return {"p_noise": p, "noise_std": _range(t.noise_variance, "noise_variance")}


def _blur(t: GaussianBlurTransform, p: float) -> dict:
    _require(t, synchronize_channels=False, synchronize_axes=False)
    return {"p_blur": p, "blur_p_per_channel": float(t.p_per_channel), "blur_sigma": _range(t.blur_sigma, "blur_sigma")}


def _brightness(t: MultiplicativeBrightnessTransform, p: float) -> dict:
    _require(t, p_per_channel=1, synchronize_channels=False)
    return {"p_brightness": p, "brightness": _two_sided(t.multiplier_range, "multiplier_range")}


def _contrast(t: ContrastTransform, p: float) -> dict:
    _require(t, p_per_channel=1, synchronize_channels=False, preserve_range=True)
    return {"p_contrast": p, "contrast": _two_sided(t.contrast_range, "contrast_range")}


def _lowres(t: SimulateLowResolutionTransform, p: float) -> dict:
    _require(t, synchronize_channels=False, synchronize_axes=True, ignore_axes=None, allowed_channels=None)
    return {"p_lowres": p, "lowres_p_per_channel": float(t.p_per_channel), "lowres_scale": _range(t.scale, "scale")}


def _gamma(t: GammaTransform, p: float) -> dict:
    _require(t, p_per_channel=1, synchronize_channels=False, p_retain_stats=1)
    if t.p_invert_image not in (0, 1):
        raise _unsupported(f"GammaTransform.p_invert_image is {t.p_invert_image}; only 0 or 1 are supported")
    key = "p_gamma_inverted" if t.p_invert_image == 1 else "p_gamma"
    return {key: p, "gamma": _two_sided(t.gamma, "gamma")}


def _mirror(t: MirrorTransform, p: float) -> dict:
    if p != 1:
        raise _unsupported("mirroring is wrapped in a RandomTransform")
    return {"mirror_axes": tuple(int(a) for a in t.allowed_axes)}


def _remove_label(t: RemoveLabelTransform, p: float) -> dict:
    _require(t, set_to=0, segmentation_channels=None)
    return {"removed_label": int(t.label_value)}


def _deep_supervision(t: DownsampleSegForDSTransform, p: float) -> dict:
    scales = tuple(tuple(float(s) for s in (scale if isinstance(scale, (tuple, list)) else [scale] * 3))
                   for scale in t.ds_scales)
    return {"ds_scales": scales}


# nnU-Net's order, which is also the order the device path applies them in
READERS: list[tuple[type, Callable[[Any, float], dict]]] = [
    (SpatialTransform, _spatial), (GaussianNoiseTransform, _noise), (GaussianBlurTransform, _blur),
    (MultiplicativeBrightnessTransform, _brightness), (ContrastTransform, _contrast),
    (SimulateLowResolutionTransform, _lowres), (GammaTransform, _gamma), (MirrorTransform, _mirror),
    (RemoveLabelTransform, _remove_label), (DownsampleSegForDSTransform, _deep_supervision),
]
# a transform nnU-Net leaves out never fires
ABSENT = {"p_noise": 0.0, "noise_std": (0.0, 0.0), "p_blur": 0.0, "blur_p_per_channel": 0.0, "blur_sigma": (1.0, 1.0),
          "p_brightness": 0.0, "brightness": (1.0, 1.0), "p_contrast": 0.0, "contrast": (1.0, 1.0), "p_lowres": 0.0,
          "lowres_p_per_channel": 0.0, "lowres_scale": (1.0, 1.0), "p_gamma_inverted": 0.0, "p_gamma": 0.0,
          "gamma": (1.0, 1.0), "mirror_axes": (), "ds_scales": None}


def config_from_pipeline(pipeline: BasicTransform, label_interpolation: str = "nearest") -> DeviceAugmentConfig:
    """The :class:`DeviceAugmentConfig` whose draws follow ``pipeline`` (nnU-Net's ``get_training_transforms``).

    ``label_interpolation``: nnU-Net's spatial transform interpolates labels linearly (per-label argmax);
    the device path defaults to nearest neighbour, the cheaper choice the issue asked for; pass ``"linear"``
    for batchgeneratorsv2's behaviour.
    """
    if not isinstance(pipeline, ComposeTransforms):
        raise _unsupported(f"expected a ComposeTransforms, got {type(pipeline).__name__}")
    found: dict[str, Any] = {}
    position = -1
    for item in pipeline.transforms:
        p, inner = (float(item.apply_probability), item.transform) if isinstance(item, RandomTransform) else (1.0, item)
        index = next((i for i, (kind, _) in enumerate(READERS) if type(inner) is kind), None)
        if index is None:
            raise _unsupported(f"transform {type(inner).__name__} has no device equivalent")
        if index < position:
            raise _unsupported(f"{type(inner).__name__} comes after {READERS[position][0].__name__}, not in nnU-Net's "
                               f"order")
        position = index
        values = READERS[index][1](inner, p)
        twice = [k for k in values if k in found and k != "gamma"]
        if twice:
            raise _unsupported(f"{type(inner).__name__} ({twice[0]}) appears more than once")
        if "gamma" in found and values.get("gamma", found["gamma"]) != found["gamma"]:
            raise _unsupported(f"the two gamma transforms use different ranges ({found['gamma']} vs {values['gamma']})")
        found.update(values)
    if "patch_size" not in found:
        raise _unsupported("the pipeline has no SpatialTransform (it defines the patch size)")
    if found.pop("removed_label", found["padding_label"]) != found["padding_label"]:
        raise _unsupported("the label nnU-Net removes is not the spatial transform's padding label")
    return DeviceAugmentConfig(**{**ABSENT, **found, "label_interpolation": label_interpolation})
