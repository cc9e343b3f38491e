"""Evaluation, FCL metrics, the merge rule, report.json and the strategy benchmark on a tiny real federation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_feddah.results.fcl_metrics import DiceMatrix, fcl_metrics, mean_matrix
from nnunet_feddah.results.merge import merge_task_probabilities
from nnunet_feddah.results.report import build_report, check_report, write_report

NAN = math.nan


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_on_a_hand_made_matrix():
    matrix = DiceMatrix(["A", "B", "C"], [1, 2, 3], [[0.8, 0.6, 0.5], [NAN, 0.7, 0.75], [NAN, NAN, 0.9]])
    metrics = fcl_metrics(matrix, {"A": 0, "B": 1, "C": 2})
    assert metrics["old_tasks"] == ["A", "B"]
    assert metrics["final_mean_dice"] == pytest.approx((0.5 + 0.75 + 0.9) / 3)
    assert metrics["bwt"] == pytest.approx(((0.5 - 0.8) + (0.75 - 0.7)) / 2)  # vs the end of the training step
    assert metrics["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.7 - 0.75)) / 2)  # drop from the best earlier
    # A trained again in step 2 (another site's stream): its reference point moves to step 2
    again = fcl_metrics(matrix, {"A": 1, "B": 1, "C": 2})
    assert again["bwt"] == pytest.approx(((0.5 - 0.6) + (0.75 - 0.7)) / 2)
    assert again["forgetting"] == metrics["forgetting"]
    # every task trained in the last step: nothing can have been forgotten
    none_old = fcl_metrics(matrix, {"A": 2, "B": 2, "C": 2})
    assert none_old["forgetting"] is None and none_old["bwt"] is None and none_old["old_tasks"] == []
    with pytest.raises(ValueError, match="no training column"):
        fcl_metrics(matrix, {"A": 0})
    # transfer: a task's Dice at the end of the first step it was trained in, over tasks met after the first step
    assert metrics["new_task_first_dice"] is None  # no first columns given
    first = fcl_metrics(matrix, {"A": 0, "B": 1, "C": 2}, {"A": 0, "B": 1, "C": 2})
    assert first["new_task_first_dice"] == pytest.approx((0.7 + 0.9) / 2)


def test_the_report_shows_server_memory_against_the_tasks_held():
    from nnunet_feddah.results.report import memory_lines

    curve = {"1": {"tasks": 1, "bytes": 2_000_000}, "3": {"tasks": 5, "bytes": 3_500_000}}
    lines = memory_lines({"strategies": {"feddah": {"server_bytes_by_step": curve}, "centralized": {}}})
    assert "| round 1 (1 tasks) | round 3 (5 tasks) |" in lines[3] and lines[-1] == "| feddah | 2.00 | 3.50 |"
    assert memory_lines({"strategies": {"centralized": {}}}) == []


def test_mean_over_sites_ignores_sites_without_labels():
    a = DiceMatrix(["liver", "spleen"], [1, 2], [[0.8, 0.6], [NAN, 0.4]])
    b = DiceMatrix(["liver", "spleen"], [1, 2], [[0.6, 0.4], [NAN, NAN]])
    mean = mean_matrix({"a": a, "b": b})
    np.testing.assert_allclose(mean.values, [[0.7, 0.5], [NAN, 0.4]])
    assert mean.to_json()["values"] == [[0.7, 0.5], [None, 0.4]]
    assert DiceMatrix.from_json(mean.to_json()).tasks == ["liver", "spleen"]
    with pytest.raises(ValueError, match="expected"):
        mean_matrix({"a": a, "c": DiceMatrix(["liver"], [1, 2], [[0.1, 0.2]])})


# ---------------------------------------------------------------------------------------------- merge
def _probs(columns: dict[int, list[float]], width: int = 4) -> np.ndarray:
    probs = np.zeros((16, 1, width), dtype=np.float32)
    for channel, values in columns.items():
        probs[channel, 0] = values
    return probs


def test_merge_rule_on_a_hand_made_two_task_case():
    # voxel:            0     1     2     3
    liver = _probs({0: [0.9, 0.3, 0.4, 0.1], 6: [0.1, 0.7, 0.6, 0.9]})
    spleen = _probs({0: [0.8, 0.9, 0.2, 0.45], 1: [0.2, 0.1, 0.8, 0.55],
                     6: [0.99, 0.99, 0.99, 0.99]})  # a channel outside the task never counts
    merged = merge_task_probabilities({"liver": liver, "spleen": spleen}, {"liver": [6], "spleen": [1]})
    assert merged.labels.tolist() == [[0, 6, 1, 6]]  # nobody / liver only / spleen surer / liver surer
    assert merged.labels.dtype == np.uint8
    assert merged.claims == {"liver": 3, "spleen": 2} and merged.won == {"liver": 2, "spleen": 1}
    assert merged.contested == 2
    # ties go to the task listed first
    tie = merge_task_probabilities({"spleen": _probs({1: [1, 1, 1, 1]}), "liver": _probs({6: [1, 1, 1, 1]})},
                                   {"liver": [6], "spleen": [1]})
    assert tie.labels.tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="same image"):
        merge_task_probabilities({"liver": liver, "spleen": spleen[:, :, :2]}, {"liver": [6], "spleen": [1]})
    with pytest.raises(ValueError, match="no organ list"):
        merge_task_probabilities({"liver": liver}, {"spleen": [1]})


# ---------------------------------------------------------------------------------------------- report
def _fake_result(dice: float) -> tuple[dict, dict]:
    matrix = DiceMatrix(["liver", "spleen"], [1, 2], [[dice, dice - 0.1], [NAN, dice]])
    evaluation = {"final_mean_dice": dice - 0.05, "forgetting": 0.1, "bwt": -0.1, "dice_matrix": matrix.to_json(),
                  "old_tasks": ["liver"], "per_site": {}, "per_organ": {}}
    stats = {"server_bytes": 1000, "server_update_s": 0.5, "wall_s": 12.0, "bytes_per_site_round": 400,
             "site_rounds": 4}
    return evaluation, stats


def test_report_json_matches_its_schema(tmp_path):
    path = write_report(tmp_path, {0: {"feddah": _fake_result(0.8), "fedavg": _fake_result(0.6)}}, "phantom-bench")
    report = json.loads(path.read_text())
    assert check_report(report) == []
    assert set(report) >= {"strategies", "stream", "seeds", "seed"} and report["stream"] == "phantom-bench"
    assert report["seeds"] == [0] and report["seed"] == 0
    entry = report["strategies"]["feddah"]
    assert set(entry) >= {"final_mean_dice", "forgetting", "bwt", "dice_matrix", "server_bytes", "server_update_s",
                          "wall_s", "bytes_per_site_round", "per_seed", "ci95", "n_seeds"}
    assert "paired_vs_feddah" in report["strategies"]["fedavg"] and "paired_vs_feddah" not in entry
    assert entry["dice_matrix"]["values"][1][0] is None
    assert "| feddah | 1 | 0.750 | +0.100 | -0.100 | – | 0.00 (5.0) |" in (tmp_path / "report.md").read_text()
    for png in ("dice_matrix_feddah.png", "dice_matrix_fedavg.png", "dice_over_time.png", "strategy_comparison.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    broken = json.loads(path.read_text())
    del broken["strategies"]["fedavg"]["server_bytes"]
    broken["strategies"]["feddah"]["dice_matrix"]["values"] = [[0.1]]
    problems = check_report(broken)
    assert any("fedavg.server_bytes" in p for p in problems) and any("feddah.dice_matrix" in p for p in problems)
    with pytest.raises(ValueError, match="schema"):
        build_report({0: {"x": ({**_fake_result(0.5)[0], "dice_matrix": {"tasks": ["a"], "steps": [1], "values": []}},
                                _fake_result(0.5)[1])}}, "s")


# ---------------------------------------------------------------------------------------------- end to end
STRATEGIES = ("feddah", "feddah-hypernet", "feddah-noLR", "feddah-noWs", "fedavg", "fedavg-per-task",
              "fedavg-per-task-donor", "local")


@pytest.fixture(scope="module")
def mini_bench(phantom_federation, tmp_path_factory) -> dict:
    """Every strategy over two real rounds of a two-site plan (liver first, then spleen / kidneys), evaluated."""
    from nnunet_feddah.federation.plan_reader import parse_plan
    from nnunet_feddah.research.benchmark import run_benchmark

    fed = phantom_federation
    plan = parse_plan({
        "name": "mini", "plans_identifier": fed["plans"], "rounds_per_step": 1, "seed": 3,
        "sites": [{"name": "a", "dataset": fed["full"], "stream": ["liver", "spleen"]},
                  {"name": "b", "dataset": fed["partial"], "stream": ["liver", "kidneys"]}],
        "local": {"epochs": 1, "iterations_per_epoch": 12, "val_iterations_per_epoch": 1, "max_validation_cases": 1},
        "strategy": {"name": "feddah"},
    }, "mini.json")
    tmp = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    report = run_benchmark(plan, STRATEGIES, [3], tmp / "bench", tmp / "report", phantom=False, log=lines.append)
    return {"plan": plan, "report": json.loads(report.read_text()), "out": tmp / "report", "work": tmp / "bench" / "seed_3",
            "lines": lines, "fed": fed, "tmp": tmp}


@pytest.mark.slow
def test_every_strategy_runs_and_is_reported(mini_bench):
    from nnunet_feddah.federation import checkpoint

    report, work = mini_bench["report"], mini_bench["work"]
    assert check_report(report) == []
    assert list(report["strategies"]) == [*STRATEGIES, "centralized"] and report["stream"] == "mini"
    assert report["seeds"] == [3]
    for name, entry in report["strategies"].items():
        if name == "centralized":
            continue
        assert checkpoint.read_committed(work / "states" / name).round == 2, name
        matrix = entry["dice_matrix"]
        assert matrix["tasks"] == ["liver", "spleen", "kidneys"] and matrix["steps"] == [1, 2]
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix["values"]])
        assert np.isfinite(values[0]).all() and np.isnan(values[1:, 0]).all(), (name, values)  # seen ⇒ evaluated
        assert ((values[np.isfinite(values)] >= 0) & (values[np.isfinite(values)] <= 1)).all()
        site_b = entry["per_site"]["b"]["values"]
        assert site_b[1] == [None, None], "site b does not annotate the spleen: never evaluated there"
        assert entry["old_tasks"] == ["liver"] and entry["server_bytes"] > 0 and entry["bytes_per_site_round"] > 0
        assert entry["wall_s"] > 0
    # round 1 is the same job for every strategy: trained once, replayed for the other six
    assert report["trained_jobs"] + report["replayed_jobs"] == len(STRATEGIES) * 4
    assert report["replayed_jobs"] >= (len(STRATEGIES) - 1) * 2
    per_task = report["strategies"]["fedavg-per-task"]["server_bytes"]
    assert per_task == pytest.approx(4 * report["strategies"]["fedavg"]["server_bytes"] / 2, rel=0.01)  # 3 models+base
    # the centralized reference: one model per task on the pooled cases, as many iterations as the federation spent
    central = report["strategies"]["centralized"]
    assert central["forgetting"] is None and central["dice_matrix"]["steps"] == [2]
    assert central["per_seed"]["3"]["task_iterations"] == {"liver": 24, "spleen": 12, "kidneys": 12}
    assert 0 <= central["final_mean_dice"] <= 1 and "headline" in report
    evaluation = json.loads((mini_bench["out"] / "seed_3" / "feddah" / "evaluation.json").read_text())
    assert set(evaluation["details"]["r2"]["kidneys"]) == {"a", "b"}
    # bit-identical weights are predicted once: the per-task baseline's liver is idle in round 2 (and round 1's
    # liver is the same average under fedavg and fedavg-per-task, evaluated first by fedavg)
    per_task = json.loads((mini_bench["out"] / "seed_3" / "fedavg-per-task" / "evaluation.json").read_text())
    assert per_task["evaluations"]["reused"] >= 4 and per_task["details"]["r2"]["liver"] == per_task["details"]["r1"]["liver"]
    fedavg = json.loads((mini_bench["out"] / "seed_3" / "fedavg" / "evaluation.json").read_text())
    assert fedavg["details"]["r1"]["liver"] == per_task["details"]["r1"]["liver"]
    assert (mini_bench["out"] / "strategy_comparison.png").is_file()


def test_a_resumed_finished_run_reuses_its_evaluation_in_another_report(mini_bench):
    """What --quick evaluated, the default run (another report folder, same runs) does not predict again."""
    from nnunet_feddah.research.benchmark import run_benchmark

    lines: list[str] = []
    out = mini_bench["tmp"] / "report_again"
    run_benchmark(mini_bench["plan"], ("feddah", "local"), [3], mini_bench["tmp"] / "bench", out, phantom=False,
                  centralized=False, log=lines.append)
    runs = [line for line in lines if line.startswith("[bench] seed 3")]
    assert len(runs) == 2 and all("evaluation of the finished run reused" in line for line in runs), runs
    first = json.loads((mini_bench["out"] / "seed_3" / "local" / "evaluation.json").read_text())
    again = json.loads((out / "seed_3" / "local" / "evaluation.json").read_text())
    assert again["dice_matrix"] == first["dice_matrix"] and again["state"] == first["state"]


def _export(mini_bench, tmp: Path) -> tuple[Path, str]:
    from nnunet_feddah.results.export import export_tasks

    fed = mini_bench["fed"]
    folder = export_tasks(mini_bench["work"] / "states" / "feddah", mini_bench["plan"], fed["full"],
                          out_results=tmp / "results")
    return folder, fed["full"]


@pytest.mark.slow
def test_evaluator_agrees_with_nnunet_predict_and_evaluate_folder(mini_bench, tmp_path):
    """Export → the real nnUNetv2_predict → our Dice == nnUNetv2_evaluate_folder's; our in-process prediction
    is voxel-identical to nnUNetv2_predict's."""
    import SimpleITK as sitk

    from nnunet_feddah.federation import checkpoint
    from nnunet_feddah.nnunet.network import is_head
    from nnunet_feddah.paths import ext_trainer_dir
    from nnunet_feddah.results.evaluate import evaluate_task, load_test_set
    from nnunet_feddah.results.export import predict_command
    from nnunet_feddah.results.inference import TaskModel, label_dice

    folder, site = _export(mini_bench, tmp_path)
    fed = mini_bench["fed"]
    raw = fed["root"] / "nnUNet_raw" / site
    env = {**os.environ, "nnUNet_results": str(tmp_path / "results"), "nnUNet_extTrainer": str(ext_trainer_dir())}
    command = predict_command(site, fed["plans"], "liver", str(raw / "imagesTs"), str(tmp_path / "pred"))
    command[0] = str(Path(sys.executable).parent / command[0])
    proc = subprocess.run([*command, "-npp", "0", "-nps", "0", "--disable_progress_bar", "--disable_tta"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluate_bin = str(Path(sys.executable).parent / "nnUNetv2_evaluate_folder")
    proc = subprocess.run([evaluate_bin, str(raw / "labelsTs"), str(tmp_path / "pred"), "-djfile",
                           str(folder / "dataset.json"), "-pfile", str(folder / "plans.json"), "-np", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())

    test_set = load_test_set(mini_bench["plan"], "a", log=lambda *_: None)
    committed = checkpoint.require_committed(mini_bench["work"] / "states" / "feddah")
    committed.require_fingerprint(test_set.shared.plans["feddah"]["architecture_fingerprint"], "another architecture")
    strategy = committed.load_strategy(is_head)
    model = TaskModel.from_weights(test_set.shared, strategy.task_weights("liver"), [6], "liver", torch.device("cpu"))
    ours = evaluate_task(test_set, model)
    for entry in summary["metric_per_case"]:
        case = Path(entry["reference_file"]).name.removesuffix(".nii.gz")
        theirs = entry["metrics"]["6"]["Dice"]
        assert ours["per_case"][case]["liver"] == pytest.approx(theirs, abs=1e-9, nan_ok=True)
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(entry["prediction_file"]))
        in_process, _ = model.predict(test_set.images[case])
        np.testing.assert_array_equal(in_process, predicted)

    # a non-trivial case for the metric itself: the reference against itself shifted by two voxels
    reference = sitk.ReadImage(entry["reference_file"])
    shifted = np.roll(sitk.GetArrayFromImage(reference), 2, axis=1)
    image = sitk.GetImageFromArray(shifted)
    image.CopyInformation(reference)
    (tmp_path / "shift").mkdir()
    sitk.WriteImage(image, str(tmp_path / "shift" / Path(entry["reference_file"]).name))
    proc = subprocess.run([evaluate_bin, str(raw / "labelsTs"), str(tmp_path / "shift"), "-djfile",
                           str(folder / "dataset.json"), "-pfile", str(folder / "plans.json"), "-np", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shifted_summary = json.loads((tmp_path / "shift" / "summary.json").read_text())["metric_per_case"][0]["metrics"]
    ours = label_dice(sitk.GetArrayFromImage(reference), shifted, list(range(1, 16)))
    for label, value in ours.items():
        assert value == pytest.approx(shifted_summary[str(label)]["Dice"], abs=1e-9, nan_ok=True)
    assert 0.2 < ours[6] < 0.99  # the liver overlaps partly: the comparison is not 0 = 0


@pytest.mark.slow
def test_predict_merges_every_task_into_amos_ids(mini_bench, tmp_path):
    from nnunet_feddah.results.predict import MERGE_LOG
    from nnunet_feddah.results.predict import main as predict_main

    folder, site = _export(mini_bench, tmp_path)
    images = mini_bench["fed"]["root"] / "nnUNet_raw" / site / "imagesTs"
    assert predict_main(["-i", str(images), "-o", str(tmp_path / "merged"), "-m", str(folder), "--task-maps"]) == 0
    import SimpleITK as sitk

    log = json.loads((tmp_path / "merged" / MERGE_LOG).read_text())
    assert sorted(log["tasks"]) == ["kidneys", "liver", "spleen"]
    for case in log["cases"]:
        merged = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "merged" / f"{case}.nii.gz")))
        maps = {t: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "merged" / "tasks" / t / f"{case}.nii.gz")))
                for t in log["tasks"]}
        assert set(np.unique(merged).tolist()) <= {0, 1, 2, 3, 6}
        claims = sum((m > 0).astype(int) for m in maps.values())
        assert (claims > 0).any(), f"{case}: no task claims a voxel, so the merge rule is not exercised"
        assert (merged > 0).any() and (merged[claims == 0] == 0).all()
        for task_map in maps.values():  # an uncontested claim is kept as is
            only = (task_map > 0) & (claims == 1)
            np.testing.assert_array_equal(merged[only], task_map[only])
        assert log["cases"][case]["contested"] == int((claims > 1).sum())
    assert predict_main(["-i", str(images), "-o", str(tmp_path / "x"), "-m", str(folder), "-t", "pancreas"]) == 2


