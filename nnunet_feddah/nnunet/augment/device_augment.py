"""nnU-Net's training augmentation on whole batches, on the device the batch already lives on.

nnU-Net augments every sample in CPU worker processes (batchgeneratorsv2), then ships the finished
patches to the GPU. On a GPU machine with few CPU cores those workers, not the GPU, set the pace. This
module does the same augmentation with plain torch on a batch ``(b, c, *shape)`` — on CUDA when the
batch is there, on CPU tensors otherwise (that is how it is tested; no code path needs CUDA).

What it reproduces, in nnU-Net's order: spatial transform (rotation + scaling about the patch centre,
resampled to the patch; a plain centre crop where neither fires), Gaussian noise, Gaussian blur,
multiplicative brightness, contrast, low-resolution simulation, inverted gamma, gamma, mirroring, the
padding label -> background, and the deep-supervision targets. The random parameters follow the
distributions of :class:`DeviceAugmentConfig`, which :mod:`nnunet_feddah.nnunet.augment.settings` reads off
nnU-Net's own pipeline, so no nnU-Net number is written down here. Parameters are drawn on the CPU
(small tensors, one torch generator) and applied on the batch's device by the deterministic batch
transforms of :mod:`nnunet_feddah.nnunet.augment.batch_transforms`.

Labels are resampled nearest-neighbour by default (cheap); ``label_interpolation="linear"`` interpolates
each label's indicator and takes the argmax, as batchgeneratorsv2 does. The two differ only on boundary
voxels of rotated/scaled samples (see docs/AUGMENTATION.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.nnunet.augment.batch_transforms import (
    contrast,
    deep_supervision_targets,
    gamma_correction,
    gaussian_blur,
    per_volume,
    put_volumes,
    select_volumes,
    simulate_low_resolution,
    spatial_transform,
)

Range = tuple[float, float]


class DeviceAugmentError(FedDAHError, ValueError):
    """A configuration or a batch that the device augmentation cannot handle; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceAugmentConfig:
    """Every distribution of the pipeline. Probabilities ``p_*`` are per sample unless named ``*_per_channel``.

    ``brightness``, ``contrast`` and ``gamma`` are *two-sided* ranges ``(lo, hi)`` around 1: half of the draws
    come uniformly from ``[lo, 1)``, the other half from ``[1, hi]`` (nnU-Net's ``BGContrast``), so that
    darkening and brightening are equally likely although the range is not symmetric.
    ``noise_std`` is the range of the noise's standard deviation (nnU-Net calls it ``noise_variance`` but
    uses the draw as a standard deviation). ``ds_scales`` are the deep-supervision scales per output
    (``None``: one target, no deep supervision). ``label_interpolation`` is ``"nearest"`` (the default,
    cheapest) or ``"linear"`` (each label's indicator interpolated, argmax — batchgeneratorsv2's way).
    """

    patch_size: tuple[int, int, int]
    p_rotation: float
    rotation: Range
    p_scaling: float
    scaling: Range
    p_synchronize_scaling: float
    p_noise: float
    noise_std: Range
    p_blur: float
    blur_p_per_channel: float
    blur_sigma: Range
    p_brightness: float
    brightness: Range
    p_contrast: float
    contrast: Range
    p_lowres: float
    lowres_p_per_channel: float
    lowres_scale: Range
    p_gamma_inverted: float
    p_gamma: float
    gamma: Range
    mirror_axes: tuple[int, ...]
    ds_scales: tuple[tuple[float, ...], ...] | None
    padding_label: int = -1
    blur_truncate: float = 6.0
    label_interpolation: str = "nearest"

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or not all(isinstance(s, int) and s > 0 for s in self.patch_size):
            raise DeviceAugmentError(f"device augmentation: patch_size must be 3 positive integers, got "
                                     f"{self.patch_size!r} (2D configurations are not supported)")
        for name in ("p_rotation", "p_scaling", "p_synchronize_scaling", "p_noise", "p_blur", "blur_p_per_channel",
                     "p_brightness", "p_contrast", "p_lowres", "lowres_p_per_channel", "p_gamma_inverted", "p_gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise DeviceAugmentError(f"device augmentation: {name} must be a probability in [0, 1], got {value!r}")
        for name in ("rotation", "scaling", "noise_std", "blur_sigma", "brightness", "contrast", "lowres_scale",
                     "gamma"):
            value = getattr(self, name)
            if len(value) != 2 or not value[0] <= value[1]:
                raise DeviceAugmentError(f"device augmentation: {name} must be a range (lo, hi) with lo <= hi, "
                                         f"got {value!r}")
        positive = ("scaling", "blur_sigma", "brightness", "contrast", "lowres_scale", "gamma")
        for name in positive:
            if getattr(self, name)[0] <= 0:
                raise DeviceAugmentError(f"device augmentation: {name} must be > 0, got {getattr(self, name)!r}")
        if self.noise_std[0] < 0:
            raise DeviceAugmentError(f"device augmentation: noise_std must be >= 0, got {self.noise_std!r}")
        if not set(self.mirror_axes) <= {0, 1, 2}:
            raise DeviceAugmentError(f"device augmentation: mirror_axes must be spatial axes 0-2, got "
                                     f"{self.mirror_axes!r}")
        if self.label_interpolation not in ("nearest", "linear"):
            raise DeviceAugmentError(f"device augmentation: label_interpolation must be 'nearest' or 'linear', got "
                                     f"{self.label_interpolation!r}")
        for scale in self.ds_scales or ():
            if len(scale) != 3 or not all(0 < s <= 1 for s in scale):
                raise DeviceAugmentError(f"device augmentation: every deep-supervision scale must be 3 factors in "
                                         f"(0, 1], got {scale!r}")


@dataclass
class AugmentParams:
    """One batch's random draws (CPU tensors). Masks say where a transform fires; values elsewhere are unused.

    ``affine`` is the (b, 3, 3) matrix that maps an output voxel's offset from the patch centre to the input
    offset (axis order z, y, x), rotation after scaling; ``spatial`` marks the samples where it is not the
    identity. Per-channel draws are (b, c).
    """

    affine: torch.Tensor
    spatial: torch.Tensor
    noise_std: torch.Tensor
    noise: torch.Tensor
    blur_sigma: torch.Tensor
    blur: torch.Tensor
    brightness: torch.Tensor
    brightness_on: torch.Tensor
    contrast: torch.Tensor
    contrast_on: torch.Tensor
    lowres_scale: torch.Tensor
    lowres: torch.Tensor
    gamma_inverted: torch.Tensor
    gamma_inverted_on: torch.Tensor
    gamma: torch.Tensor
    gamma_on: torch.Tensor
    mirror: torch.Tensor


# --- drawing the parameters -------------------------------------------------------------------------------
def _uniform(shape: Sequence[int], bounds: Range, gen: torch.Generator | None) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(tuple(shape), generator=gen, dtype=torch.float64)


def _chance(shape: Sequence[int], p: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64) < p


def _two_sided(shape: Sequence[int], bounds: Range, gen: torch.Generator | None) -> torch.Tensor:
    """Half the draws below 1, half above (when the range allows both), uniform within each side."""
    lo, hi = bounds
    below = _uniform(shape, (lo, 1.0), gen) if lo < 1 else torch.full(tuple(shape), lo, dtype=torch.float64)
    above = _uniform(shape, (max(lo, 1.0), hi), gen)
    return torch.where(_chance(shape, 0.5, gen) & (lo < 1), below, above)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """(b, 3) angles about axes 0, 1, 2 -> (b, 3, 3) right-handed rotations, applied axis 0 first."""
    out = torch.eye(3, dtype=angles.dtype).repeat(angles.shape[0], 1, 1)
    for axis in range(3):
        i, j = (axis + 1) % 3, (axis + 2) % 3
        cos, sin = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        rot = torch.eye(3, dtype=angles.dtype).repeat(angles.shape[0], 1, 1)
        rot[:, i, i], rot[:, i, j], rot[:, j, i], rot[:, j, j] = cos, -sin, sin, cos
        out = rot @ out
    return out


def sample_params(config: DeviceAugmentConfig, batch_size: int, channels: int,
                  generator: torch.Generator | None = None) -> AugmentParams:
    """Draw every random decision for a batch, sample by sample and channel by channel as nnU-Net does."""
    b, bc, g = (batch_size,), (batch_size, channels), generator
    rotate, scale = _chance(b, config.p_rotation, g), _chance(b, config.p_scaling, g)
    angles = torch.where(rotate[:, None], _uniform((batch_size, 3), config.rotation, g), 0.0)
    same = _chance(b, config.p_synchronize_scaling, g)
    per_axis = _uniform((batch_size, 3), config.scaling, g)
    factors = torch.where(same[:, None], per_axis[:, :1].expand(-1, 3), per_axis)
    factors = torch.where(scale[:, None], factors, 1.0)
    affine = rotation_matrix(angles) @ torch.diag_embed(factors)

    def per_channel(p_sample: float, p_channel: float = 1.0) -> torch.Tensor:
        return _chance(b, p_sample, g)[:, None] & _chance(bc, p_channel, g)

    return AugmentParams(
        affine=affine, spatial=rotate | scale,
        noise_std=_uniform(b, config.noise_std, g), noise=_chance(b, config.p_noise, g),
        blur_sigma=_uniform((batch_size, channels, 3), config.blur_sigma, g),
        blur=per_channel(config.p_blur, config.blur_p_per_channel),
        brightness=_two_sided(bc, config.brightness, g), brightness_on=per_channel(config.p_brightness),
        contrast=_two_sided(bc, config.contrast, g), contrast_on=per_channel(config.p_contrast),
        lowres_scale=_uniform(bc, config.lowres_scale, g),
        lowres=per_channel(config.p_lowres, config.lowres_p_per_channel),
        gamma_inverted=_two_sided(bc, config.gamma, g), gamma_inverted_on=per_channel(config.p_gamma_inverted),
        gamma=_two_sided(bc, config.gamma, g), gamma_on=per_channel(config.p_gamma),
        mirror=_chance((batch_size, 3), 0.5, g) & torch.tensor([a in config.mirror_axes for a in range(3)]),
    )


@torch.no_grad()
def apply_params(config: DeviceAugmentConfig, params: AugmentParams, data: torch.Tensor,
                 seg: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | torch.Tensor]:
    """Augment (b, c, *shape) images and (b, 1, *shape) labels with drawn parameters; return (data, target).

    ``target`` is a list (one tensor per deep-supervision output) when ``config.ds_scales`` is set, the
    single label tensor otherwise — exactly what nnU-Net's loader puts into a batch.
    """
    data, seg = spatial_transform(data.float(), seg, params.affine, params.spatial, config.patch_size,
                                  config.padding_label, config.label_interpolation)
    if params.noise.any():
        idx = torch.nonzero(params.noise).flatten().to(data.device)
        std = params.noise_std[params.noise].to(device=data.device, dtype=data.dtype).view(-1, 1, 1, 1, 1)
        data[idx] += torch.randn_like(data[idx]) * std
    if params.blur.any():
        where, volumes = select_volumes(data, params.blur)
        put_volumes(data, where, gaussian_blur(volumes, params.blur_sigma[params.blur], config.blur_truncate))
    if params.brightness_on.any():
        where, volumes = select_volumes(data, params.brightness_on)
        put_volumes(data, where, volumes * per_volume(params.brightness, params.brightness_on, data))
    if params.contrast_on.any():
        where, volumes = select_volumes(data, params.contrast_on)
        put_volumes(data, where, contrast(volumes, per_volume(params.contrast, params.contrast_on, data)))
    scales = params.lowres_scale[params.lowres].tolist()
    for (i, c), scale in zip(torch.nonzero(params.lowres).tolist(), scales, strict=True):
        data[i, c] = simulate_low_resolution(data[i, c], scale)
    for on, gammas, invert in ((params.gamma_inverted_on, params.gamma_inverted, True),
                               (params.gamma_on, params.gamma, False)):
        if on.any():
            where, volumes = select_volumes(data, on)
            put_volumes(data, where, gamma_correction(volumes, per_volume(gammas, on, data), invert))
    for i, flags in enumerate(params.mirror.tolist()):
        dims = [1 + axis for axis in range(3) if flags[axis]]  # dims of one sample (c, z, y, x)
        if dims:
            data[i], seg[i] = data[i].flip(dims), seg[i].flip(dims)
    seg = torch.where(seg == config.padding_label, torch.zeros_like(seg), seg)
    targets = deep_supervision_targets(seg, config.ds_scales)
    return data.contiguous(), targets if config.ds_scales is not None else targets[0]


class DeviceAugmenter:
    """Callable ``(data, seg) -> (data, target)`` for training batches; draws with its own CPU generator if given."""

    def __init__(self, config: DeviceAugmentConfig, generator: torch.Generator | None = None):
        self.config = config
        self.generator = generator

    def __call__(self, data: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | torch.Tensor]:
        check_batch(data, seg)
        params = sample_params(self.config, data.shape[0], data.shape[1], self.generator)
        return apply_params(self.config, params, data, seg)

    def __repr__(self) -> str:
        return f"DeviceAugmenter({self.config})"


def check_batch(data: torch.Tensor, seg: torch.Tensor) -> None:
    """Refuse anything but a 3D batch with one integer label channel of the same batch and spatial shape."""
    if data.ndim != 5 or seg.ndim != 5:
        raise DeviceAugmentError(f"device augmentation needs 3D batches (b, c, z, y, x); got data "
                                 f"{tuple(data.shape)} and labels {tuple(seg.shape)}")
    if seg.shape[1] != 1 or seg.shape[0] != data.shape[0] or seg.shape[2:] != data.shape[2:]:
        raise DeviceAugmentError(f"device augmentation: labels {tuple(seg.shape)} must be (b, 1, *spatial) of data "
                                 f"{tuple(data.shape)} (cascaded/previous-stage channels are not supported)")
    if seg.is_floating_point() or seg.dtype == torch.bool:
        raise DeviceAugmentError(f"device augmentation: labels must be an integer tensor, got {seg.dtype}")
    if data.device != seg.device:
        raise DeviceAugmentError(f"device augmentation: data on {data.device} but labels on {seg.device}")


def cuda_or_cpu(requested: torch.device | str | None = None) -> torch.device:
    """The device to augment on: the requested one if usable, CUDA if available, else the CPU — never an error."""
    if requested is not None:
        device = torch.device(requested)
        if device.type != "cuda" or torch.cuda.is_available():
            return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe(device: torch.device) -> str:
    """One log line saying where the augmentation runs, and why when it is not a GPU."""
    if device.type == "cuda":
        return f"device augmentation: nnU-Net's training augmentation runs on {device} on whole batches"
    return (f"device augmentation: no CUDA device in use ({device}); nnU-Net's training augmentation runs on "
            f"CPU tensors in the main process, on whole batches")
