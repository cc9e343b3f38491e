"""Benchmark: nnU-Net's training augmentation in CPU workers vs the device pipeline, seconds per batch.

For each plan (the CPU plan ``FedDAHPlansCPU`` and the AMOS-sized plan, patch 64x160x160) it builds what
FedDAHTrainer builds: nnU-Net's ``get_training_transforms`` for that plan behind the task label remap,
applied per sample to the enlarged patches nnU-Net's loader crops (then collated), timed with one thread as
in an nnU-Net worker process; and the device pipeline (labels nearest, and linear as nnU-Net does) (:mod:`nnunet_feddah.nnunet.augment.device_augment`, configured from
that same pipeline) on the whole batch, on CUDA when available, else on CPU tensors. Both draw nnU-Net's
probabilities, so a batch's cost varies; the numbers are means over many batches. ``--all`` also times
every transform firing (rotation+scaling, noise, blur on every channel, ...) on both sides.
Images/labels are synthetic (smooth image, 6 AMOS organs as blobs); data loading itself is not timed.

    .venv/bin/python scripts/bench_augment.py [--plans cpu amos] [--batches 20 6] [--all] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_feddah.nnunet.augment.device_augment import DeviceAugmenter, cuda_or_cpu
from nnunet_feddah.nnunet.augment.settings import config_from_pipeline
from nnunet_feddah.nnunet.shared_plans import load_template
from nnunet_feddah.nnunet.task_data import TaskLabelTransform, with_task_labels
from nnunet_feddah.organs import Task

TASK = Task.parse("liver+right_kidney+left_kidney+spleen")


def nnunet_settings(plan: str) -> dict:
    """Patch sizes, rotation, mirroring and deep-supervision scales exactly as nnUNetTrainer derives them."""
    configuration = PlansManager(load_template(plan)).get_configuration("3d_fullres")
    trainer = SimpleNamespace(configuration_manager=configuration, enable_deep_supervision=True,
                              print_to_log_file=lambda *a, **k: None)
    rotation, dummy_2d, initial_patch, mirror = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(trainer)
    return {"patch_size": tuple(configuration.patch_size), "initial_patch_size": tuple(int(s) for s in initial_patch),
            "batch_size": configuration.batch_size, "rotation": rotation, "dummy_2d": dummy_2d, "mirror": mirror,
            "ds_scales": nnUNetTrainer._get_deep_supervision_scales(trainer)}


def nnunet_pipeline(s: dict):
    return nnUNetTrainer.get_training_transforms(
        s["patch_size"], s["rotation"], s["ds_scales"], s["mirror"], s["dummy_2d"], use_mask_for_norm=[False],
        is_cascaded=False, foreground_labels=list(range(1, TASK.num_outputs)), regions=None, ignore_label=None)


def fire_everything(pipeline) -> None:
    """Every transform of nnU-Net's pipeline at probability 1 (for the --all worst case)."""
    for t in pipeline.transforms:
        if isinstance(t, RandomTransform):
            t.apply_probability = 1
            t = t.transform
        for name in ("p_rotation", "p_scaling", "p_per_channel"):
            if hasattr(t, name):
                setattr(t, name, 1)


