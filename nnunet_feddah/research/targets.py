"""The targets a benchmark report is checked against, as PASS / FAIL / UNRESOLVED lines.

``scripts/bench_fcl.py`` prints them under its table. A target that orders two strategies is a claim about
the method, so it is judged on the paired per-seed difference over the benchmark's seeds: where that
difference's 95 % interval contains 0 the two strategies cannot be told apart and the line says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nnunet_feddah.results.report import format_difference
from nnunet_feddah.results.stats import paired_difference

#: FedDAH's final mean Dice must reach this fraction of fedavg-per-task's (one network per task, no forgetting).
PER_TASK_RATIO_TARGET = 0.97


def check_targets(report: Mapping[str, Any]) -> list[str]:
    """The issue's targets as PASS/FAIL lines (only those whose strategies were run).

    Reads the per-strategy means over seeds of :mod:`nnunet_feddah.results.report` (kept under the metric
    keys); the intervals and paired differences are in the report table. A target that orders two
    strategies, or a ratio of two against its threshold, is judged on the paired per-seed difference too:
    where its 95 % interval contains 0 the line reads UNRESOLVED rather than PASS or FAIL.
    """
    s = report["strategies"]
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    def ordered(ok: bool, text: str, paired: Mapping[str, Any] | None, what: str) -> None:
        if paired and paired.get("ci95") is not None and not paired.get("resolved"):
            # two means inside one interval are not an ordering: say so instead of PASS or FAIL
            lines.append(f"UNRESOLVED  {text}, paired {what} {format_difference(paired)}")
        else:
            line(ok, text)

    def val(name: str, key: str) -> float:
        value = s[name][key]
        return float("nan") if value is None else value

    if "feddah" in s and "fedavg-per-task" in s:
        ratio = val("feddah", "final_mean_dice") / max(val("fedavg-per-task", "final_mean_dice"), 1e-9)
        mine, theirs = (_per_seed(s[name], lambda e: e.get("final_mean_dice")) for name in ("feddah", "fedavg-per-task"))
        ratios = {seed: value / max(theirs[seed], 1e-9) for seed, value in mine.items()
                  if value is not None and theirs.get(seed) is not None}
        ordered(ratio >= PER_TASK_RATIO_TARGET,
                f"feddah final mean Dice = {ratio:.3f} × fedavg-per-task (target ≥ {PER_TASK_RATIO_TARGET})",
                paired_difference(ratios, dict.fromkeys(ratios, PER_TASK_RATIO_TARGET)),
                f"ratio − {PER_TASK_RATIO_TARGET}")
        line(s["feddah"]["server_bytes"] < s["fedavg-per-task"]["server_bytes"],
             f"feddah server memory {s['feddah']['server_bytes'] / 1e6:.2f} MB vs fedavg-per-task "
             f"{s['fedavg-per-task']['server_bytes'] / 1e6:.2f} MB")
    if "feddah" in s:
        line(val("feddah", "forgetting") <= 0.01, f"feddah forgetting {val('feddah', 'forgetting'):+.3f} (target ≤ 0.01)")
        if s["feddah"].get("update_lost_max") is not None:
            line(val("feddah", "update_lost_max") <= 0.01, f"feddah update lost ≤ 1 % of the round's update for every "
                 f"accepted upload: worst {val('feddah', 'update_lost_max'):.4f}")
    if "fedavg" in s:
        line(val("fedavg", "forgetting") > 0.05, f"fedavg forgetting {val('fedavg', 'forgetting'):+.3f} (must be clear, "
                                                 f"> 0.05)")
    if "feddah" in s and "feddah-noWs" in s:
        ordered(val("feddah", "final_mean_dice") >= val("feddah-noWs", "final_mean_dice"),
                f"full ≥ −Ws: {val('feddah', 'final_mean_dice'):.3f} vs {val('feddah-noWs', 'final_mean_dice'):.3f}",
                s["feddah-noWs"].get("paired_vs_feddah", {}).get("final_mean_dice"), "−Ws − full")
    if "feddah" in s and "feddah-noLR" in s:
        old = s["feddah"].get("old_tasks", [])
        ours, theirs = _old_mean(s["feddah"], old), _old_mean(s["feddah-noLR"], old)
        ordered(ours > theirs, f"full > −LR on old tasks {old}: {ours:.3f} vs {theirs:.3f}",
                paired_difference(*(_per_seed(s[name], lambda e: _old_mean(e, old)) for name in ("feddah", "feddah-noLR"))),
                "full − (−LR)")
    return lines


def _per_seed(entry: Mapping[str, Any], value: Callable[[Mapping[str, Any]], Any]) -> dict[str, Any]:
    """``{seed: value(that seed's entry)}`` of one strategy of the report."""
    return {seed: value(seed_entry) for seed, seed_entry in (entry.get("per_seed") or {}).items()}


def _old_mean(entry: Mapping[str, Any], old: Sequence[str]) -> float:
    matrix = entry["dice_matrix"]
    values = [matrix["values"][matrix["tasks"].index(t)][-1] for t in old if t in matrix["tasks"]]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")
