#!/usr/bin/env python
"""Benchmark: does the divergence behind W_s tell healthy uploads from unhealthy ones? (labelled model pairs)

    python scripts/bench_fcl.py --quick     # first: a finished feddah run (seed 0)
    python scripts/bench_ws.py              # then: pairs from work/bench_fcl/runs/seed_0, ≈ 5 min on 2 cores

Healthy pairs are the run's real uploads of tasks with history (a site continuing, or a new site) against the
weights they were sent; unhealthy ones put another organ's final model or an untrained network under a task's
key. Prints, per pair, the site-side predictive JS, the weight-histogram JS and the Dice drop that accepting
the candidate would cause at the sites that trained the task before, and the W_s AMR gives it; then the AUROC
of each for "not healthy", its Spearman correlation with that drop, and the W_s midpoint the pairs suggest.
Writes <out>/pairs_seed<s>.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from nnunet_feddah.federation.plan_reader import load_plan
    from nnunet_feddah.federation.site_data import validate_sites
    from nnunet_feddah.nnunet.datasets import nnunet_folders
    from nnunet_feddah.nnunet.network import hypernet_base
    from nnunet_feddah.paths import nnunet_env
    from nnunet_feddah.research.ws_pairs import (
        MEASURES,
        score_pairs,
        summarise,
        unhealthy_pairs,
        upload_pairs,
        write_rows,
    )
    from nnunet_feddah.results.replay import plan_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(REPO / "plans" / "phantom_bench.json"))
    parser.add_argument("--work", default=str(REPO / "work" / "bench_fcl" / "runs"), help="bench_fcl's runs folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "work" / "bench_ws"))
    parser.add_argument("-device", "--device", default="cpu")
    args = parser.parse_args(argv)

    seed_work = Path(args.work).resolve() / f"seed_{args.seed}"
    if not (seed_work / "states" / "feddah" / "checkpoint.json").is_file():
        print(f"{seed_work}/states/feddah: no finished feddah run; run `python scripts/bench_fcl.py --quick` first")
        return 2
    base_plan = load_plan(args.plan)
    plan = plan_for(plan_for(base_plan, base_plan.strategy.name, None, args.seed), "feddah")
    with nnunet_folders(nnunet_env(seed_work)):
        site = next(iter(validate_sites(plan, check_cases=False).values()))
        base = hypernet_base(json.loads(site.plans_file.read_text()))
        pairs = upload_pairs(plan, seed_work) + unhealthy_pairs(plan, seed_work, base)
        rows = score_pairs(plan, pairs, args.device)
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_rows(out / f"pairs_seed{args.seed}.json", rows, summary)
    print("\n| measure | AUROC (not healthy) | Spearman with Dice drop | max healthy | min not healthy |")
    print("|---|---|---|---|---|")
    for measure in MEASURES:
        s = summary[measure]
        print(f"| {measure} | {s['auroc']:.3f} | {s['spearman_with_dice_drop']:+.3f} | {s['healthy_max']:.4f} | "
              f"{s['unhealthy_min']:.4f} |")
    print(f"{summary['pairs']} pairs ({summary['healthy']} healthy); {path}")
    if "suggested_ws_js_mid" in summary:
        print(f"W_s midpoint these pairs suggest (AMRConfig.ws_js_mid): {summary['suggested_ws_js_mid']:.4f} bits")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