def synthetic_case(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth CT-like image and AMOS labels (6 organs as blobs, -1 padding on one border) of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, *[max(2, s // 16) for s in shape]), generator=g)
    image = F.interpolate(coarse, size=shape, mode="trilinear")[0]
    seg = torch.zeros(shape, dtype=torch.int16)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    for label in (1, 2, 3, 6, 10, 11):
        centre = torch.rand(3, generator=g) * 1.2 - 0.6
        radius = 0.1 + 0.2 * torch.rand(1, generator=g).item()
        seg[sum((grid - c) ** 2 for grid, c in zip(grids, centre, strict=True)) < radius ** 2] = label
    seg[:, :3] = -1
    return image + seg.clamp(min=0)[None].float() * 0.5, seg[None]


def time_cpu_workers(pipeline, cases, batch_size: int, batches: int) -> list[float]:
    """nnU-Net's per-sample path: remap + augment each case (one thread, like a worker process), then collate."""
    transforms = with_task_labels(pipeline, TASK)
    times = []
    with torch.no_grad():
        for b in range(batches + 1):
            inputs = [(img.clone(), seg.clone()) for img, seg in cases[b % 2 * batch_size:][:batch_size]]
            start = time.perf_counter()
            outs = [transforms(image=img, segmentation=seg) for img, seg in inputs]
            torch.stack([o["image"] for o in outs])
            [torch.stack(level) for level in zip(*[o["segmentation"] for o in outs], strict=True)]
            if b:  # the first batch warms up (nnU-Net's blur benchmarks FFT vs direct on first use)
                times.append(time.perf_counter() - start)
    return times


def time_device(augmenter: DeviceAugmenter, cases, batch_size: int, batches: int, device: torch.device) -> dict:
    """The device path: remap per case on the CPU, collate, copy to the device, augment the whole batch."""
    remap = TaskLabelTransform(TASK)
    cpu_side, copy, augment = [], [], []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for b in range(batches + 1):
        inputs = [(img.clone(), seg.clone()) for img, seg in cases[b % 2 * batch_size:][:batch_size]]
        t0 = time.perf_counter()
        data = torch.stack([img for img, _ in inputs])
        seg = torch.stack([remap(segmentation=s)["segmentation"] for _, s in inputs])
        t1 = time.perf_counter()
        data, seg = data.to(device), seg.to(device)
        sync()
        t2 = time.perf_counter()
        augmenter(data, seg)
        sync()
        t3 = time.perf_counter()
        if b:
            cpu_side.append(t1 - t0)
            copy.append(t2 - t1)
            augment.append(t3 - t2)
    return {"cpu_side": cpu_side, "copy": copy, "augment": augment}


def bench_plan(plan: str, batches: int, fire_all: bool, device: torch.device, threads: int) -> dict:
    s = nnunet_settings(plan)
    cases = [synthetic_case(s["initial_patch_size"], seed) for seed in range(2 * s["batch_size"])]
    pipeline = nnunet_pipeline(s)
    config = config_from_pipeline(pipeline)
    if fire_all:
        fire_everything(pipeline)
        config = dataclasses.replace(config, p_rotation=1, p_scaling=1, p_noise=1, p_blur=1, blur_p_per_channel=1,
                                     p_brightness=1, p_contrast=1, p_lowres=1, lowres_p_per_channel=1,
                                     p_gamma_inverted=1, p_gamma=1)
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    cpu = time_cpu_workers(pipeline, cases, s["batch_size"], batches)
    torch.set_num_threads(threads)
    dev = time_device(DeviceAugmenter(config), cases, s["batch_size"], batches, device)
    linear = dataclasses.replace(config, label_interpolation="linear")
    dev_linear = time_device(DeviceAugmenter(linear), cases, s["batch_size"], batches, device)
    mean = statistics.fmean
    result = {"plan": plan, "mode": "all transforms" if fire_all else "nnU-Net probabilities",
              "patch_size": s["patch_size"], "initial_patch_size": s["initial_patch_size"],
              "batch_size": s["batch_size"], "batches": batches, "device": str(device), "device_threads": threads,
              "cpu_workers_s_per_batch": mean(cpu), "cpu_workers_max_s": max(cpu),
              "device_cpu_side_s_per_batch": mean(dev["cpu_side"]), "device_copy_s_per_batch": mean(dev["copy"]),
              "device_augment_s_per_batch": mean(dev["augment"]), "device_augment_max_s": max(dev["augment"]),
              "device_linear_labels_augment_s_per_batch": mean(dev_linear["augment"])}
    result["ratio_cpu_workers_over_device"] = result["cpu_workers_s_per_batch"] / result["device_augment_s_per_batch"]
    result["ratio_cpu_workers_over_device_with_cpu_side"] = result["cpu_workers_s_per_batch"] / (
        result["device_augment_s_per_batch"] + result["device_cpu_side_s_per_batch"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="+", default=["cpu", "amos"], help="plans templates (cpu, amos or paths)")
    parser.add_argument("--batches", nargs="+", type=int, default=[20, 6], help="timed batches per plan")
    parser.add_argument("--all", action="store_true", help="also time with every transform firing")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, device path")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    device = cuda_or_cpu(args.device)
    if args.device and device != torch.device(args.device):
        print(f"requested {args.device} is not available; timing the device path on {device}")
    counts = (args.batches + args.batches[-1:] * len(args.plans))[: len(args.plans)]
    results = []
    for plan, batches in zip(args.plans, counts, strict=True):
        for fire_all in (False, True) if args.all else (False,):
            r = bench_plan(plan, batches, fire_all, device, args.threads)
            results.append(r)
            print(f"{plan:>5} ({r['mode']}): patch {r['patch_size']} from {r['initial_patch_size']}, "
                  f"batch {r['batch_size']}, {batches} batches\n"
                  f"      nnU-Net CPU pipeline (1 thread, per sample): {r['cpu_workers_s_per_batch']:.4f} s/batch "
                  f"(max {r['cpu_workers_max_s']:.3f})\n"
                  f"      device pipeline on {r['device']} ({args.threads} threads): "
                  f"{r['device_augment_s_per_batch']:.4f} s/batch (max {r['device_augment_max_s']:.3f}) "
                  f"+ CPU side (remap, collate) {r['device_cpu_side_s_per_batch']:.4f} "
                  f"+ copy {r['device_copy_s_per_batch']:.4f}\n"
                  f"      device pipeline, labels linear like nnU-Net: "
                  f"{r['device_linear_labels_augment_s_per_batch']:.4f} s/batch\n"
                  f"      ratio CPU pipeline / device pipeline: {r['ratio_cpu_workers_over_device']:.2f}x "
                  f"(with its CPU side: {r['ratio_cpu_workers_over_device_with_cpu_side']:.2f}x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
