"""Benchmark of the coordinator's side as tasks accumulate: memory, fidelity on the update, old-task drift,
the share of each task the hypernetwork itself carries, and update time, for T = 1, 5, 15, 32, 64, 100 tasks on
the CPU and the AMOS plan, with DAHyper's generators (``cpu``, ``amos``) and as the plain per-task store
(``cpu-store``, ``amos-store``). What an idle task's stored form costs in held-out Dice is
``scripts/bench_compression.py``.

Prints numbers, asserts nothing. Targets (never low-rank synthetic ones):

* **CPU plan — real trained changes.** For every ``--seeds`` value one phantom site (cohort seed = training
  seed) trains kidneys from DAHyper's base for ``chunks`` × 50 iterations, then liver, spleen and pancreas
  from the trained kidneys network (FedDAH's allocation rule) for ``chunks`` × 25 iterations each — the
  bundled plans, nnU-Net's loop and the per-task schedule of :mod:`nnunet_feddah.research.learning_curve`,
  every chunk's weights kept (cached under ``<out dir>/bench_server/pool``). A snapshot's *change* is its
  weights minus its run's start: 4 × ``chunks`` real changes per seed, 64 with the defaults. Task t of the
  stream has the organs of change ``t mod 64`` (with 100 tasks, later tasks reuse the changes) and uploads what AMR allocated it plus that change.
* **AMOS plan — full-rank synthetic changes.** No AMOS-sized network trains on this machine: every tensor of
  the allocated weights gets a dense random change of 5 % of its norm (nothing a rank-r store holds exactly).

Stream (both plans): one new task per round, one upload each (a new site's first fit of the task, so the
upload is the task's target ``W*``); the previous task gets no upload that round, goes idle and is compressed
(its exact residual quantised to ``idle_bits``, AMR's default), which is the moment its *reference* is taken. At each checkpoint T:

* ``MB`` / ``÷ T models``: everything DAHyper holds (:meth:`DAHyper.nbytes`: base, generators, projections,
  encoder, embeddings, the active task's residual, the idle tasks' quantised remainders) against T separate fp32 models of the tasks' own shapes;
* ``update_lost``: max over all uploads of ``‖generated − W*‖ / ‖W* − sent‖`` (the previous issue's rule, 1 %);
* ``carried``: mean share of a task's delta ``W* − base`` the generators hold without the residual, at its fit
  (``AMRReport.delta_carried``), and ``idle loss``: mean share of its delta lost when it went idle;
* ``drift``: max over the idle tasks of ``‖generated now − reference‖ / ‖W* − base‖`` (target ≤ 1e-3), and
  the same relative to the task's own round change ``‖W* − sent‖`` (stricter);
* ``update s``: median seconds of the updates since the previous checkpoint.

    .venv/bin/python scripts/bench_server.py [--quick] [--plans cpu cpu-store amos amos-store] [--out work/bench/bench_server.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_feddah.method.aggregate import Contribution, norm
from nnunet_feddah.method.amr import AMR, AMRConfig
from nnunet_feddah.method.dahyper import DAHyper, DAHyperConfig
from nnunet_feddah.nnunet.network import hypernet_base, is_head
from nnunet_feddah.paths import bundled_plans_dir, nnunet_env

Weights = dict[str, torch.Tensor]
CHECKPOINTS = (1, 5, 15, 32, 64, 100)
#: stream name -> (bundled template, DAHyper parameters): the generators as the CPU federation plans set them
#: (rank 8) and as the defaults (AMOS), and the plain per-task store (``generators=False``) on both plans
PLANS: dict[str, tuple[str, dict]] = {"cpu": ("template_cpu.json", {"generators": True, "rank": 8}),
                                      "amos": ("template_amos.json", {"generators": True}),
                                      "cpu-store": ("template_cpu.json", {"generators": False}),
                                      "amos-store": ("template_amos.json", {"generators": False})}
DONOR = "kidneys"
FROM_DONOR = ("liver", "spleen", "pancreas")
DONOR_CHUNK, ORGAN_CHUNK = 50, 25


@dataclass(frozen=True)
class Change:
    """One real trained change: ``weights − start`` of a snapshot, the organs it segments, where it came from."""

    name: str
    organs: list[int]
    delta: Weights
    dice: float


# ---------------------------------------------------------------------------------------------- real changes
def real_changes(pool: Path, seeds: Sequence[int], chunks: int, log: Callable[[str], None]
                 ) -> tuple[list[Change], list]:
    """Train (or reuse) the snapshot runs; their changes interleaved across runs, and the runs."""
    os.environ.update(nnunet_env(pool))  # before any nnU-Net import: it reads the folders at import time
    from nnunet_feddah.nnunet.weights import load_weights
    from nnunet_feddah.organs import Task
    from nnunet_feddah.research.learning_curve import snapshot_runs

    per_run, runs = [], snapshot_runs(pool, seeds, chunks, DONOR, FROM_DONOR, DONOR_CHUNK, ORGAN_CHUNK, log=log)
    for run in runs:
        begin, _ = load_weights(run.folder / "start.safetensors")
        changes = []
        for k, row in enumerate(run.rows):
            weights, _ = load_weights(run.snapshot(k))
            changes.append(Change(f"{run.organ}/seed{run.seed}/{row['iterations']}it", list(Task.parse(run.organ).labels),
                                  {n: w - begin[n] for n, w in weights.items() if w.is_floating_point()}, row["dice"]))
        per_run.append(changes)
    return [run[k] for k in range(max(map(len, per_run))) for run in per_run if k < len(run)], runs


def full_rank_change(weights: Mapping[str, torch.Tensor], generator: torch.Generator) -> Weights:
    """A dense change of 5 % of every tensor's norm (zero-initialised tensors: of 1e-2)."""
    out = {}
    for name, w in weights.items():
        if w.is_floating_point():
            noise = torch.randn(w.shape, generator=generator)
            out[name] = 0.05 * max(float(w.norm()), 1e-2) * noise / noise.norm()
    return out


