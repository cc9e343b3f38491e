"""What an idle task's stored form costs in held-out Dice, and in bytes: FedDAH's forms against plain stores.

Prints numbers, asserts nothing. Judged by function (issue 34): every form of a task is scored on the held-out
phantom cases of the site that trained it, against the exact weights, paired per task.

Real trained tasks (the pool of ``scripts/bench_server.py``, shared with it): per seed one phantom site trains
kidneys from DAHyper's base, then liver, spleen and pancreas from the trained kidneys (FedDAH's allocation
rule). Every organ's final snapshot — and, with ``--mid``, its snapshot half-way — is one task.

Per task, as a federation would hold it once the task went idle (fit the kidneys, fit the organ, one round
in which only the kidneys are trained, so the organ is compressed):

* ``feddah r{R} drop`` — the rank-R generators alone (``idle_bits = 0``, the rule before 2026-12-07);
* ``feddah r{R} q{B}`` — the generators plus the residual quantised to B bits (``idle_bits = B``);
* ``store r{R}`` — a plain per-task store of the rank-R truncated SVD of every large kernel's delta from the
  base (small tensors exact): what the issue found DAHyper's generators equal;
* ``feddah store q{B}`` — FedDAH without generators (``generators = False``): the task's whole delta from the
  base quantised to B bits per weight, per output channel.

``bytes/task`` is what one more idle task costs the server: for FedDAH one code dimension of every generator
(the code grows by one dimension per task) plus its quantised remainder; for the stores the task's own
factors or codes. The base network is shared by every form and not counted.

    .venv/bin/python scripts/bench_compression.py [--seeds 0 1 2] [--mid] [--out work/bench/bench_compression.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from nnunet_feddah.method.aggregate import norm
from nnunet_feddah.method.amr import AMR, AMRConfig
from nnunet_feddah.method.dahyper import DAHyper, DAHyperConfig
from nnunet_feddah.paths import nnunet_env

Weights = dict[str, torch.Tensor]
DONOR, ORGANS = "kidneys", ("liver", "spleen", "pancreas")
DONOR_CHUNK, ORGAN_CHUNK = 50, 25  # as scripts/bench_server.py, so the two share one pool


def feddah_form(plans: Mapping, donor: Weights, organ: str, labels: list[int], exact: Weights, rank: int,
                bits: int) -> tuple[Weights, int, Weights]:
    """The organ's weights once idle in a FedDAH federation (``rank`` 0: without generators), the bytes it
    costs, and the base it is a delta of."""
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.organs import Task

    config = DAHyperConfig(generators=True, rank=rank) if rank else DAHyperConfig(generators=False)
    amr = AMR(DAHyper(hypernet_base(plans), is_head, config), AMRConfig(idle_bits=bits))
    amr.allocate(DONOR, list(Task.parse(DONOR).labels), round_index=0)
    amr.update(DONOR, donor, round_index=0, source="site")
    amr.allocate(organ, labels, round_index=1)
    amr.update(organ, exact, round_index=1, source="site")
    amr.update(DONOR, donor, round_index=2, source="site")  # the organ gets no upload: compressed
    hyper = amr.hyper
    k = hyper.config.organ_embedding_dim
    code_dimension = sum(v.shape[0] * (k if name.endswith("::G") and _is_head_param(hyper, name) else 1)
                         for name, v in hyper.params.items() if name.endswith(("::G", "::GA", "::GB")))
    quantized = sum(q.nbytes for q in hyper.idle.get(organ, {}).values())
    return hyper.generate(organ), 4 * code_dimension + quantized, hyper.base_view(organ)


def _is_head_param(hyper: DAHyper, name: str) -> bool:
    return any(u.kind == "head" and name == f"{u.name}::G" for u in hyper.units)


def lowrank_store(base: Weights, exact: Weights, rank: int) -> tuple[Weights, int]:
    """Per tensor: the rank-``rank`` truncated SVD of its delta where that is smaller, else the delta itself."""
    out, nbytes = {}, 0
    for name, w in exact.items():
        if not w.is_floating_point():
            out[name] = w
            continue
        delta = (w - base[name]).double()
        m, n = delta.shape[0], delta[0].numel() if delta.dim() >= 2 else 1
        if delta.dim() >= 2 and rank * (m + n) < m * n:
            u, s, vh = torch.linalg.svd(delta.reshape(m, n), full_matrices=False)
            delta = ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape)
            nbytes += 4 * rank * (m + n)
        else:
            nbytes += 4 * delta.numel()
        out[name] = (base[name].double() + delta).to(w.dtype)
    return out, nbytes


def measure(runs: list, ranks: list[int], bits: list[int], mid: bool, log: Callable[[str], None]) -> list[dict]:
    from nnunet_feddah.nnunet.weights import load_weights
    from nnunet_feddah.organs import Task
    from nnunet_feddah.research.learning_curve import held_out_scorer

    rows = []
    donors = {run.seed: run for run in runs if run.organ == DONOR}
    for run in (r for r in runs if r.organ != DONOR):
        donor, _ = load_weights(donors[run.seed].final)
        labels = list(Task.parse(run.organ).labels)
        score = held_out_scorer(run.dataset_id, run.plans_identifier, run.organ)
        snapshots = [len(run.rows) - 1] + ([len(run.rows) // 2 - 1] if mid else [])
        for k in snapshots:
            exact, _ = load_weights(run.snapshot(k))
            row = {"seed": run.seed, "organ": run.organ, "iterations": run.rows[k]["iterations"],
                   "dice_exact": score(exact)["dice"], "forms": {}}
            base = None
            for rank in ranks:
                for b in [0, *bits]:
                    weights, nbytes, base = feddah_form(run.plans, donor, run.organ, labels, exact, rank, b)
                    row["forms"][f"feddah r{rank} {'drop' if b == 0 else f'q{b}'}"] = (weights, nbytes)
            for rank in ranks:
                row["forms"][f"store r{rank}"] = lowrank_store(base, exact, rank)
            for b in bits:
                weights, nbytes, _ = feddah_form(run.plans, donor, run.organ, labels, exact, 0, b)
                row["forms"][f"feddah store q{b}"] = (weights, nbytes)
            delta = norm({n: exact[n].double() - base[n].double() for n in base if exact[n].is_floating_point()})
            for name, (weights, nbytes) in row["forms"].items():
                lost = norm({n: weights[n].double() - exact[n].double() for n in base if exact[n].is_floating_point()})
                row["forms"][name] = {"dice": score(weights)["dice"], "bytes": nbytes, "lost_of_delta": lost / delta}
            log(f"[compression] {run.organ} seed {run.seed} {row['iterations']} it: exact {row['dice_exact']:.4f}; "
                + ", ".join(f"{n} {f['dice']:.4f}" for n, f in row["forms"].items()))
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    from nnunet_feddah.results.stats import mean_ci95

    names = list(rows[0]["forms"])
    lines = ["| form | bytes / task (MB) | share of the delta lost | Dice(exact) − Dice(form): mean ± 95 % CI | max | "
             "tasks within 0.005 |", "|---|---|---|---|---|---|"]
    for name in names:
        losses = [r["dice_exact"] - r["forms"][name]["dice"] for r in rows]
        mean, ci = mean_ci95(losses)
        lines.append(f"| {name} | {statistics.fmean(r['forms'][name]['bytes'] for r in rows) / 1e6:.3f} | "
                     f"{statistics.fmean(r['forms'][name]['lost_of_delta'] for r in rows):.3f} | "
                     f"{mean:+.4f} ± {ci:.4f} | {max(losses):+.4f} | {sum(x <= 0.005 for x in losses)}/{len(losses)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--chunks", type=int, default=8, help="snapshots per run (as bench_server's pool)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--mid", action="store_true", help="also each organ's half-way snapshot")
    parser.add_argument("--out", type=Path, default=Path("work/bench/bench_compression.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pool = (args.out.parent / "bench_server" / f"pool_{args.chunks}chunks").resolve()
    os.environ.update(nnunet_env(pool))  # before any nnU-Net import: it reads the folders at import time
    from nnunet_feddah.research.learning_curve import snapshot_runs

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    with open(args.out.parent / "bench_compression_nnunet.log", "a") as chatter, contextlib.redirect_stdout(chatter):
        runs = snapshot_runs(pool, args.seeds, args.chunks, DONOR, ORGANS, DONOR_CHUNK, ORGAN_CHUNK, log=log)
        rows = measure(runs, args.ranks, args.bits, args.mid, log)
    print(f"Idle-task forms, {len(rows)} real tasks (seeds {args.seeds}), held-out Dice on each seed's test cases:\n")
    print(table(rows))
    print(f"\n{time.perf_counter() - begin:.0f} s")
    args.out.write_text(json.dumps({"seeds": args.seeds, "rows": rows, "seconds": time.perf_counter() - begin},
                                   indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
