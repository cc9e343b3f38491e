"""The shared nnU-Net network, built from a plans file, and its *unique* parameter names.

A PlainConvUNet's ``state_dict()`` lists every tensor several times (``all_modules.*`` and
``decoder.encoder.*`` alias the real modules), so FedDAH never ships or generates the raw state_dict:
it uses :func:`unique_tensors` — parameters plus buffers, each tensor once under its first name. The
segmentation heads (``decoder.seg_layers.*``) are the only tensors whose shape depends on the task
(background + the task's organs); everything else is the *trunk* and is identical at every site.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Union

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.paths import CONFIGURATION
from nnunet_feddah.tensor_checks import non_finite, shape_mismatches

HEAD_PREFIX = "decoder.seg_layers."


class ArchitectureMismatchError(FedDAHError, ValueError):
    """Weights whose names or shapes do not fit the network they are meant for."""


def is_head(name: str) -> bool:
    """True for segmentation-head tensors, whose first dimension is the task's number of outputs."""
    return name.startswith(HEAD_PREFIX)


def _configuration(plans: Union[Mapping, PlansManager], configuration: str) -> tuple[PlansManager, ConfigurationManager]:
    manager = plans if isinstance(plans, PlansManager) else PlansManager(dict(plans))
    return manager, manager.get_configuration(configuration)


def num_input_channels(dataset_json: Mapping) -> int:
    """Input channels as nnU-Net counts them (``channel_names``, or the legacy ``modality``)."""
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": "CT"})))


def build_network(
    plans: Union[Mapping, PlansManager],
    num_outputs: int,
    input_channels: int = 1,
    configuration: str = CONFIGURATION,
    deep_supervision: bool = True,
) -> nn.Module:
    """Build exactly the network ``nnUNetTrainer.build_network_architecture`` builds for these plans.

    (It calls the same ``get_network_from_plans``; importing the trainer module itself costs seconds.)
    """
    _, config = _configuration(plans, configuration)
    return get_network_from_plans(
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        input_channels,
        num_outputs,
        allow_init=True,
        deep_supervision=deep_supervision,
    )


def unique_tensors(module: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Parameters and buffers, each distinct tensor once, in registration order (aliases dropped)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    seen: set[int] = set()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in unique_tensors(module).items()}


def check_shapes(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str, limit: int = 5
) -> None:
    """Raise :class:`ArchitectureMismatchError` listing missing, unexpected and mis-shaped tensors."""
    parts = shape_mismatches(expected, found, limit)
    if parts:
        raise ArchitectureMismatchError(
            f"{source} does not match the network architecture: {'; '.join(parts)}. "
            f"The weights were made for another plans file or task; regenerate them for these shared plans."
        )


