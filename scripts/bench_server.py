"""Benchmark of the coordinator's side: DAHyper generation, AMR updates, size, fidelity and forgetting.

Prints numbers, asserts nothing. Part 1 uses the real network shapes of the CPU and AMOS plans with
"trained-like" targets (a task's generated weights + a rank-4 change of ~5 % of each kernel's norm +
~0.5 % dense noise). Part 2 (CPU plan only) trains a phantom site for two rounds with FedDAHTrainer
and measures what the fidelity of the generated weights means in validation Dice, per DAHyper rank,
and whether the Jensen–Shannon similarity tells a trained upload from an untrained network.

    .venv/bin/python scripts/bench_server.py [--quick] [--no-train] [--out work/bench/bench_server.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from nnunet_feddah.method.amr import AMR, AMRConfig, relative_l2
from nnunet_feddah.method.dahyper import DAHyper, DAHyperConfig
from nnunet_feddah.method.similarity import js_divergence
from nnunet_feddah.nnunet.network import hypernet_base, is_head
from nnunet_feddah.paths import bundled_plans_dir, nnunet_env

Weights = dict[str, torch.Tensor]
ORGANS = [6, 2, 3, 1, 10, 4, 7, 8, 9, 11, 12, 13, 14, 15, 5]  # organ of task i (AMOS ids)
PLANS = {"CPU plan": "template_cpu.json", "AMOS plan": "template_amos.json"}


def trained_like(weights: Mapping[str, torch.Tensor], seed: int, rel: float = 0.05, noise: float = 0.005) -> Weights:
    """``weights`` + a rank-4 change (dense for vectors) of relative size ``rel`` + dense noise ``noise``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        norm = max(float(w.norm()), 1e-2 * w.numel() ** 0.5)  # zero-initialised biases still move
        if w.ndim >= 2 and w.shape[0] > 1:
            change = torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w[0].numel(), generator=g)
        else:
            change = torch.randn(w.shape, generator=g)
        dense = torch.randn(w.shape, generator=g)
        out[name] = w + rel * norm * change.reshape(w.shape) / change.norm() + noise * norm * dense / dense.norm()
    return out


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seeded_amr(base: Weights, config: AMRConfig, fit_rounds: int = 1) -> AMR:
    """task0 registered, its first upload made the base (exact), then ``fit_rounds`` fitted uploads."""
    amr = AMR(DAHyper(base, is_head, DAHyperConfig()), config)
    amr.allocate("task0", [ORGANS[0]])
    for r in range(1 + fit_rounds):
        amr.update("task0", trained_like(amr.hyper.generate("task0"), seed=r), round_index=r, source="site0")
    return amr


def forgetting(amr: AMR, config: AMRConfig, n_new: int) -> dict:
    """Register and fit ``n_new`` tasks on a copy of ``amr``; drift of the tasks registered before them."""
    amr = AMR(copy.deepcopy(amr.hyper), config)
    old = list(amr.hyper.tasks)
    reference = {t: amr.hyper.generate(t) for t in old}
    fidelity, seconds = [], []
    for i in range(1, n_new + 1):
        key = f"new{i}"
        amr.hyper.register(key, [ORGANS[i]])
        report = amr.update(key, trained_like(amr.hyper.generate(key), 100 + i), round_index=10 + i, source=f"s{i}")
        fidelity.append(report.fidelity_rel_l2)
        seconds.append(report.seconds)
    drift = max(relative_l2(amr.hyper.generate(t), reference[t]) for t in old)
    return {"drift_old_max": drift, "fidelity_new_max": max(fidelity), "update_s_median": statistics.median(seconds)}