# ---------------------------------------------------------------------------------------------- the stream
def run_stream(base: Weights, hyper_params: dict, tasks: int, checkpoints: Sequence[int],
               change_of: Callable[[int, Weights], tuple[list[int], Weights]], drift_every: int,
               log: Callable[[str], None]) -> list[dict]:
    """``tasks`` tasks, one per round; the measurements of the module docstring at every checkpoint.

    ``change_of(t, allocated)`` gives task t's organs (for t's allocation) and its change; it is called with
    ``allocated = {}`` first to learn the organs. Drift references are kept for every ``drift_every``-th task
    (plus the first two fitted after the base), so the AMOS run holds ≤ 17 full models beside DAHyper."""
    amr = AMR(DAHyper(base, is_head, DAHyperConfig(**hyper_params)), AMRConfig())
    reference: dict[str, Weights] = {}
    scale: dict[str, tuple[float, float]] = {}  # task -> (‖W* − base‖, ‖W* − sent‖)
    reports, model_bytes, rows, idle_losses, last = [], 0, [], [], 0
    previous = None
    for t in range(tasks):
        key = f"task{t:02d}"
        organs, _ = change_of(t, {})
        amr.allocate(key, organs, round_index=t)
        sent = amr.hyper.generate(key)
        _, change = change_of(t, sent)
        upload = {k: (v + change[k] if k in change else v) for k, v in sent.items()}
        report, = amr.update_round({key: [Contribution(f"site{t % 4}", upload, 8)]}, round_index=t)[key]
        reports.append(report)
        idle_losses += [e["lost_of_delta"] for e in amr.compressed]
        model_bytes += sum(v.numel() * v.element_size() for v in upload.values())
        base_view = amr.hyper.base_view(key)  # once: it slices every head tensor
        own = norm({k: v.double() - base_view[k].double() for k, v in upload.items() if v.is_floating_point()})
        scale[key] = (own, norm(change))
        index = int(previous[4:]) if previous else 0  # task00 became the base: it has no delta to measure against
        if 0 < index and (index <= 2 or index % drift_every == 0):
            reference[previous] = amr.hyper.generate(previous)  # it went idle (compressed) this round
        previous = key
        if t + 1 in checkpoints:
            rows.append(_measure(amr, t + 1, reports[last:], reports, reference, scale, model_bytes, idle_losses))
            last = t + 1
            log(f"[bench]   T={t + 1}: {json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in rows[-1].items()})}")
    return rows


def _measure(amr: AMR, tasks: int, recent: Sequence, reports: Sequence, reference: Mapping[str, Weights],
             scale: Mapping[str, tuple[float, float]], model_bytes: int, idle_losses: Sequence[float]) -> dict:
    hyper = amr.hyper
    moved = {}
    for t, old in reference.items():
        now = hyper.generate(t)
        moved[t] = norm({k: now[k].double() - v.double() for k, v in old.items() if v.is_floating_point()})
    carried = [r.delta_carried for r in reports if r.delta_carried is not None]
    explained = [r.shared_explained for r in reports if r.shared_explained is not None]
    return {
        "tasks": tasks, "code_size": hyper.code_size, "MB": hyper.nbytes() / 1e6,
        "vs_models": hyper.nbytes() / model_bytes,
        "update_lost_max": max(r.update_lost for r in reports),
        "carried_mean": statistics.fmean(carried) if carried else None,
        "carried_min": min(carried) if carried else None,
        "shared_explained_mean": statistics.fmean(explained) if explained else None,
        "idle_loss_mean": statistics.fmean(idle_losses) if idle_losses else None,
        "drift_max": max((moved[t] / scale[t][0] for t in moved), default=None),
        "drift_vs_round_change_max": max((moved[t] / scale[t][1] for t in moved), default=None),
        "drift_tasks": len(moved),
        "update_s_median": statistics.median(r.seconds for r in recent),
    }