def load_unique_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Copy ``tensors`` into ``module`` strictly: every unique name, right shapes, finite values.

    Everything is checked before the first copy so a bad file leaves the network untouched.
    """
    targets = unique_tensors(module)
    check_shapes({k: tuple(v.shape) for k, v in targets.items()}, {k: tuple(v.shape) for k, v in tensors.items()},
                 source)
    bad = non_finite(tensors)
    if bad:
        raise ArchitectureMismatchError(f"{source} contains NaN/Inf in {', '.join(bad[:5])}; refusing to load it")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name].to(device=target.device, dtype=target.dtype))


def _trunk_signature(module: nn.Module) -> list[tuple[str, list[Union[int, str]]]]:
    """Names and shapes with the task-dependent head dimension written as ``"K"``."""
    return [(k, ["K", *s[1:]] if is_head(k) else list(s)) for k, s in tensor_shapes(module).items()]


def architecture_fingerprint(plans: Union[Mapping, PlansManager], input_channels: int = 1,
                             configuration: str = CONFIGURATION) -> str:
    """Hash of the network class, its init kwargs, the input channels and every unique tensor's name/shape.

    Two sites get the same fingerprint exactly when DAHyper can generate one set of weights for both.
    The task-dependent output dimension of the heads is left out.
    """
    manager, config = _configuration(plans, configuration)
    with torch.device("meta"):
        network = build_network(manager, 2, input_channels, configuration)
    payload = {
        "network_class": config.network_arch_class_name,
        "arch_kwargs": config.network_arch_init_kwargs,
        "input_channels": input_channels,
        "tensors": _trunk_signature(network),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"sha256:{digest[:32]}"


def hypernet_base(plans: Union[Mapping, PlansManager], num_organ_slots: int = 16, input_channels: int = 1,
                  seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Unique tensors of the network with one output per organ slot (background + AMOS organs 1–15).

    DAHyper starts from these: the trunk is the initial shared base and head row ``o`` is organ ``o``'s
    initial row, so every organ has an nnU-Net-initialised head before anyone has trained it.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = build_network(plans, num_organ_slots, input_channels)
    return OrderedDict((k, v.detach().clone()) for k, v in unique_tensors(network).items())


@contextlib.contextmanager
def paired_cpu_batches(network: nn.Module) -> Iterator[None]:
    """Inside the block, a CPU forward of a batch of one runs as a batch of two (the input twice).

    Why: for a batch of one torch (2.14) takes its native ``Slow3d`` convolution instead of oneDNN whenever
    N·C·D·H ≤ 20480 — every sliding-window tile of the CPU plans, since nnU-Net's predictor feeds one tile at
    a time. On this project's 2-core CPU that is 0.11 s per 32×48×48 tile against 0.04 s for two tiles through
    oneDNN. Instance norm works per sample, so the first half of the doubled batch is the batch-one result up
    to floating-point rounding. CUDA inputs and larger batches pass through unchanged.
    """
    own = network.__dict__.get("forward")
    forward = network.forward

    def paired(x: torch.Tensor, *args, **kwargs):
        if x.device.type != "cpu" or x.shape[0] != 1:
            return forward(x, *args, **kwargs)
        out = forward(torch.cat((x, x)), *args, **kwargs)
        return type(out)(o[:1] for o in out) if isinstance(out, (list, tuple)) else out[:1]

    network.forward = paired
    try:
        yield
    finally:
        if own is None:
            del network.forward
        else:
            network.forward = own


#: Sliding-window tiles per network call on the CPU (on this project's 2-core CPU two 32×48×48
#: tiles take 0.046 s through oneDNN, one tile alone 0.10 s).
CPU_TILES_PER_BATCH = 2


def sliding_window_logits(predictor, data: torch.Tensor) -> torch.Tensor:
    """The logits of nnU-Net's sliding-window prediction of one preprocessed image ``(C, ...)``, on the
    predictor's device: on the CPU by :func:`cpu_sliding_window`, elsewhere by nnU-Net itself."""
    if predictor.device.type != "cpu":
        return predictor.predict_sliding_window_return_logits(data)
    with torch.inference_mode(), paired_cpu_batches(predictor.network):
        return cpu_sliding_window(predictor, data)


def cpu_sliding_window(predictor, data: torch.Tensor, tiles_per_batch: int = CPU_TILES_PER_BATCH) -> torch.Tensor:
    """nnU-Net's sliding-window logits of one preprocessed image, ``tiles_per_batch`` tiles per network call.

    Why: nnU-Net's predictor runs one tile per network call, and on the CPU a batch of one 3D tile of the CPU
    plans leaves oneDNN for torch's slow native convolution; :func:`paired_cpu_batches` repairs that by
    running the tile twice, i.e. half the work is thrown away. Here different tiles share a call (an odd last
    tile is doubled: call this inside :func:`paired_cpu_batches`, as :func:`sliding_window_logits` does).
    Everything else is nnU-Net's: its padding (``pad_nd_image``), its tile positions
    (``_internal_get_sliding_window_slicers``, step ``predictor.tile_step_size``), its Gaussian importance
    weights (``compute_gaussian``), its float16 accumulators filled tile by tile in the same order and its
    test-time mirroring when the predictor has it. A tile's logits do not depend on its batch partner, so in pairs
    the result is bit-identical to nnU-Net's predictor on doubled one-tile batches (tests/test_network_and_weights.py);
    other group sizes change oneDNN's blocking and with it the float32 rounding.
    """
    patch = tuple(predictor.configuration_manager.patch_size)
    padded, unpad = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    gaussian = (compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
                if predictor.use_gaussian else 1)
    heads = predictor.label_manager.num_segmentation_heads
    logits = torch.zeros((heads, *padded.shape[1:]), dtype=torch.half)
    weights = torch.zeros(padded.shape[1:], dtype=torch.half)
    predictor.network.eval()
    for first in range(0, len(slicers), tiles_per_batch):
        group = slicers[first:first + tiles_per_batch]
        tiles = torch.stack([padded[tile] for tile in group]).float()
        for prediction, tile in zip(predictor._internal_maybe_mirror_and_predict(tiles), group, strict=True):
            prediction = prediction * gaussian
            logits[tile] += prediction
            weights[tile[1:]] += gaussian
    torch.div(logits, weights, out=logits)
    return logits[(slice(None), *unpad[1:])]
