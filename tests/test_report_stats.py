"""Means and 95 % intervals over seeds, paired differences, and the multi-seed report.json on hand-made numbers.

Pure python (numpy/scipy/matplotlib): no nnU-Net training. Expected numbers are worked out by hand here
(Student's t quantile written out), never with the functions under test.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from nnunet_feddah.results.report import (
    build_report,
    check_report,
    format_difference,
    markdown_table,
    strategy_entry,
    write_report,
)
from nnunet_feddah.results.stats import mean_ci95, paired_difference, summary

T_975_2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (3 seeds), from a t table


def _half_width(values: list[float]) -> float:
    """The 95 % half-width for three values, by hand: t(0.975, 2) · sd(ddof=1) / √3."""
    assert len(values) == 3
    return T_975_2 * statistics.stdev(values) / math.sqrt(3)


# ---------------------------------------------------------------------------------------------- stats
def test_mean_and_ci95_of_a_hand_made_table():
    mean, ci = mean_ci95([0.70, 0.74, 0.78])
    assert mean == pytest.approx(0.74)
    # sd = 0.04 (deviations −0.04, 0, +0.04; 0.0032 / 2 = 0.0016): 4.303 · 0.04 / 1.732 ≈ 0.0994
    assert ci == pytest.approx(T_975_2 * 0.04 / math.sqrt(3)) and ci == pytest.approx(0.0994, abs=1e-4)
    assert mean_ci95([0.5]) == (0.5, None)  # one seed: no spread to estimate, no interval
    assert mean_ci95([]) == (None, None) and mean_ci95([None, math.nan]) == (None, None)
    skipped = mean_ci95([None, 0.70, math.nan, 0.74, math.inf, 0.78])
    assert skipped[0] == pytest.approx(0.74) and skipped[1] == pytest.approx(ci)
    assert mean_ci95([3, 3, 3]) == (3.0, 0.0)
    assert summary([None, 0.70, 0.74, 0.78]) == {"mean": pytest.approx(0.74), "ci95": pytest.approx(ci), "n": 3}
    assert summary([]) == {"mean": None, "ci95": None, "n": 0}


def test_paired_difference_resolved_and_unresolved():
    # per-seed differences 0.10, 0.11, 0.09: mean 0.10, sd 0.01 → half-width 4.303 · 0.01 / √3 ≈ 0.0248
    a = {0: 0.80, 1: 0.82, 2: 0.85, 3: 0.90}
    b = {0: 0.70, 1: 0.71, 2: 0.76, 3: None, 4: 0.5}  # seed 3 null on one side, seed 4 only here: left out
    diff = paired_difference(a, b)
    assert diff["n"] == 3 and set(diff["per_seed"]) == {0, 1, 2}
    assert diff["per_seed"][1] == pytest.approx(0.11)
    assert diff["mean"] == pytest.approx(0.10) and diff["ci95"] == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))
    assert diff["resolved"] is True  # [0.075, 0.125] excludes 0
    # differences 0.05, −0.04, 0.02: mean 0.01, interval ≈ ±0.11 contains 0 → not a result
    loose = paired_difference({0: 0.75, 1: 0.70, 2: 0.72}, {0: 0.70, 1: 0.74, 2: 0.70})
    assert loose["mean"] == pytest.approx(0.01) and loose["ci95"] == pytest.approx(_half_width([0.05, -0.04, 0.02]))
    assert loose["ci95"] > abs(loose["mean"]) and loose["resolved"] is False
    one = paired_difference({0: 0.9}, {0: 0.1})
    assert one["mean"] == pytest.approx(0.8) and one["ci95"] is None and one["resolved"] is False
    assert paired_difference({0: None}, {0: 0.5}) == {"mean": None, "ci95": None, "n": 0, "per_seed": {},
                                                      "resolved": False}


# ---------------------------------------------------------------------------------------------- report
FEDDAH_DICE = {0: 0.70, 1: 0.74, 2: 0.78}
FEDAVG_DICE = {0: 0.60, 1: 0.66, 2: 0.63}
CENTRAL_DICE = {0: 0.80, 1: 0.80, 2: 0.85}
FEDDAH_FORGETTING = {0: 0.01, 1: 0.02, 2: 0.00}
FEDAVG_FORGETTING = {0: 0.05, 1: -0.02, 2: 0.06}


def _feddah(seed: int) -> tuple[dict, dict]:
    d = 0.80 + 0.04 * seed  # liver at step 1
    liver_r2 = None if seed == 0 else d - 0.1  # seed 0 could not evaluate liver after step 2
    evaluation = {"final_mean_dice": FEDDAH_DICE[seed], "forgetting": FEDDAH_FORGETTING[seed], "bwt": -0.01 * seed,
                  "dice_matrix": {"tasks": ["liver", "spleen"], "steps": [1, 2], "values": [[d, liver_r2], [None, d]]},
                  "old_tasks": ["liver"], "per_site": {}, "per_organ": {"liver": [d, liver_r2]}}
    stats = {"server_bytes": 1000 + (seed == 2), "server_update_s": 0.5 + 0.1 * seed, "wall_s": 10.0 + 2 * seed,
             "bytes_per_site_round": 400, "site_rounds": 4, "evaluation_s": 1.0 + seed,
             "update_lost_mean": 0.1 * (seed + 1)}
    return evaluation, stats


def _fedavg(seed: int) -> tuple[dict, dict]:
    evaluation = {"final_mean_dice": FEDAVG_DICE[seed], "forgetting": FEDAVG_FORGETTING[seed], "bwt": -0.05,
                  "dice_matrix": {"tasks": ["liver", "spleen"], "steps": [1, 2], "values": [[0.8, 0.5], [None, 0.7]]},
                  "old_tasks": ["liver"]}
    stats = {"server_bytes": 200, "server_update_s": 0.1, "wall_s": 9.0, "bytes_per_site_round": 400,
             "site_rounds": 4, "evaluation_s": 2.0}
    return evaluation, stats


def _centralized(seed: int) -> tuple[dict, dict]:
    # the pooled-data reference: no time steps, so no forgetting/BWT and a one-column Dice matrix
    evaluation = {"final_mean_dice": CENTRAL_DICE[seed], "forgetting": None, "bwt": None,
                  "dice_matrix": {"tasks": ["liver", "spleen"], "steps": [2], "values": [[0.85], [0.75]]},
                  "old_tasks": []}
    stats = {"server_bytes": 200, "server_update_s": 0.0, "wall_s": 30.0, "bytes_per_site_round": 400,
             "site_rounds": 2, "evaluation_s": 1.0}
    return evaluation, stats


def _results() -> dict:
    return {seed: {"feddah": _feddah(seed), "fedavg": _fedavg(seed), "centralized": _centralized(seed)}
            for seed in (0, 1, 2)}


def test_build_report_over_three_seeds():
    report = build_report(_results(), "phantom-bench", set="quick")
    assert check_report(report) == []
    assert report["seeds"] == [0, 1, 2] and report["seed"] == 0 and report["stream"] == "phantom-bench"
    assert report["set"] == "quick"
    feddah, fedavg, central = (report["strategies"][n] for n in ("feddah", "fedavg", "centralized"))
    # means over seeds under the agreed keys
    assert feddah["n_seeds"] == 3
    assert feddah["final_mean_dice"] == pytest.approx(0.74)
    assert feddah["forgetting"] == pytest.approx(0.01) and feddah["bwt"] == pytest.approx(-0.01)
    assert feddah["server_update_s"] == pytest.approx(0.6) and feddah["wall_s"] == pytest.approx(12.0)
    assert feddah["server_bytes"] == 1000 and isinstance(feddah["server_bytes"], int)  # 1000.33 → int
    assert feddah["bytes_per_site_round"] == 400 and isinstance(feddah["site_rounds"], int)
    assert feddah["update_lost_mean"] == pytest.approx(0.2)
    # element-wise mean matrix: liver r2 only from seeds 1 and 2 ((0.74 + 0.78) / 2), spleen r1 null everywhere
    assert feddah["dice_matrix"]["tasks"] == ["liver", "spleen"] and feddah["dice_matrix"]["steps"] == [1, 2]
    values = feddah["dice_matrix"]["values"]
    assert values[0][0] == pytest.approx(0.84) and values[0][1] == pytest.approx(0.76)
    assert values[1][0] is None and values[1][1] == pytest.approx(0.84)
    assert feddah["per_organ"]["liver"] == [pytest.approx(0.84), pytest.approx(0.76)]
    assert feddah["old_tasks"] == ["liver"]
    # the 95 % half-widths, by hand
    ci = feddah["ci95"]
    assert ci["final_mean_dice"] == pytest.approx(0.0994, abs=1e-4)
    assert ci["final_mean_dice"] == pytest.approx(_half_width([0.70, 0.74, 0.78]))
    assert ci["server_update_s"] == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))
    assert ci["wall_s"] == pytest.approx(T_975_2 * 2.0 / math.sqrt(3))
    assert ci["site_rounds"] == 0.0 and ci["bytes_per_site_round"] == 0.0
    assert set(ci) >= {"final_mean_dice", "forgetting", "bwt", "server_bytes", "server_update_s", "wall_s",
                       "bytes_per_site_round", "site_rounds", "evaluation_s", "update_lost_mean"}
    # per_seed holds exactly the single-seed entries
    assert set(feddah["per_seed"]) == {"0", "1", "2"}
    assert feddah["per_seed"]["1"] == strategy_entry(*_feddah(1))
    # the centralized reference: null forgetting/BWT stay null, with null intervals, one-column matrix
    assert central["forgetting"] is None and central["bwt"] is None
    assert central["ci95"]["forgetting"] is None and central["ci95"]["bwt"] is None
    assert central["dice_matrix"] == {"tasks": ["liver", "spleen"], "steps": [2], "values": [[0.85], [0.75]]}
    # paired differences vs feddah (this − feddah, seed by seed)
    assert "paired_vs_feddah" not in feddah
    dice = fedavg["paired_vs_feddah"]["final_mean_dice"]  # −0.10, −0.08, −0.15
    assert dice["n"] == 3 and dice["per_seed"]["2"] == pytest.approx(-0.15)
    assert dice["mean"] == pytest.approx(-0.11) and dice["ci95"] == pytest.approx(_half_width([-0.10, -0.08, -0.15]))
    assert dice["resolved"] is True  # ±0.090 around −0.110
    forgetting = fedavg["paired_vs_feddah"]["forgetting"]  # +0.04, −0.04, +0.06: the interval contains 0
    assert forgetting["mean"] == pytest.approx(0.02) and forgetting["resolved"] is False
    assert forgetting["ci95"] == pytest.approx(_half_width([0.04, -0.04, 0.06]))
    assert fedavg["paired_vs_feddah"]["wall_s"]["mean"] == pytest.approx(9.0 - 12.0)
    assert "update_lost_mean" not in fedavg["paired_vs_feddah"]  # only metrics both strategies have
    assert central["paired_vs_feddah"]["forgetting"]["n"] == 0  # null in every seed: nothing to pair
    assert central["paired_vs_feddah"]["forgetting"]["resolved"] is False
    # headline: feddah / centralized final mean Dice per seed
    headline = report["headline"]
    assert headline["reference"] == "centralized"
    ratios = [0.70 / 0.80, 0.74 / 0.80, 0.78 / 0.85]
    fraction = headline["feddah_fraction_of_centralized"]
    assert fraction["n"] == 3 and fraction["per_seed"]["0"] == pytest.approx(0.875)
    assert fraction["mean"] == pytest.approx(sum(ratios) / 3) and fraction["ci95"] == pytest.approx(_half_width(ratios))
    # the JSON round trip is the same report
    assert json.loads(json.dumps(report)) == report


def test_check_report_rejects_a_report_without_seeds_or_per_seed():
    report = build_report(_results(), "phantom-bench")
    broken = json.loads(json.dumps(report))
    del broken["seeds"]
    assert any("'seeds'" in p for p in check_report(broken))
    broken = json.loads(json.dumps(report))
    broken["seeds"] = []
    assert any("'seeds'" in p for p in check_report(broken))
    broken = json.loads(json.dumps(report))
    del broken["strategies"]["fedavg"]["per_seed"]
    del broken["strategies"]["feddah"]["ci95"]
    del broken["strategies"]["centralized"]["per_seed"]["1"]["server_bytes"]
    problems = check_report(broken)
    assert any("fedavg.per_seed" in p for p in problems) and any("feddah.ci95" in p for p in problems)
    assert any("centralized.per_seed.1.server_bytes" in p for p in problems)
    with pytest.raises(ValueError, match="empty"):
        build_report({}, "phantom-bench")


def test_a_strategy_missing_from_a_seed_and_the_headline_only_with_both_references():
    results = _results()
    del results[2]["fedavg"]
    for seed in results:
        del results[seed]["centralized"]
    report = build_report(results, "phantom-bench")
    assert check_report(report) == [] and "headline" not in report
    fedavg = report["strategies"]["fedavg"]
    assert fedavg["n_seeds"] == 2 and set(fedavg["per_seed"]) == {"0", "1"}
    assert fedavg["final_mean_dice"] == pytest.approx(0.63)
    assert fedavg["paired_vs_feddah"]["final_mean_dice"]["n"] == 2  # seed 2 has no fedavg to pair
    single = build_report({5: {"fedavg": _fedavg(0)}}, "s")
    assert single["seeds"] == [5] and single["seed"] == 5
    assert single["strategies"]["fedavg"]["ci95"]["final_mean_dice"] is None
    assert "paired_vs_feddah" not in single["strategies"]["fedavg"]


def test_markdown_table_shows_intervals_paired_differences_and_the_headline():
    table = markdown_table(build_report(_results(), "phantom-bench"))
    lines = table.splitlines()
    assert lines[0].startswith("**Headline:** FedDAH final mean Dice = 0.906 ± ") and "centralized" in lines[0]
    assert lines[1].startswith("Seeds: 3 (0, 1, 2).")
    assert "| feddah | 3 | 0.740 ± 0.099 | +0.010 ± 0.025 |" in table
    assert "| reference |" in next(line for line in lines if line.startswith("| feddah |"))
    fedavg_row = next(line for line in lines if line.startswith("| fedavg |"))
    assert "−0.110 [−0.200, −0.020] |" in fedavg_row and "unresolved" not in fedavg_row
    assert format_difference({"mean": 0.012, "ci95": 0.042, "n": 3, "resolved": False}) == \
        "+0.012 [−0.030, +0.054] unresolved"
    assert format_difference({"mean": 0.012, "ci95": None, "n": 1, "resolved": False}).endswith("unresolved")
    assert format_difference(None) == "–"


def test_write_report_writes_json_table_and_plots(tmp_path):
    path = write_report(tmp_path, _results(), "phantom-bench", device="cpu")
    assert path == tmp_path / "report.json"
    report = json.loads(path.read_text())
    assert check_report(report) == [] and report == build_report(_results(), "phantom-bench", device="cpu")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# phantom-bench (3 seeds: 0, 1, 2)") and "Seeds: 3" in text and "**Headline:**" in text
    for name in ("feddah", "fedavg", "centralized"):
        assert (tmp_path / f"dice_matrix_{name}.png").read_bytes()[:4] == b"\x89PNG"
    for png in ("dice_over_time.png", "strategy_comparison.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_check_targets_reads_the_means():
    from nnunet_feddah.research.targets import check_targets

    lines = check_targets(build_report(_results(), "phantom-bench"))
    assert "PASS  feddah forgetting +0.010 (target ≤ 0.01)" in lines
    assert any(line.startswith("FAIL  fedavg forgetting") for line in lines)  # mean 0.030 is not clear


def test_check_targets_does_not_order_strategies_inside_their_interval():
    from nnunet_feddah.research.targets import check_targets

    def no_ws(seed: int, shift: float) -> tuple[dict, dict]:
        evaluation, stats = _feddah(seed)
        return {**evaluation, "final_mean_dice": FEDDAH_DICE[seed] + shift}, stats

    close = {s: {"feddah": _feddah(s), "feddah-noWs": no_ws(s, (0.03, -0.01, 0.01)[s])} for s in (0, 1, 2)}
    (ws_line,) = [line for line in check_targets(build_report(close, "b")) if "−Ws" in line]
    assert ws_line.startswith("UNRESOLVED  full ≥ −Ws: 0.740 vs 0.750") and "unresolved" in ws_line
    clearly_lower = {s: {"feddah": _feddah(s), "feddah-noWs": no_ws(s, -0.05 - 0.001 * s)} for s in (0, 1, 2)}
    assert "PASS  full ≥ −Ws: 0.740 vs 0.689" in check_targets(build_report(clearly_lower, "b"))


def test_check_targets_judges_the_per_task_ratio_and_the_old_tasks_on_paired_seeds():
    from nnunet_feddah.research.targets import check_targets

    def shifted(seed: int, shift: float) -> tuple[dict, dict]:
        """FedDAH's numbers moved by ``shift``: the final mean and every Dice of the matrix."""
        evaluation, stats = _feddah(seed)
        matrix = evaluation["dice_matrix"]
        values = [[None if v is None else v + shift for v in row] for row in matrix["values"]]
        return {**evaluation, "final_mean_dice": FEDDAH_DICE[seed] + shift,
                "dice_matrix": {**matrix, "values": values}}, stats

    def targets(shifts: tuple[float, ...], name: str, text: str) -> str:
        results = {s: {"feddah": _feddah(s), name: shifted(s, shifts[s])} for s in (0, 1, 2)}
        (found,) = [line for line in check_targets(build_report(results, "b")) if text in line]
        return found

    # per-seed ratios 0.96 / 1.0 / 0.95 around the 0.97 target: inside their interval
    noisy = tuple(FEDDAH_DICE[s] / r - FEDDAH_DICE[s] for s, r in enumerate((0.96, 1.0, 0.95)))
    assert targets(noisy, "fedavg-per-task", "× fedavg-per-task").startswith("UNRESOLVED  feddah final mean Dice")
    assert targets((0.2, 0.21, 0.22), "fedavg-per-task", "× fedavg-per-task").startswith("FAIL  ")
    assert targets((-0.1, -0.11, -0.12), "fedavg-per-task", "× fedavg-per-task").startswith("PASS  ")
    # old tasks (liver; seed 0 has no final liver Dice, so two seeds pair): −LR 0.05 lower vs ±0.05 around
    assert targets((0.0, -0.05, -0.051), "feddah-noLR", "−LR on old tasks").startswith("PASS  full > −LR")
    unresolved = targets((0.0, 0.05, -0.06), "feddah-noLR", "−LR on old tasks")
    assert unresolved.startswith("UNRESOLVED  full > −LR") and "paired full − (−LR)" in unresolved


def test_auroc_and_spearman_on_a_hand_made_table():
    from nnunet_feddah.research.ws_pairs import auroc, spearman, summarise

    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.9, 0.8, 0.2], [True, True, False, False]) == 0.5
    assert auroc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([0.1], [True])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    rows = [{"kind": k, "healthy": h, "predictive_js": p, "predictive_js_all": p / 2, "weight_js": w,
             "w_s": p, "dice_drop": d}
            for k, h, p, w, d in [("continuing", True, 0.01, 0.05, 0.0), ("new site", True, 0.02, 0.01, 0.01),
                                  ("other organ", False, 0.4, 0.02, 0.5), ("untrained", False, 0.3, 0.03, None)]]
    summary = summarise(rows)
    assert summary["predictive_js"]["auroc"] == 1.0 and summary["weight_js"]["auroc"] == 0.5
    assert summary["predictive_js"]["healthy_max"] == 0.02 and summary["predictive_js"]["unhealthy_min"] == 0.3
    assert summary["suggested_ws_js_mid"] == pytest.approx((0.01 + 0.15) / 2)  # all-voxel: new site 0.01, worst 0.15
