#!/usr/bin/env python
"""Benchmark: learning curves of every organ task the demo and the benchmark use (single site, 5 seeds).

    python scripts/bench_learning.py                 # 4 organs x 5 seeds x 1400 it, bundled CPU plans (~55-70 min on 2 cores)
    python scripts/bench_learning.py --seeds 0 --organs kidneys --iterations 300
    python scripts/bench_learning.py --donor kidneys --organs liver spleen pancreas --iterations 300 --chunk 100

``--donor`` starts every organ where the federation starts a new task: from the donor's trained network of the
same seed (its from-scratch curve, reused from the same --work folder or run first). Prints held-out Dice vs iterations (mean ± 95 % CI over seeds, and every seed) per organ and a PASS/FAIL
line per organ for the target: liver, spleen, kidneys ≥ 0.80 and pancreas ≥ 0.60 in ≥ 4 of 5 seeds within
3 minutes of training. Writes curves.json and curves.png into --work. Not a test: exit code 0 whenever it ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from nnunet_feddah.paths import nnunet_env
    from nnunet_feddah.research.learning_curve import CurveSettings, format_summary, run_learning_curves

    defaults = CurveSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--organs", nargs="+", default=list(defaults.organs))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds))
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--chunk", type=int, default=defaults.chunk, help="iterations between evaluations")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.initial_lr)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default=defaults.cpu_precision,
                        help="training precision on CPU (bfloat16 needs native support, else float32 runs)")
    parser.add_argument("--template", default=defaults.plans_template, help="bundled plans template or a path")
    parser.add_argument("--train-cases", type=int, default=defaults.num_train,
                        help="phantom training cases (held-out cases stay at 4); use a fresh --work per value")
    parser.add_argument("--donor", help="start every organ from this task's trained network (FedDAH's donor rule)")
    parser.add_argument("--donor-iterations", type=int, default=defaults.donor_iterations)
    parser.add_argument("--work", default=str(REPO / "work" / "bench_learning"))
    parser.add_argument("-device", "--device", default="cpu")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    os.environ.update(nnunet_env(work))
    settings = CurveSettings(organs=tuple(args.organs), seeds=tuple(args.seeds), iterations=args.iterations,
                             chunk=args.chunk, optimizer=args.optimizer, initial_lr=args.lr, cpu_precision=args.precision,
                             plans_template=args.template, num_train=args.train_cases, device=args.device, donor=args.donor,
                             donor_iterations=args.donor_iterations)
    started = time.perf_counter()
    result = run_learning_curves(settings, work)
    print(format_summary(result["summary"]))
    print(f"[curve] {Path(result['plot']).with_suffix('.json')}, plot {result['plot']} ({time.perf_counter() - started:.0f} s in total)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
