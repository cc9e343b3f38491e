"""Per-organ Dice of a task network on a site's validation cases, in nnU-Net's preprocessed space, and
how differently it predicts from the weights the site received (the input of FedDAH's W_s).

The site's ground truth is in AMOS ids while the network predicts task channels, so nnU-Net's own
``perform_actual_validation`` (which compares exported predictions with ``gt_segmentations``) cannot
be used as is. Here we run nnU-Net's sliding-window predictor on the preprocessed validation cases,
remap the reference with the task's lookup table and count with nnU-Net's ``compute_tp_fp_fn_tn``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

from nnunet_feddah.nnunet.network import sliding_window_logits
from nnunet_feddah.organs import Task


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """nnU-Net's convention: Dice is NaN when neither reference nor prediction contain the structure."""
    denominator = 2 * tp + fp + fn
    return float("nan") if denominator == 0 else float(2 * tp / denominator)


def predictive_js(logits_a: torch.Tensor, logits_b: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """Mean per-voxel Jensen–Shannon divergence (bits, 0..1) of two networks' softmax outputs ``(C, ...)``,
    over the voxels of ``region`` (a boolean mask; all voxels when ``None`` or empty)."""
    p, q = torch.softmax(logits_a.double(), 0), torch.softmax(logits_b.double(), 0)
    m = 0.5 * (p + q)
    kl = lambda x: (x * (torch.log2(x.clamp_min(1e-300)) - torch.log2(m.clamp_min(1e-300)))).sum(0)  # noqa: E731
    js = (0.5 * kl(p) + 0.5 * kl(q)).clamp(0, 1)
    if region is not None and bool(region.any()):
        js = js[region]
    return float(js.mean())


def _predictor(network: nn.Module, plans_manager: Any, configuration_manager: Any, task_dataset_json: Mapping,
               device: torch.device, tile_step_size: float) -> nnUNetPredictor:
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=True, device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, None, dict(task_dataset_json),
                                    "FedDAHTrainer", None)
    return predictor


def organ_dice(
    network: nn.Module,
    plans_manager: Any,
    configuration_manager: Any,
    task_dataset_json: Mapping,
    dataset: Any,
    case_ids: Sequence[str],
    task: Task,
    device: torch.device,
    tile_step_size: float = 0.5,
    received: nn.Module | None = None,
) -> dict[str, Any]:
    """Predict ``case_ids`` with ``network`` and score every task organ.

    Returns per-organ mean Dice over cases (NaN-aware, like nnU-Net's summary.json), per-organ Dice
    over all voxels pooled, the per-case values and the time taken. With ``received`` (the network with
    the weights the site was sent) also ``predictive_js``: the mean per-voxel JS divergence between the
    two networks' predictions, over the voxels either network calls foreground (``foreground``) and over
    every voxel (``all``), averaged over cases — a few numbers, no images.
    """
    start = time.perf_counter()
    predictor = _predictor(network, plans_manager, configuration_manager, task_dataset_json, device, tile_step_size)
    history = None if received is None else _predictor(received, plans_manager, configuration_manager,
                                                       task_dataset_json, device, tile_step_size)
    lut = np.asarray(task.amos_to_task_lut() + [0] * (256 - len(task.amos_to_task_lut())), dtype=np.int16)
    per_case: dict[str, dict[str, float]] = {}
    divergences: list[tuple[float, float]] = []
    pooled = np.zeros((len(task.organs), 3), dtype=np.float64)
    with torch.no_grad():
        for case in case_ids:
            data, seg, _, _ = dataset.load_case(case)
            image = torch.from_numpy(np.asarray(data[:]))
            logits = sliding_window_logits(predictor, image)
            prediction = logits.argmax(0).cpu().numpy()
            reference = lut[np.clip(np.asarray(seg[0]), 0, 255)]
            if history is not None:
                received_logits = sliding_window_logits(history, image).cpu()
                region = (logits.argmax(0).cpu() > 0) | (received_logits.argmax(0) > 0)
                divergences.append((predictive_js(logits.cpu(), received_logits, region),
                                    predictive_js(logits.cpu(), received_logits)))
            per_case[case] = {}
            for i, organ in enumerate(task.organs, start=1):
                tp, fp, fn, _ = compute_tp_fp_fn_tn(reference == i, prediction == i)
                pooled[i - 1] += (tp, fp, fn)
                per_case[case][organ.key] = dice_from_counts(tp, fp, fn)
    mean_per_organ = {}
    for organ in task.organs:
        values = [per_case[c][organ.key] for c in per_case if not np.isnan(per_case[c][organ.key])]
        mean_per_organ[organ.key] = float(np.mean(values)) if values else float("nan")
    valid = [v for v in mean_per_organ.values() if not np.isnan(v)]
    extra = {} if not divergences else {"predictive_js": {
        "foreground": float(np.mean([d[0] for d in divergences])), "all": float(np.mean([d[1] for d in divergences])),
        "cases": len(divergences)}}
    return {
        **extra,
        "dice": mean_per_organ,
        "mean_dice": float(np.mean(valid)) if valid else float("nan"),
        "pooled_dice": {o.key: dice_from_counts(*pooled[i]) for i, o in enumerate(task.organs)},
        "per_case": per_case,
        "cases": list(case_ids),
        "seconds": time.perf_counter() - start,
    }