# ---------------------------------------------------------------------------------------------- output
def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def stream_table(name: str, rows: Sequence[dict], note: str) -> str:
    lines = [f"**{name}** — {note}", "",
             "| T | code h | MB | ÷ T models | update_lost max | carried (mean / min) | shared_explained | idle loss | "
             "drift max (÷ delta) | drift max (÷ round change) | update s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tasks']} | {r['code_size']} | {fmt(r['MB'])} | {fmt(r['vs_models'])} | "
                     f"{fmt(r['update_lost_max'], 2)} | {fmt(r['carried_mean'])} / {fmt(r['carried_min'])} | "
                     f"{fmt(r['shared_explained_mean'])} | {fmt(r['idle_loss_mean'])} | {fmt(r['drift_max'], 2)} | "
                     f"{fmt(r['drift_vs_round_change_max'], 2)} | {fmt(r['update_s_median'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 chunks per run, T up to 15")
    parser.add_argument("--plans", nargs="+", choices=sorted(PLANS), default=["cpu", "amos"])
    parser.add_argument("--seeds", type=int, nargs="+", help="phantom/training seeds of the real changes (default 0 1)")
    parser.add_argument("--chunks", type=int, help="snapshots per run (default 8, --quick 4)")
    parser.add_argument("--tasks", type=int, help="stream length (default 64, --quick 15)")
    parser.add_argument("--out", type=Path, default=Path("work/bench/bench_server.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    chunks = args.chunks or (4 if args.quick else 8)
    tasks = args.tasks or (15 if args.quick else 64)
    checkpoints = [c for c in CHECKPOINTS if c < tasks] + [tasks]
    pool = (args.out.parent / "bench_server" / f"pool_{chunks}chunks").resolve()  # a run per chunk count
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"quick": args.quick, "seeds": seeds, "chunks": chunks, "tasks": tasks, "streams": {},
                     "seconds": {}, "load_average_start": os.getloadavg()}
    begin = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    changes: list[Change] = []
    runs: list = []
    if any(name.startswith("cpu") for name in args.plans):
        t = time.perf_counter()
        with open(args.out.parent / "bench_server_nnunet.log", "a") as chatter, contextlib.redirect_stdout(chatter):
            changes, runs = real_changes(pool, seeds, chunks, log)
        results["seconds"]["real_changes"] = time.perf_counter() - t
        results["changes"] = [{"name": c.name, "dice": c.dice} for c in changes]
        log(f"[bench] {len(changes)} real changes in {results['seconds']['real_changes']:.0f} s")
    notes = {}
    for name in args.plans:
        t = time.perf_counter()
        file, hyper_params = PLANS[name]
        base = hypernet_base(json.loads((bundled_plans_dir() / file).read_text()))
        if name.startswith("cpu"):
            def change_of(i: int, allocated: Weights) -> tuple[list[int], Weights]:
                c = changes[i % len(changes)]
                return c.organs, c.delta
            notes[name] = (f"real trained changes ({len(changes)} distinct, from {len(seeds)} seed(s)), "
                           f"DAHyper {hyper_params or 'defaults'}")
        else:
            generator = torch.Generator().manual_seed(0)

            def change_of(i: int, allocated: Weights, generator=generator) -> tuple[list[int], Weights]:
                return [1 + i % 15], (full_rank_change(allocated, generator) if allocated else {})
            notes[name] = f"full-rank synthetic changes (5 % of each tensor's norm), DAHyper {hyper_params or 'defaults'}"
        log(f"[bench] {name} plan stream, {tasks} tasks")
        results["streams"][name] = run_stream(base, hyper_params, tasks, checkpoints, change_of,
                                              drift_every=1 if name.startswith("cpu") else 4, log=log)
        results["seconds"][name] = time.perf_counter() - t
    results["seconds"]["total"] = time.perf_counter() - begin
    results["load_average_end"] = os.getloadavg()
    for name, rows in results["streams"].items():
        print(stream_table(f"{name} plan", rows, notes[name]) + "\n")
    if changes:
        dice = [c.dice for c in changes]
        print(f"real changes: {len(changes)}, held-out Dice of their snapshots {min(dice):.3f}–{max(dice):.3f} "
              f"(median {statistics.median(dice):.3f})")
    print(f"total {results['seconds']['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items())}); "
          f"1-min load average {results['load_average_start'][0]:.1f} at start, {results['load_average_end'][0]:.1f} at end "
          f"(timings assume an otherwise idle machine)")
    args.out.write_text(json.dumps(results, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
