#!/usr/bin/env python
"""Benchmark: every server strategy over the same phantom stream and seed -> report.json + report.md + plots.

    python scripts/bench_fcl.py            # all 7 strategies, plans/phantom_bench.json (≤ 60 min on 2 CPU cores)
    python scripts/bench_fcl.py --quick    # feddah, fedavg, fedavg-per-task with shorter local training (≤ 15 min)

Everything lands in --work (default ./work/bench_fcl): phantom sites, nnU-Net folders, one coordinator
state per strategy, and the report in <work>/report (or --out). Not a test: it prints numbers and the
issue's targets as PASS/FAIL lines; the exit code is 0 whenever the benchmark itself ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK_ITERATIONS = 34  # per epoch; the plan's 6 epochs give 204 iterations per time step (default 300)


def main(argv: list[str] | None = None) -> int:
    from nnunet_feddah.federation.plan_reader import load_plan
    from nnunet_feddah.method.registry import STRATEGIES
    from nnunet_feddah.paths import nnunet_env
    from nnunet_feddah.results.benchmark import QUICK_STRATEGIES, check_targets, prepare_phantom_sites, run_benchmark

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(REPO / "plans" / "phantom_bench.json"))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, help="default: all (quick: "
                        f"{' '.join(QUICK_STRATEGIES)})")
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK_STRATEGIES)} strategies, "
                        f"{QUICK_ITERATIONS} iterations per epoch")
    parser.add_argument("--iterations", type=int, help="override the plan's iterations per epoch")
    parser.add_argument("--work", default=str(REPO / "work" / "bench_fcl"))
    parser.add_argument("--out", help="report folder (default <work>/report, or <work>/report_quick)")
    parser.add_argument("-device", "--device", default="cpu")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    os.environ.update(nnunet_env(work))
    plan = load_plan(args.plan)
    strategies = args.strategies or (QUICK_STRATEGIES if args.quick else STRATEGIES)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else None)
    tag = "quick" if args.quick else "default"
    out = Path(args.out) if args.out else work / f"report_{tag}"
    run_work = work / f"runs_{tag}" if args.iterations is None else work / f"runs_it{iterations}"
    started = time.perf_counter()
    prepare_phantom_sites(plan)
    report = run_benchmark(plan, strategies, run_work, out, iterations, args.device, set=tag,
                           cpu_threads=os.cpu_count())
    data = json.loads(report.read_text())
    print("\n".join(check_targets(data)))
    print(f"[bench] {report} ({time.perf_counter() - started:.0f} s in total)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
