"""Where a new multi-organ task starts: FedDAH's donor copy vs an embedding composed from its organs' tasks,
with and without the inter-layer encoder — held-out Dice of the start and after the task's first round.

Prints numbers, asserts nothing. Per seed (phantom cohort seed = training seed; ≥ 3 seeds) one phantom site
trains ``kidneys`` from DAHyper's initial base and ``liver`` from the trained kidneys network
(:func:`nnunet_feddah.research.learning_curve.snapshot_runs`, the runs ``scripts/bench_server.py`` also
uses, shared through ``--pool``). A coordinator fits them as a stream would (kidneys in round 0 — it becomes
the base — liver in round 1), then allocates the new task ``kidneys+liver`` in round 2 in one of three arms:

* ``donor`` — today's default: the kidneys network (most shared organs) with the liver's head row;
* ``composed`` — ``new_task_start="composed"``: generated for the mean of its organs' task embeddings;
* ``composed-noencoder`` — the same with ``layer_encoder=False`` (the encoder changes nothing a fitted task
  generates, so this is where the ``feddah-noencoder`` ablation can show; docs/METHOD.md §3).

Each start is trained for one benchmark round (``--iterations``, default 100, the bundled benchmark's round)
on the same site; Dice of the start and after the round, mean ± 95 % CI over seeds and paired differences
against ``donor``.

    .venv/bin/python scripts/bench_new_task.py [--seeds 0 1 2] [--out work/bench/bench_new_task.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from nnunet_feddah.paths import nnunet_env

NEW_TASK = "kidneys+liver"
ARMS = {"donor": ({}, {}), "composed": ({}, {"new_task_start": "composed"}),
        "composed-noencoder": ({"layer_encoder": False}, {"new_task_start": "composed"})}
CPU_PLAN_HYPER = {"generators": True, "rank": 8}  # the generators as the bundled CPU plans set their rank


def starts(plans: dict, kidneys: dict, liver: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The new task's first weights in every arm, from a coordinator that fitted kidneys then liver."""
    from nnunet_feddah.method.amr import AMR, AMRConfig
    from nnunet_feddah.method.dahyper import DAHyper, DAHyperConfig
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.organs import Task

    out = {}
    for arm, (hyper_params, amr_params) in ARMS.items():
        amr = AMR(DAHyper(hypernet_base(plans), is_head, DAHyperConfig(**CPU_PLAN_HYPER, **hyper_params)),
                  AMRConfig(**amr_params))
        for r, (name, weights) in enumerate((("kidneys", kidneys), ("liver", liver))):
            amr.allocate(name, list(Task.parse(name).labels), round_index=r)
            amr.update(name, weights, round_index=r, source="site")
        amr.allocate(NEW_TASK, list(Task.parse(NEW_TASK).labels), round_index=2)
        out[arm] = amr.hyper.generate(NEW_TASK)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=100, help="iterations of the new task's first round")
    parser.add_argument("--chunks", type=int, default=8, help="snapshots of the kidneys / liver runs (as bench_server)")
    parser.add_argument("--pool", type=Path, default=Path("work/bench/bench_server/pool_8chunks"))
    parser.add_argument("--out", type=Path, default=Path("work/bench/bench_new_task.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pool = args.pool.resolve()
    os.environ.update(nnunet_env(pool))  # before any nnU-Net import

    from nnunet_feddah.nnunet.weights import load_weights, save_weights
    from nnunet_feddah.research.learning_curve import CurveSettings, held_out_scorer, run_curve, snapshot_runs
    from nnunet_feddah.results.stats import mean_ci95

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    begin = time.perf_counter()
    settings = CurveSettings(iterations=args.iterations, chunk=args.iterations)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.parent / "bench_new_task_nnunet.log", "a") as chatter, contextlib.redirect_stdout(chatter):
        for seed in args.seeds:
            kidneys_run, liver_run = snapshot_runs(pool, [seed], args.chunks, "kidneys", ["liver"], log=log)
            weights = starts(kidneys_run.plans, load_weights(kidneys_run.final)[0], load_weights(liver_run.final)[0])
            plans_identifier = kidneys_run.plans_identifier
            score = held_out_scorer(kidneys_run.dataset_id, plans_identifier, NEW_TASK)
            row = {"seed": seed, "kidneys_dice": kidneys_run.rows[-1]["dice"], "liver_dice": liver_run.rows[-1]["dice"]}
            for arm, start in weights.items():
                folder = pool / "new_task" / f"{arm}_seed{seed}_{args.iterations}it"
                folder.mkdir(parents=True, exist_ok=True)
                start_file = save_weights(folder / "start.safetensors", start, {"arm": arm})
                curve = run_curve(settings, NEW_TASK, seed, kidneys_run.dataset_id, plans_identifier, folder, log,
                                  start_file)
                row[arm] = {"start": score(start)["dice"], "after_round": curve[-1]["dice"],
                            "organs_after_round": curve[-1]["organs"]}
                log(f"[new-task] seed {seed} {arm}: start {row[arm]['start']:.3f}, after {args.iterations} it "
                    f"{row[arm]['after_round']:.3f}")
            rows.append(row)

    def cell(values: list[float]) -> str:
        mean, ci = mean_ci95(values)
        return f"{mean:.3f} ± {'–' if ci is None else f'{ci:.3f}'}"

    summary = {}
    print(f"New task {NEW_TASK} after kidneys and liver (CPU plan, rank {CPU_PLAN_HYPER['rank']}), "
          f"{len(rows)} seeds, held-out Dice, mean ± 95 % CI\n")
    print("| start | Dice of the start | after one round | paired Δ vs donor, start | paired Δ vs donor, after |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        start = [r[arm]["start"] for r in rows]
        after = [r[arm]["after_round"] for r in rows]
        d_start = [r[arm]["start"] - r["donor"]["start"] for r in rows]
        d_after = [r[arm]["after_round"] - r["donor"]["after_round"] for r in rows]
        summary[arm] = {"start": mean_ci95(start), "after_round": mean_ci95(after),
                        "paired_vs_donor_start": mean_ci95(d_start), "paired_vs_donor_after": mean_ci95(d_after)}
        paired = ("—", "—") if arm == "donor" else (cell(d_start), cell(d_after))
        print(f"| {arm} | {cell(start)} | {cell(after)} | {paired[0]} | {paired[1]} |")
    print("\nper seed (start → after): " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{a} {r[a]['start']:.2f}→{r[a]['after_round']:.2f}" for a in ARMS)
        for r in rows))
    seconds = time.perf_counter() - begin
    args.out.write_text(json.dumps({"seeds": args.seeds, "iterations": args.iterations, "rows": rows,
                                    "summary": summary, "seconds": seconds}, indent=1))
    print(f"\n{seconds:.0f} s; results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
