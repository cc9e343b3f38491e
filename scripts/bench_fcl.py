#!/usr/bin/env python
"""Benchmark: every server strategy over the same phantom stream and 3 seeds -> report.json + report.md + plots.

    python scripts/bench_fcl.py            # feddah, 3 ablations, 4 baselines + the centralized reference, seeds 0 1 2
    python scripts/bench_fcl.py --strategies all   # every registered strategy (12) + centralized
    python scripts/bench_fcl.py --quick    # feddah, fedavg, fedavg-per-task-donor + centralized, seed 0
    python scripts/bench_fcl.py --many     # the many-task stream (13 tasks), upload replay, seeds 0 1 2

The stream is plans/phantom_bench.json (4 sites, shared first task, different organ orders, a late joiner).
``--quick`` trains exactly what the default trains (same stream and iterations, so its tasks are past the Dice
cliff too) for fewer strategies and one seed: a reading to check a change by, without intervals.
Each seed draws its own phantom cohort and training seeds; every metric is reported as the mean ± 95 %
confidence interval over seeds and as the paired per-seed difference against ``feddah``.

``--many`` is the many-task instrument (issue 34): plans/phantom_many.json (4 sites, 13 tasks over 5 rounds: site1
learns kidneys alone in round 1, then every site learns a new organ each round; most tasks go idle after one round
and stay idle, liver, spleen, pancreas and stomach reach a second site later, liver+spleen is learned last on top
of 12), the exact store ``fedavg-per-task-donor`` (which trains every site job), then
``feddah`` (4-bit idle store) and ``feddah-idleLowrank`` (the rank-8 generators, idle remainder dropped: a plain
rank-8 per-task store) replayed over its uploads (``--replay-uploads``, nnunet_feddah.research.benchmark), and
the centralized reference. The report adds server memory at every time step and each new task's Dice after its
first round. Everything lands
in --work (default ./work/bench_fcl): one nnU-Net root, site work and coordinator state per seed and
strategy, and the report in <work>/report_<quick|default> (or --out). Not a test: it prints numbers and the
targets as PASS/FAIL lines; the exit code is 0 whenever the benchmark itself ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
DEFAULT_PLAN, MANY_PLAN = (str(REPO / "plans" / f"{name}.json") for name in ("phantom_bench", "phantom_many"))
#: The many-task instrument: the exact store trains every job first, the compressing stores replay its uploads.
MANY_STRATEGIES = ("fedavg-per-task-donor", "feddah", "feddah-idleLowrank")
QUICK_SEEDS = (0,)


def main(argv: list[str] | None = None) -> int:
    from nnunet_feddah.federation.plan_reader import load_plan
    from nnunet_feddah.method.registry import STRATEGIES
    from nnunet_feddah.paths import nnunet_env
    from nnunet_feddah.research.benchmark import DEFAULT_STRATEGIES, QUICK_STRATEGIES, run_benchmark
    from nnunet_feddah.research.targets import check_targets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=DEFAULT_PLAN)
    parser.add_argument("--strategies", nargs="+", choices=(*STRATEGIES, "all"),
                        help=f"default: {' '.join(DEFAULT_STRATEGIES)} (quick: {' '.join(QUICK_STRATEGIES)}); "
                             f"all: every registered strategy")
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK_STRATEGIES)} strategies, seed "
                        f"{' '.join(map(str, QUICK_SEEDS))}")
    parser.add_argument("--many", action="store_true", help="the many-task stream: plans/phantom_many.json, "
                        f"{' '.join(MANY_STRATEGIES)} with --replay-uploads (work default ./work/bench_many)")
    parser.add_argument("--replay-uploads", action="store_true", help="train each site job once (by the first "
                        "strategy) and replay its change onto every later strategy's start")
    parser.add_argument("--iterations", type=int, help="override the plan's iterations per epoch")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--no-centralized", action="store_true", help="skip the centralized reference")
    parser.add_argument("--work", help="default ./work/bench_fcl (--many: ./work/bench_many)")
    parser.add_argument("--out", help="report folder (default <work>/report, or <work>/report_quick)")
    parser.add_argument("-device", "--device", default="cpu")
    args = parser.parse_args(argv)

    work = Path(args.work or REPO / "work" / ("bench_many" if args.many else "bench_fcl")).resolve()
    os.environ.update(nnunet_env(work))  # each seed points the nnU-Net folders at its own root under work
    plan = load_plan(MANY_PLAN if args.many and args.plan == DEFAULT_PLAN else args.plan)
    strategies = args.strategies or (QUICK_STRATEGIES if args.quick else MANY_STRATEGIES if args.many
                                     else DEFAULT_STRATEGIES)
    if "all" in strategies:
        strategies = STRATEGIES
    iterations = args.iterations
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else SEEDS)
    tag = "quick" if args.quick else "many" if args.many else "default"
    out = Path(args.out) if args.out else work / f"report_{tag}"
    # quick and default train the same jobs, so the default resumes what a quick run trained
    run_work = work / "runs" if args.iterations is None else work / f"runs_it{iterations}"
    started = time.perf_counter()
    report = run_benchmark(plan, strategies, seeds, run_work, out, iterations, args.device,
                           centralized=not args.no_centralized, set=tag, cpu_threads=os.cpu_count(),
                           replay_uploads=args.many or args.replay_uploads)
    data = json.loads(report.read_text())
    print("\n".join(check_targets(data)))
    print(f"[bench] {report} ({time.perf_counter() - started:.0f} s in total)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
