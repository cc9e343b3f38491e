"""Quantised tensors: how an idle task's stored change is kept in a few bits per weight.

Plain torch. A tensor is quantised **per output channel** (its first dimension; a 0-d or 1-d tensor is one
channel) to symmetric integer levels ``−q … q`` with ``q = 2^(bits−1) − 1`` and one float32 scale per channel,
and the codes are **packed** into bytes (2, 4 or 8 bits per weight: 4, 2 or 1 codes per byte), so
:meth:`QuantizedTensor.nbytes` is the memory it really takes.

Why per channel and why a searched clip: a convolution's output channels differ in scale by an order of
magnitude, and one outlier in a channel would otherwise set the step for all its weights. Each channel's
scale is the one among ``CLIP_FRACTIONS × max|x| / q`` with the least squared error (round-to-nearest), which
at 2 bits lowers the error by about a third against the plain maximum (measured in
``tests/test_quantize.py`` on Gaussian rows).

Why quantise at all, and not a lower rank: what an idle task keeps is judged by its held-out Dice against
the exact model (docs/METHOD.md §5b); the measurements there compare both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

BITS = (2, 4, 8)
CLIP_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class QuantizedTensor:
    """A packed per-channel quantisation: ``codes`` (uint8), ``scale`` (float32, one per channel)."""

    codes: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    bits: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        levels = _unpack(self.codes, self.bits, math.prod(self.shape)).to(torch.float32) - _qmax(self.bits)
        return (levels.reshape(self.scale.numel(), -1) * self.scale[:, None]).reshape(self.shape)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0] if tensor.dim() >= 2 else 1, -1)


def quantize(tensor: torch.Tensor, bits: int) -> QuantizedTensor:
    """Quantise a floating tensor to ``bits`` per weight (2, 4 or 8), per output channel."""
    if bits not in BITS:
        raise ValueError(f"quantisation needs bits in {BITS} (whole codes per byte), got {bits}")
    if not tensor.is_floating_point():
        raise ValueError(f"only floating tensors are quantised, got {tensor.dtype}")
    rows = _rows(tensor.detach().to("cpu", torch.float64))
    q = _qmax(bits)
    peak = rows.abs().amax(dim=1)
    best_scale = torch.zeros_like(peak)
    best_error = torch.full_like(peak, math.inf)
    for fraction in CLIP_FRACTIONS:
        scale = torch.where(peak > 0, peak * fraction / q, torch.ones_like(peak))
        error = ((torch.clamp(torch.round(rows / scale[:, None]), -q, q) * scale[:, None] - rows) ** 2).sum(dim=1)
        better = error < best_error
        best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    best_scale = best_scale.to(torch.float32)  # the stored scale: the levels are rounded with it
    levels = torch.clamp(torch.round(rows / best_scale.double()[:, None]), -q, q).to(torch.int16) + q
    return QuantizedTensor(_pack(levels.reshape(-1).to(torch.uint8), bits), best_scale, tuple(tensor.shape), bits)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    padded = torch.cat([values, values.new_zeros((-values.numel()) % per_byte)]).reshape(-1, per_byte)
    packed = torch.zeros(padded.shape[0], dtype=torch.int32)
    for slot in range(per_byte):
        packed |= padded[:, slot].to(torch.int32) << (slot * bits)
    return packed.to(torch.uint8)


def _unpack(codes: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per_byte, mask = 8 // bits, (1 << bits) - 1
    wide = codes.to(torch.int32)
    return torch.stack([(wide >> (slot * bits)) & mask for slot in range(per_byte)], dim=1).reshape(-1)[:count]


def quantize_all(tensors: Mapping[str, torch.Tensor], bits: int) -> dict[str, QuantizedTensor]:
    return {name: quantize(value, bits) for name, value in tensors.items()}


def dequantize_all(quantized: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    return {name: value.dequantize() for name, value in quantized.items()}


def to_tensors(prefix: str, quantized: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Flat tensors for a checkpoint: ``{prefix}{name}/codes`` and ``{prefix}{name}/scale``."""
    out = {}
    for name, value in quantized.items():
        out[f"{prefix}{name}/codes"], out[f"{prefix}{name}/scale"] = value.codes, value.scale
    return out


def from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                 bits: int) -> dict[str, QuantizedTensor]:
    """The inverse of :func:`to_tensors` for the names in ``shapes`` (each must be present)."""
    return {name: QuantizedTensor(tensors[f"{prefix}{name}/codes"].clone(), tensors[f"{prefix}{name}/scale"].clone(),
                                  tuple(shape), bits) for name, shape in shapes.items()}
