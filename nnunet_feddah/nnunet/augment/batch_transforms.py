"""The device augmentation's transforms, each on a whole batch on any device (plain torch, no randomness).

:mod:`nnunet_feddah.nnunet.augment.device_augment` draws the parameters and calls these in nnU-Net's order; kept apart
so each can be read, and tested against batchgeneratorsv2, on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def centre_crop(x: torch.Tensor, size: Sequence[int], fill: float) -> torch.Tensor:
    """Crop (or pad with ``fill``) the spatial axes of (n, c, *shape) around floor(shape / 2), no resampling."""
    src, dst = [], []
    for length, out in zip(x.shape[2:], size, strict=True):
        start = length // 2 - out // 2
        lo, hi = max(start, 0), min(start + out, length)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    if all(s.stop - s.start == out for s, out in zip(src, size, strict=True)):
        return x[(slice(None), slice(None), *src)]
    result = torch.full((*x.shape[:2], *size), fill, dtype=x.dtype, device=x.device)
    result[(slice(None), slice(None), *dst)] = x[(slice(None), slice(None), *src)]
    return result


def sampling_grid(affine: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int],
                  device: torch.device) -> torch.Tensor:
    """grid_sample grid that maps output voxel offsets from the patch centre through ``affine`` into the input.

    Output and input are centred on each other. In normalised coordinates (align_corners=False) an output
    coordinate u is the offset u * out / 2 voxels, so the input coordinate is diag(1 / in) @ A @ diag(out) @ u;
    grid_sample wants it in x, y, z order, hence the flips.
    """
    to_in = torch.tensor([1.0 / s for s in in_shape], dtype=torch.float64)
    from_out = torch.tensor([float(s) for s in out_shape], dtype=torch.float64)
    theta = to_in[:, None] * affine.to(torch.float64) * from_out[None, :]
    theta = theta.flip(-1).flip(-2)
    theta = torch.cat((theta, torch.zeros(theta.shape[0], 3, 1, dtype=theta.dtype)), dim=2)
    theta = theta.to(device=device, dtype=torch.float32)
    return F.affine_grid(theta, [theta.shape[0], 1, *out_shape], align_corners=False)


def resample_labels(seg: torch.Tensor, grid: torch.Tensor, padding_label: int, linear: bool) -> torch.Tensor:
    """Labels (n, 1, *shape) at ``grid``; ``padding_label`` outside the input.

    Nearest: one grid_sample. Linear: every label's indicator is interpolated and the best-scoring label
    wins; the padding label scores what the others leave (its indicator is 1 outside the input), and a tie
    goes to the nearest neighbour's label when it is among the best, as batchgeneratorsv2 settles it.
    """
    shifted = seg.float() - padding_label  # zeros padding then means padding_label outside
    nearest = (F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
               + padding_label).to(seg.dtype)
    if not linear:
        return nearest
    best = rest = nearest_score = None
    winner = torch.full_like(nearest, padding_label)
    for label in torch.unique(seg).tolist():
        if label == padding_label:
            continue
        score = F.grid_sample((seg == label).float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        rest = 1 - score if rest is None else rest - score
        if best is None:
            best, nearest_score = score, torch.where(nearest == label, score, -1.0)
            winner.fill_(label)
            continue
        better = score > best
        winner[better], best = label, torch.maximum(best, score)
        nearest_score = torch.where(nearest == label, score, nearest_score)
    if best is None:
        return nearest
    winner[rest > best] = padding_label
    nearest_score = torch.where(nearest == padding_label, rest, nearest_score)
    best = torch.maximum(best, rest)
    tie = (best - nearest_score).abs() < 1e-4
    return torch.where(tie, nearest, winner)


def spatial_transform(data: torch.Tensor, seg: torch.Tensor, affine: torch.Tensor, spatial: torch.Tensor,
                      patch_size: Sequence[int], padding_label: int,
                      label_interpolation: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale the samples marked ``spatial`` (images linear); centre-crop the rest.

    Outside the input, images are 0 and labels ``padding_label`` — what nnU-Net's loader pads with too.
    Samples left alone are sliced, never resampled, so identity parameters return the input exactly.
    """
    data_out = centre_crop(data, patch_size, 0.0).clone()
    seg_out = centre_crop(seg, patch_size, padding_label).clone()
    idx = torch.nonzero(spatial).flatten()
    if len(idx):
        grid = sampling_grid(affine[idx], data.shape[2:], patch_size, data.device)
        dev_idx = idx.to(data.device)
        data_out[dev_idx] = F.grid_sample(data[dev_idx], grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
        seg_out[dev_idx] = resample_labels(seg[dev_idx], grid, padding_label, label_interpolation == "linear")
    return data_out, seg_out


def gaussian_kernel_size(sigma: float, truncate: float) -> int:
    """Odd kernel length nearest to ``truncate * sigma + 0.5`` (rounding away from the centre on a tie)."""
    target = truncate * sigma + 0.5
    size = round(target)
    if size % 2 == 1:
        return size
    return size + 1 if target >= size else size - 1


def _gaussian_kernels(sigmas: torch.Tensor, truncate: float) -> torch.Tensor:
    """(n,) sigmas -> (n, k) normalised Gaussians, each centred and zero-padded to the longest length k."""
    sizes = [gaussian_kernel_size(float(s), truncate) for s in sigmas]
    length = max(sizes)
    kernels = torch.zeros(len(sizes), length, dtype=torch.float64)
    for i, (sigma, size) in enumerate(zip(sigmas.tolist(), sizes, strict=True)):
        offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        pdf = torch.exp(-0.5 * (offsets / sigma) ** 2)
        start = (length - size) // 2
        kernels[i, start:start + size] = pdf / pdf.sum()
    return kernels


def gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor, truncate: float) -> torch.Tensor:
    """Blur each of the n volumes of (n, *shape) separably with its own (n, 3) sigmas; reflected borders."""
    n = x.shape[0]
    out = x[None]
    for axis in range(3):
        kernels = _gaussian_kernels(sigmas[:, axis], truncate).to(device=x.device, dtype=x.dtype)
        half = kernels.shape[1] // 2
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = half
        shape = [n, 1, 1, 1, 1]
        shape[2 + axis] = kernels.shape[1]
        out = F.conv3d(F.pad(out, pad, mode="reflect"), kernels.view(shape), groups=n)
    return out[0]