def bench_plan(plans: dict, n_new: int, adam_steps: int | None) -> dict:
    res: dict = {}
    sections = res["section_s"] = {}
    t = time.perf_counter()
    base = hypernet_base(plans)
    model_bytes = sum(v.numel() * 4 for v in base.values())
    res["model_params_M"] = sum(v.numel() for v in base.values()) / 1e6
    start = time.perf_counter()
    hyper = DAHyper(base, is_head, DAHyperConfig())
    res["construct_s"] = time.perf_counter() - start
    for n in (1, 5, 15):  # (4) size: shared generators + base + one embedding per task
        while len(hyper.tasks) < n:
            hyper.register(f"size{len(hyper.tasks)}", [ORGANS[len(hyper.tasks)]])
        res[f"hyper_MB_T{n}"] = hyper.nbytes() / 1e6
        res[f"hyper_vs_models_T{n}"] = hyper.nbytes() / (n * model_bytes)
    del hyper
    sections["size"], t = time.perf_counter() - t, time.perf_counter()
    amr = seeded_amr(base, AMRConfig(beta=1.0), fit_rounds=0)
    res["generate_s"] = median_seconds(lambda: amr.hyper.generate("task0"), 5)  # (2)
    for i in range(1, 5):  # (3) ≥ 4 other registered tasks: they enter L_R and the drift report
        amr.hyper.register(f"other{i}", [ORGANS[i]])
    reports = [amr.update("task0", trained_like(amr.hyper.generate("task0"), r), round_index=r, source="site0")
               for r in (1, 2, 3)]  # a site continuing its task: the upload is the target
    res["update_s"], report = statistics.median(r.seconds for r in reports), reports[-1]
    res["fidelity_same_site"] = report.fidelity_rel_l2  # (5) target = upload for a continuing site
    res["max_drift_other_tasks"] = max(report.drift.values())
    report = amr.update("task0", trained_like(amr.hyper.generate("task0"), 50), round_index=50, source="site1")
    res |= {"js_new_site": report.js_divergence, "w_s_new_site": report.similarity,
            "fidelity_vs_target_new_site": report.fidelity_rel_l2, "fidelity_vs_upload_new_site": report.upload_rel_l2}
    sections["generate_and_update"], t = time.perf_counter() - t, time.perf_counter()

    seed_amr = seeded_amr(base, AMRConfig(beta=1.0))  # (6) forgetting: task0 fitted, then n_new new tasks
    for beta in (1.0, 0.0):
        res[f"forgetting_beta{beta:g}"] = forgetting(seed_amr, AMRConfig(beta=beta), n_new)
    sections["forgetting"], t = time.perf_counter() - t, time.perf_counter()
    if adam_steps:  # (7) the paper's optimiser as an ablation of the closed form
        adam = AMRConfig(solver="adam", adam_steps=adam_steps)
        seed_adam = seeded_amr(base, adam)
        for beta in (1.0, 0.0):
            res[f"adam_forgetting_beta{beta:g}"] = forgetting(seed_adam, dataclasses.replace(adam, beta=beta), n_new)
        sections["adam_forgetting"] = time.perf_counter() - t
    return res


# ---------------------------------------------------------------------------------------------- real data
def train_two_rounds(root: Path, epochs: int, iterations: int) -> dict:
    """Phantom site 990, CPU plans, task liver: round 1 from DAHyper's weights, round 2 from its checkpoint."""
    os.environ.update(nnunet_env(root))  # before any nnU-Net import: it reads the folders at import time
    from nnunet_feddah.data import phantom
    from nnunet_feddah.method.hypernet_file import save_hypernet
    from nnunet_feddah.nnunet import shared_plans
    from nnunet_feddah.nnunet.round_config import RoundConfig
    from nnunet_feddah.nnunet.trainer import train_round
    from nnunet_feddah.nnunet.weights import load_weights, save_weights

    t0 = time.perf_counter()
    phantom.write_cohort(root / "nnUNet_raw", num_sites=1, num_train=8, num_test=1, seed=3, first_dataset_id=990)
    (site, fingerprint), = shared_plans.install([990], template="cpu", num_processes=2, log=lambda *_: None).items()
    plans_name = shared_plans.load_template("cpu")["plans_name"]
    plans = json.loads((root / "nnUNet_preprocessed" / site / f"{plans_name}.json").read_text())
    setup_s = time.perf_counter() - t0
    amr = AMR(DAHyper(hypernet_base(plans), is_head, DAHyperConfig()))
    amr.allocate("liver", [ORGANS[0]])
    rounds = root / "rounds"
    save_weights(rounds / "start.safetensors", amr.hyper.generate("liver"),
                 {"architecture_fingerprint": fingerprint, "task": "liver", "organs": "6"})
    common = {"task": "liver", "epochs": epochs, "iterations_per_epoch": iterations, "val_iterations_per_epoch": 1,
              "total_epochs": 2 * epochs, "validate": False, "seed": 0}
    uploads, metrics = [], []
    for r in (1, 2):
        start = ({"initial_weights": str(rounds / "start.safetensors")} if r == 1
                 else {"hypernet_checkpoint": str(save_hypernet(rounds / "hyper.safetensors", amr.hyper, fingerprint))})
        config = RoundConfig(output_weights=str(rounds / f"up{r}.safetensors"), epoch_offset=(r - 1) * epochs,
                             output_metrics=str(rounds / f"m{r}.json"), **start, **common).save(rounds / f"r{r}.json")
        metrics.append(train_round(site, plans_name, config))
        uploads.append(load_weights(rounds / f"up{r}.safetensors")[0])
        if r == 1:  # the first upload of the federation becomes DAHyper's base: round 2 starts from it exactly
            amr.update("liver", uploads[-1], round_index=r, source="site990")
    return {"site": site, "plans": plans, "plans_name": plans_name, "uploads": uploads, "setup_s": setup_s,
            "train_s": [m["wall_time_s"]["train"] for m in metrics],
            "s_per_iter": [m["seconds_per_iteration"] for m in metrics]}