@pytest.mark.slow
def test_evaluate_cli_writes_the_report_and_refuses_another_plan(mini_bench, tmp_path, capsys):
    from nnunet_feddah.results.evaluate import main as evaluate_main
    from nnunet_feddah.results.replay import plan_for

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan_for(mini_bench["plan"], "fedavg").to_json()))
    state = mini_bench["work"] / "states" / "fedavg"
    assert evaluate_main(["--plan", str(plan_file), "--state", str(state), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert check_report(report) == [] and list(report["strategies"]) == ["fedavg"]
    bench = mini_bench["report"]["strategies"]["fedavg"]
    assert report["strategies"]["fedavg"]["dice_matrix"] == bench["dice_matrix"]  # the same evaluation, re-run
    other = {**plan_for(mini_bench["plan"], "fedavg").to_json(), "seed": 4}
    plan_file.write_text(json.dumps(other))
    assert evaluate_main(["--plan", str(plan_file), "--state", str(state), "--out", str(tmp_path / "x")]) == 2
    assert "plan_hash" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_replays_the_identical_round_and_trains_the_rest(mini_bench, tmp_path):
    from nnunet_feddah.results.compare import compare, format_comparison
    from nnunet_feddah.results.replay import plan_for

    plan = plan_for(mini_bench["plan"], "feddah")
    work = mini_bench["work"]
    result = compare(plan, work / "states" / "feddah", work / "sites", tmp_path / "cmp", "fedavg", log=lambda *_: None)
    # round 1 (both sites, liver, the same initial network) is replayed from the first run's round folders;
    # round 2 starts from FedAvg's own average, so it is trained again
    assert result["replayed"] == 2 and result["trained_here"] == 2
    assert result["old_tasks"] == ["liver"] and set(result["final_dice"]) == {"feddah", "fedavg"}
    matrix = mini_bench["report"]["strategies"]["feddah"]["dice_matrix"]
    assert result["final_dice"]["feddah"]["liver"] == pytest.approx(matrix["values"][0][-1])  # the same state
    assert (tmp_path / "cmp" / "comparison.json").is_file()
    assert "| liver (old) |" in format_comparison(result)