def select_volumes(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (sample, channel) of ``mask`` on x's device, and the selected volumes as (n, *shape)."""
    where = torch.nonzero(mask).to(x.device)
    return where, x[where[:, 0], where[:, 1]]


def put_volumes(x: torch.Tensor, where: torch.Tensor, values: torch.Tensor) -> None:
    x[where[:, 0], where[:, 1]] = values


def per_volume(values: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The masked draws as an (n, 1, 1, 1) tensor on ``like``'s device, to broadcast over the volumes."""
    return values[mask].to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def contrast(volumes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale each volume's deviation from its mean by its factor, clipped to the volume's former [min, max]."""
    flat = volumes.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    low, high = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
    return torch.minimum(torch.maximum((volumes - mean) * factors + mean, low), high)


def gamma_correction(volumes: torch.Tensor, gammas: torch.Tensor, invert: bool, eps: float = 1e-7) -> torch.Tensor:
    """Gamma on each volume's [min, max] range, then mean and std restored (nnU-Net always retains stats)."""
    x = -volumes if invert else volumes
    flat = x.flatten(1)
    mean, std = flat.mean(1).view(-1, 1, 1, 1), flat.std(1).view(-1, 1, 1, 1)
    low, high = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
    span = high - low
    x = ((x - low) / span.clamp(min=eps)).pow(gammas) * span + low
    flat = x.flatten(1)
    x = (x - flat.mean(1).view(-1, 1, 1, 1)) * (std / flat.std(1).view(-1, 1, 1, 1).clamp(min=eps)) + mean
    return -x if invert else x


def simulate_low_resolution(volume: torch.Tensor, scale: float) -> torch.Tensor:
    """Nearest-neighbour downsampling by ``scale`` on every axis, then trilinear back to the original size."""
    shape = volume.shape
    small = [round(s * scale) for s in shape]
    down = F.interpolate(volume[None, None], size=small, mode="nearest-exact")
    return F.interpolate(down, size=list(shape), mode="trilinear")[0, 0]


def deep_supervision_targets(seg: torch.Tensor, scales: Sequence[Sequence[float]] | None) -> list[torch.Tensor]:
    """One target per network output: nearest-exact downsampling of the (b, 1, *patch) labels by each scale."""
    if scales is None:
        return [seg]
    targets = []
    for scale in scales:
        if all(s == 1 for s in scale):
            targets.append(seg)
        else:
            size = [round(n * s) for n, s in zip(seg.shape[2:], scale, strict=True)]
            targets.append(F.interpolate(seg.float(), size=size, mode="nearest-exact").to(seg.dtype))
    return targets