def validation_dice(root: Path, site: str, plans: dict, weights: Mapping[str, torch.Tensor]) -> float:
    """Mean validation Dice (fold 0) of ``weights``, evaluated like FedDAHTrainer.perform_actual_validation."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_feddah.nnunet.network import build_network, load_unique_tensors
    from nnunet_feddah.nnunet.task_data import task_dataset_json
    from nnunet_feddah.nnunet.validation import organ_dice
    from nnunet_feddah.organs import Task

    folder = root / "nnUNet_preprocessed" / site
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    val_keys = json.loads((folder / "splits_final.json").read_text())[0]["val"]
    data = folder / configuration.data_identifier
    dataset = infer_dataset_class(str(data))(str(data), val_keys)
    task = Task.parse("liver")
    network = build_network(plans, task.num_outputs, deep_supervision=False)
    load_unique_tensors(network, weights, "benchmark weights")
    network.eval()
    dataset_json = task_dataset_json(json.loads((folder / "dataset.json").read_text()), task)
    return organ_dice(network, manager, configuration, dataset_json, dataset, val_keys, task,
                      torch.device("cpu"))["mean_dice"]


def bench_real_data(root: Path, epochs: int, iterations: int, ranks: list[int]) -> dict:
    with open(root.parent / "bench_server_nnunet.log", "w") as log, contextlib.redirect_stdout(log):
        return _bench_real_data(root, epochs, iterations, ranks)  # nnU-Net's chatter goes to the log


def _bench_real_data(root: Path, epochs: int, iterations: int, ranks: list[int]) -> dict:
    run = train_two_rounds(root, epochs, iterations)
    up1, up2 = run["uploads"]

    def dice(w: Mapping[str, torch.Tensor]) -> float:
        return validation_dice(root, run["site"], run["plans"], w)

    res: dict = {k: run[k] for k in ("setup_s", "train_s", "s_per_iter")}
    res["dice_round1_upload"], res["dice_upload"] = dice(up1), dice(up2)
    for rank in ranks:  # same uploads, fresh DAHyper each, both updates replayed
        amr = AMR(DAHyper(hypernet_base(run["plans"]), is_head, DAHyperConfig(rank=rank)))
        amr.allocate("liver", [ORGANS[0]])
        amr.update("liver", up1, round_index=1, source="site990")
        report = amr.update("liver", up2, round_index=2, source="site990")
        d, up = dice(amr.hyper.generate("liver")), res["dice_upload"]
        res[f"rank{rank}"] = {"dice_generated": d, "dice_loss_pct": 100 * (up - d) / up if up > 0 else float("nan"),
                              "rel_l2": report.fidelity_rel_l2, "update_s": report.seconds, "hyper_MB": amr.hyper.nbytes() / 1e6,
                              "lowrank_units": sum(u.kind == "lowrank" for u in amr.hyper.units)}
    untrained = {k: (v[[0, ORGANS[0]]] if is_head(k) else v) for k, v in hypernet_base(run["plans"], seed=1).items()}
    w_max = AMRConfig().max_history_weight
    for name, (a, b) in {"round1_vs_round2": (up1, up2), "round2_vs_untrained": (up2, untrained)}.items():
        js = js_divergence(a, b)
        res[f"js_{name}"] = {"js": js, "w_s": w_max * (1 - js), "rel_l2": relative_l2(b, a)}
    return res


# ---------------------------------------------------------------------------------------------- output
def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def tables(plans: dict[str, dict], real: dict | None, n_new: int) -> str:
    rows: list[tuple[str, Callable[[dict], float | None]]] = [
        ("model parameters (M, 16 outputs)", lambda r: r["model_params_M"]),
        ("DAHyper construction (s)", lambda r: r["construct_s"]),
        ("generate one task (s, median of 5)", lambda r: r["generate_s"]),
        ("AMR update, 4 other tasks (s, median of 3)", lambda r: r["update_s"]),
        ("hypernet MB, 1 task", lambda r: r["hyper_MB_T1"]),
        ("hypernet bytes added per task (embedding)", lambda r: (r["hyper_MB_T15"] - r["hyper_MB_T1"]) * 1e6 / 14),
        *[(f"hypernet / (T × model bytes), T={n}", lambda r, n=n: r[f"hyper_vs_models_T{n}"]) for n in (1, 5, 15)],
        ("fidelity rel-L2 vs target, same site", lambda r: r["fidelity_same_site"]),
        ("max drift of the 4 other tasks in that update", lambda r: r["max_drift_other_tasks"]),
        ("new-site upload: JS / W_s", None),
        ("new-site upload: fidelity vs target W*", lambda r: r["fidelity_vs_target_new_site"]),
        ("new-site upload: generated vs upload", lambda r: r["fidelity_vs_upload_new_site"]),
    ]
    for prefix, label in (("", "closed form"), ("adam_", "Adam")):
        for beta in ("1", "0"):
            key = f"{prefix}forgetting_beta{beta}"
            rows += [(f"{label} β={beta}: drift of task0 after {n_new} new tasks",
                      lambda r, k=key: r[k]["drift_old_max"] if k in r else None),
                     (f"{label} β={beta}: max fidelity rel-L2 of new tasks",
                      lambda r, k=key: r[k]["fidelity_new_max"] if k in r else None),
                     (f"{label} β={beta}: update time (s, median)",
                      lambda r, k=key: r[k]["update_s_median"] if k in r else None)]
    names = list(plans)
    lines = [f"| measurement | {' | '.join(names)} |", f"|---|{'---|' * len(names)}"] if names else []
    for label, get in rows if names else []:
        if get is None:
            cells = [f"{fmt(plans[n]['js_new_site'])} / {fmt(plans[n]['w_s_new_site'])}" for n in names]
        else:
            cells = [fmt(get(plans[n])) for n in names]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    if real:
        lines += ["", f"Real data (CPU plan, phantom site, task liver, 2 rounds × {real['epochs']} × "
                  f"{real['iterations_per_epoch']} iterations, {' / '.join(f'{s:.2f}' for s in real['s_per_iter'])} s/iteration)",
                  "", "| DAHyper rank | Dice(upload) | Dice(generated) | relative Dice loss % | rel-L2 | low-rank kernels | "
                  "hypernet MB |", "|---|---|---|---|---|---|---|"]
        for key in (k for k in real if k.startswith("rank")):
            r = real[key]
            lines.append(f"| {key[4:]} | {fmt(real['dice_upload'])} | {fmt(r['dice_generated'])} | "
                         f"{fmt(r['dice_loss_pct'], 2)} | {fmt(r['rel_l2'])} | {r['lowrank_units']} | {fmt(r['hyper_MB'])} |")
        lines += ["", "| pair | JS divergence | W_s | rel-L2 |", "|---|---|---|---|"]
        for key in ("js_round1_vs_round2", "js_round2_vs_untrained"):
            r = real[key]
            lines.append(f"| {key[3:].replace('_', ' ')} | {fmt(r['js'])} | {fmt(r['w_s'])} | {fmt(r['rel_l2'])} |")
        lines.append(f"\nDice of the round-1 upload: {fmt(real['dice_round1_upload'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer new tasks, Adam steps and training iterations")
    parser.add_argument("--no-train", action="store_true", help="skip the real-data part (nnU-Net training)")
    parser.add_argument("--out", type=Path, default=Path("work/bench/bench_server.json"))
    parser.add_argument("--epochs", type=int, help="epochs per round (default 10, --quick 3)")
    parser.add_argument("--iterations", type=int, help="iterations per epoch (default 20, --quick 10)")
    parser.add_argument("--no-shapes", action="store_true", help="skip the plan-shape part (real data only)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway nnU-Net folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_new = 2 if args.quick else 5
    results: dict = {"quick": args.quick, "plans": {}, "seconds": {}, "load_average_start": os.getloadavg()}
    for name, file in {} if args.no_shapes else PLANS.items():
        t = time.perf_counter()
        plans = json.loads((bundled_plans_dir() / file).read_text())
        adam = (10 if args.quick else 50) if name == "CPU plan" else None
        results["plans"][name] = bench_plan(plans, n_new, adam)
        results["seconds"][name] = time.perf_counter() - t
        print(f"[bench] {name}: {results['seconds'][name]:.0f} s {results['plans'][name]['section_s']}", file=sys.stderr)
    real = None
    if not args.no_train:
        t = time.perf_counter()
        root = args.out.parent / "bench_server_nnunet"
        shutil.rmtree(root, ignore_errors=True)
        epochs = args.epochs or (3 if args.quick else 10)
        iterations = args.iterations or (10 if args.quick else 20)
        real = results["real_data"] = bench_real_data(root.resolve(), epochs, iterations, [4, 16, 64])
        real |= {"epochs": epochs, "iterations_per_epoch": iterations}
        results["seconds"]["real_data"] = time.perf_counter() - t
        print(f"[bench] real data: {results['seconds']['real_data']:.0f} s", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results["seconds"]["total"] = time.perf_counter() - start
    results["load_average_end"] = os.getloadavg()
    print(tables(results["plans"], real, n_new))
    print(f"\ntotal {results['seconds']['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items())}); "
          f"1-min load average {results['load_average_start'][0]:.1f} at start, {results['load_average_end'][0]:.1f} at end "
          f"(timings assume an otherwise idle machine)")
    args.out.write_text(json.dumps(results, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
