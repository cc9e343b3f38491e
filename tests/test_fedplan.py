"""The federation plan: the shipped demo plan, the schedule of asynchronous streams, and clear errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from nnunet_feddah.federation.plan import FederationPlanError
from nnunet_feddah.federation.plan_reader import load_plan, parse_plan
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.nnunet.round_config import RoundConfig
from nnunet_feddah.organs import Task

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "plans" / "phantom_4site.json"

MINIMAL = {
    "name": "t",
    "plans_identifier": "FedDAHPlansCPU",
    "sites": [
        {"name": "a", "dataset": 501, "stream": ["kidneys", "liver"]},
        {"name": "b", "dataset": "Dataset502_B", "stream": ["kidneys", "spleen+pancreas", "liver"],
         "join_round": 4, "rounds_per_step": 1},
    ],
    "rounds_per_step": 2,
    "local": {"epochs": 3, "iterations_per_epoch": 10},
    "strategy": {"name": "feddah", "params": {"beta": 0.5}},
}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(FederationPlanError) as info:
        parse_plan(data, source="plans/x.json")
    assert all(p.startswith("plans/x.json: ") for p in info.value.problems)
    return info.value.problems


def edited(**changes) -> dict:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data


# --- the shipped plan ---------------------------------------------------------------------------------
def test_shipped_phantom_plan_parses_and_matches_the_demo():
    plan = load_plan(SHIPPED)
    assert plan.site_names == ("site1", "site2", "site3", "site4")
    assert [s.dataset for s in plan.sites] == [501, 502, 503, 504]
    assert plan.plans_identifier == "FedDAHPlansCPU"
    assert plan.strategy.name == "feddah" and plan.strategy.params == {"idle_bits": 4}  # an idle task: 4 bits per weight
    assert {s.stream[0].key for s in plan.sites if s.join_round == 1} == {"liver"}  # the shared first task
    assert plan.rounds_per_step == 2 and plan.local.epochs == 1 and plan.local.iterations_per_epoch == 120
    assert plan.local.optimizer == "adamw" and plan.local.lr_schedule == "per-task"
    assert plan.local.cpu_precision == "bfloat16"  # the learning curves' setting (docs/TRAINER.md)
    assert plan.fingerprint_round is not None and plan.fingerprint_round.template == "cpu"  # plans from every site
    assert plan.total_epochs == 2 * 2 * 1  # default: longest stream x rounds_per_step x epochs
    first_seen: dict[str, set[int]] = {}
    for r in range(1, plan.total_rounds + 1):
        for site, task in plan.active_sites(r).items():
            first_seen.setdefault(task.key, set()).add(min(
                q for q in range(1, r + 1) if plan.task_for(site, q) == task))
    assert any(len(rounds) > 1 for rounds in first_seen.values())  # a task reaches two sites at different times
    assert load_plan("phantom_4site") == plan  # bundled name lookup
    assert parse_plan(json.loads(json.dumps(plan.to_json()))) == plan  # to_json round-trips


# --- schedule -----------------------------------------------------------------------------------------
def test_schedule_of_asynchronous_streams_with_late_join():
    plan = parse_plan(MINIMAL)
    # a: 2 steps x 2 rounds from round 1; b: 3 steps x 1 round from round 4
    assert [plan.site_step("a", r) for r in range(1, 8)] == [0, 0, 1, 1, None, None, None]
    assert [plan.site_step("b", r) for r in range(1, 8)] == [None, None, None, 0, 1, 2, None]
    assert plan.total_rounds == 6
    assert plan.task_for("b", 3) is None
    assert plan.task_for("b", 5) == Task.parse("spleen+pancreas")
    assert plan.active_sites(4) == {"a": Task.parse("liver"), "b": Task.parse("kidneys")}
    assert [t.key for t in plan.tasks] == ["kidneys", "liver", "spleen+pancreas"]
    assert [plan.global_epoch_offset("a", r) for r in (1, 2, 3, 5, 9)] == [0, 3, 6, 12, 12]
    assert [plan.global_epoch_offset("b", r) for r in (1, 4, 5, 6, 7)] == [0, 0, 3, 6, 9]
    assert plan.total_epochs == 12  # longest: a, 2 steps x 2 rounds x 3 epochs
    settings = plan.round_settings("b", 6)
    assert settings["task"] == "liver" and settings["epoch_offset"] == 6 and settings["total_epochs"] == 12
    assert plan.round_settings("b", 1) is None
    assert plan.round_settings("a", 1)["seed"] != plan.round_settings("a", 2)["seed"]
    config = RoundConfig.from_mapping({**settings, "output_weights": "w", "output_metrics": "m"})
    assert config.parsed_task == Task.parse("liver") and config.lr_horizon == 12
    # time steps: a ends its steps in rounds 2 and 4, b (joins in round 4, one round per step) in 4, 5, 6
    assert plan.time_steps == (2, 4, 5, 6)
    assert [t.key for t in plan.tasks_trained_by(4)] == ["kidneys", "liver"]
    assert plan.last_trained_round("liver", 5) == 4 and plan.last_trained_round("liver", 6) == 6
    assert plan.last_trained_round("spleen+pancreas", 4) is None
    with pytest.raises(ValueError, match="unknown site 'c'"):
        plan.task_for("c", 1)
    with pytest.raises(ValueError, match="1-based"):
        plan.site_step("a", 0)


def test_round_epochs_lengthen_one_round_and_move_the_learning_rate_curves():
    plan = parse_plan(edited(round_epochs={"1": 5, "4": 2}))
    # a trains rounds 1-4 (epochs 5, 3, 3, 2); b rounds 4-6 (2, 3, 3)
    assert [plan.epochs_in(r) for r in range(1, 7)] == [5, 3, 3, 2, 3, 3]
    assert plan.round_settings("a", 1)["epochs"] == 5 and plan.round_settings("b", 4)["epochs"] == 2
    assert [plan.global_epoch_offset("a", r) for r in (1, 2, 3, 4, 5)] == [0, 5, 8, 11, 13]
    assert [plan.global_epoch_offset("b", r) for r in (4, 5, 6)] == [0, 2, 5]
    assert plan.total_epochs == 13 and plan.site_epochs("b") == 8
    per_task = parse_plan(edited(round_epochs={"1": 5, "4": 2}, local={**MINIMAL["local"], "lr_schedule": "per-task"}))
    # a's first task spans rounds 1-2 (5 + 3 epochs), its second rounds 3-4 (3 + 2)
    assert [per_task.lr_position("a", r) for r in (1, 2, 3, 4)] == [(0, 8), (5, 8), (0, 5), (3, 5)]
    assert per_task.lr_position("b", 4) == (0, 2)
    assert parse_plan(json.loads(json.dumps(plan.to_json()))) == plan  # round-trips
    assert "round_epochs" not in parse_plan(MINIMAL).to_json()  # unchanged plan hash when unset
    problems = problems_of(edited(round_epochs={"0": 2, "x": 1, "9": 2, "2": 0}))
    assert any("round_epochs.0: '0' is not a round number" in p for p in problems)
    assert any("round_epochs.x" in p for p in problems)
    assert any("round_epochs.9: round 9 is past the plan's last round (6)" in p for p in problems)
    assert any("round_epochs.2: must be an integer >= 1, got 0" in p for p in problems)
    assert any("round_epochs: must be an object" in p for p in problems_of(edited(round_epochs=[6])))


def test_device_augmentation_reaches_the_round_config():
    local = {**MINIMAL["local"], "device_augmentation": True}
    plan = parse_plan({**MINIMAL, "local": local})
    config = RoundConfig.from_mapping({**plan.round_settings("a", 1), "output_weights": "w", "output_metrics": "m"})
    assert config.device_augmentation is True
    assert "device_augmentation" not in parse_plan(MINIMAL).to_json()["local"]  # unchanged plan hash when unset
    with pytest.raises(FederationPlanError, match="local.device_augmentation: must be true or false, got 'yes'"):
        parse_plan({**MINIMAL, "local": {**MINIMAL["local"], "device_augmentation": "yes"}})


def test_cpu_precision_reaches_the_round_config():
    plan = parse_plan({**MINIMAL, "local": {**MINIMAL["local"], "cpu_precision": "bfloat16"}})
    config = RoundConfig.from_mapping({**plan.round_settings("a", 1), "output_weights": "w", "output_metrics": "m"})
    assert config.cpu_precision == "bfloat16"
    assert "cpu_precision" not in parse_plan(MINIMAL).to_json()["local"]  # unchanged plan hash when unset


def test_strategy_spellings():
    with pytest.raises(FederationPlanError, match="did you mean 'fedavg-per-task'"):
        parse_plan({**MINIMAL, "strategy": {"name": "fedavg-per-tsk"}})


def test_relative_nnunet_root_is_relative_to_the_plan_file(tmp_path):
    data = edited(nnunet_root="work")
    data["sites"][1]["nnunet_root"] = "/elsewhere/b"
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.json").write_text(json.dumps(data))
    plan = load_plan(tmp_path / "plans" / "p.json")
    assert plan.site("a").nnunet_root == tmp_path / "plans" / "work"
    assert plan.nnunet_folders("b")["nnUNet_preprocessed"] == Path("/elsewhere/b/nnUNet_preprocessed")


# --- validation of the file ---------------------------------------------------------------------------
def test_unknown_organ_names_the_field_and_the_known_organs():
    data = edited()
    data["sites"][1]["stream"][1] = "livr"
    (problem,) = problems_of(data)
    assert "sites[1].stream[1]" in problem and "'livr'" in problem and "Known organs: spleen" in problem
    assert problem.endswith("Fix: did you mean 'liver'?")


def test_all_problems_are_collected_in_one_error():
    data = edited(rounds_per_step=0, strategy={"name": "fedavgg"})
    data["sites"].append({"name": "a", "dataset": 503, "stream": []})
    data["local"] = {"epochs": -1, "iterations_per_epoch": 10, "initial_lr": 0, "max_validation_cases": "x"}
    problems = problems_of(data)
    text = "\n".join(problems)
    assert "rounds_per_step: must be an integer >= 1, got 0" in text
    assert "strategy.name: unknown strategy 'fedavgg'" in text and "did you mean 'fedavg'" in text
    assert "sites[2].name: duplicate site name 'a' (also sites[0])" in text
    assert "sites[2].stream: must be a non-empty list" in text
    assert "local.epochs: must be an integer >= 1, got -1" in text
    assert "local.initial_lr: must be a number > 0" in text
    assert "local.max_validation_cases: must be an integer >= 1" in text
    assert len(problems) == 7


def test_missing_and_unknown_fields():
    data = edited(round_deadline=60)
    del data["plans_identifier"]
    del data["sites"][0]["dataset"]
    data["sites"][1]["join_rund"] = 2
    del data["local"]["epochs"]
    text = "\n".join(problems_of(data))
    assert "plans_identifier: missing" in text
    assert "sites[0].dataset: missing" in text
    assert "local.epochs: missing" in text
    assert "round_deadline: unknown field. Fix: did you mean 'round_deadline_s'?" in text
    assert "sites[1].join_rund: unknown field. Fix: did you mean 'join_round'?" in text


def test_bad_values():
    data = edited(round_deadline_s=-5, total_epochs=4, seed=True)
    data["sites"][0].update(dataset="Dataset5_short", join_round=0, name="a b")
    data["sites"][1]["stream"][1] = "pancreas+spleen"
    data["sites"][0]["stream"][1] = "spleen+pancreas"
    text = "\n".join(problems_of(data))
    assert "round_deadline_s: must be a number > 0, got -5" in text
    assert "seed: must be an integer >= 0, got True" in text
    assert "sites[0].dataset: 'Dataset5_short' is not an nnU-Net dataset" in text
    assert "sites[0].join_round: must be an integer >= 1, got 0" in text
    assert "sites[0].name: 'a b' is not allowed" in text
    data = edited(total_epochs=4)
    data["sites"][1]["stream"][1] = "pancreas+spleen"
    data["sites"][0]["stream"][1] = "spleen+pancreas"
    text = "\n".join(problems_of(data))
    assert "total_epochs: 4 is fewer than the 12 local epochs" in text
    assert "sites[1].stream[1]: task 'pancreas+spleen' has the organs of 'spleen+pancreas' (sites[0].stream[1])" in text


def test_file_level_errors(tmp_path):
    with pytest.raises(FederationPlanError, match="does not exist"):
        load_plan(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x",}')
    with pytest.raises(FederationPlanError, match=r"bad.json: line 1 column \d+: invalid JSON"):
        load_plan(bad)
    with pytest.raises(FederationPlanError, match="<top level>: must be a JSON object"):
        parse_plan([1, 2])


# --- validation of the data side (real phantom datasets) ----------------------------------------------
def fed_plan(fed: dict, partial_stream: list[str], partial_root: Path | None = None) -> dict:
    data = edited()
    data["sites"] = [
        {"name": "full", "dataset": int(fed["full"][7:10]), "stream": ["kidneys", "spleen+pancreas"]},
        {"name": "partial", "dataset": fed["partial"], "stream": partial_stream, "join_round": 2},
    ]
    if partial_root is not None:
        data["sites"][1]["nnunet_root"] = str(partial_root)
    return data


def test_validate_sites_accepts_the_phantom_federation(phantom_federation):
    fed = phantom_federation
    found = validate_sites(parse_plan(fed_plan(fed, ["kidneys", "liver"])))
    assert {k: v.dataset_name for k, v in found.items()} == {"full": fed["full"], "partial": fed["partial"]}
    assert found["full"].fingerprint == found["partial"].fingerprint == fed["fingerprints"][fed["full"]]
    assert found["partial"].organ_cases == {"right_kidney": 5, "left_kidney": 5, "liver": 5}
    assert set(validate_sites(parse_plan(fed_plan(fed, ["liver"])), sites=["partial"])) == {"partial"}


def test_validate_sites_refuses_a_task_the_dataset_does_not_annotate(phantom_federation):
    plan = parse_plan(fed_plan(phantom_federation, ["kidneys", "spleen", "liver"]), source="plans/x.json")
    with pytest.raises(FederationPlanError) as info:
        validate_sites(plan, check_cases=False)
    (problem,) = info.value.problems
    assert problem.startswith("plans/x.json: sites[1] (partial).stream[1]: task 'spleen' needs ['spleen']")
    assert "does not annotate" in problem and "Fix:" in problem


def test_validate_sites_refuses_missing_dataset_and_plans(phantom_federation):
    data = fed_plan(phantom_federation, ["kidneys"])
    data["sites"][0]["dataset"] = 799
    data["plans_identifier"] = "FedDAHPlansNope"
    text = "\n".join(pytest.raises(FederationPlanError, validate_sites, parse_plan(data)).value.problems)
    assert "sites[0] (full).dataset: dataset 799 not found" in text
    assert "sites[1] (partial): " in text and "FedDAHPlansNope.json does not exist" in text


def test_validate_sites_refuses_a_different_architecture(phantom_federation, tmp_path):
    """A copy of the partial site whose installed plans carry another fingerprint, as a second hospital."""
    fed = phantom_federation
    root = tmp_path / "hospital_b"
    (root / "nnUNet_raw").mkdir(parents=True)
    (root / "nnUNet_raw" / fed["partial"]).symlink_to(fed["root"] / "nnUNet_raw" / fed["partial"])
    source = fed["root"] / "nnUNet_preprocessed" / fed["partial"]
    target = root / "nnUNet_preprocessed" / fed["partial"]
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_dir():
            (target / item.name).symlink_to(item)
        else:
            shutil.copy(item, target / item.name)
    plans_file = target / f"{fed['plans']}.json"
    plans = json.loads(plans_file.read_text())
    plans["feddah"]["architecture_fingerprint"] = "sha256:0123456789abcdef"
    plans_file.write_text(json.dumps(plans))
    plan = parse_plan(fed_plan(fed, ["kidneys"], partial_root=root), source="plans/x.json")
    with pytest.raises(FederationPlanError) as info:
        validate_sites(plan)
    (problem,) = info.value.problems
    good = fed["fingerprints"][fed["full"]]
    assert "sites[1] (partial): architecture fingerprint sha256:0123456789abcdef" in problem
    assert f"differs from sites[0] (full): {good}" in problem and "--plans-file" in problem
