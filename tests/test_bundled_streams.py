"""The bundled streams keep what makes them federated continual learning, and the plan's LR/optimizer options."""

from __future__ import annotations

import pytest

from nnunet_feddah.federation.plan import FederationPlanError
from nnunet_feddah.federation.plan_reader import load_plan, parse_plan
from nnunet_feddah.nnunet.round_config import RoundConfig, RoundConfigError
from nnunet_feddah.organs import Task
from nnunet_feddah.paths import bundled_plans_dir
from nnunet_feddah.research.benchmark import reference_donors, task_iterations
from nnunet_feddah.results.replay import plan_for


def _stream_facts(plan):
    """Who trains what in which time step, and the tasks not trained in the last step."""
    steps = plan.time_steps
    by_step = []
    for j, end in enumerate(steps):
        start = steps[j - 1] + 1 if j else 1
        trained = {}
        for r in range(start, end + 1):
            for site, task in plan.active_sites(r).items():
                trained[site] = task.key
        by_step.append(trained)
    first_sites = {}
    for j, trained in enumerate(by_step):
        for site, task in trained.items():
            first_sites.setdefault(task, {}).setdefault(site, j)
    old = [t.key for t in plan.tasks if t.key not in by_step[-1].values()]
    return by_step, first_sites, old


def _check_fcl_stream(plan, min_sites: int, min_old: int, first_task: str | None = None) -> None:
    by_step, first_sites, old = _stream_facts(plan)
    assert len(plan.sites) >= min_sites
    first = set(by_step[0].values())
    assert len(first) == 1 and len(by_step[0]) >= 2, "a shared first task trained by several sites"
    if first_task:
        assert first == {first_task}
    assert any(len(set(step.values())) >= 2 for step in by_step), "different tasks at different sites at once"
    assert any(len(set(sites.values())) >= 2 for sites in first_sites.values()), "a task reaches a second site later"
    assert any(s.join_round > 1 for s in plan.sites), "a late joiner"
    assert len(old) >= min_old, f"old tasks at the end: {old}"


def test_benchmark_stream_is_the_papers_protocol() -> None:
    plan = load_plan(bundled_plans_dir() / "phantom_bench.json")
    _check_fcl_stream(plan, min_sites=4, min_old=2, first_task="kidneys")
    orders = {tuple(t.key for t in s.stream[1:]) for s in plan.sites if len(s.stream) > 1}
    assert len(orders) == len([s for s in plan.sites if len(s.stream) > 1]), "a different organ order per site"
    # round 1 (kidneys at 3 sites, from the same initial network: trained once, replayed for every strategy) is
    # long enough to clear the Dice cliff; a short round 2 brings the three apart-trained models together again;
    # site4 meets kidneys in round 3
    kidneys = Task.parse("kidneys")
    assert plan.active_sites(1) == plan.active_sites(2) == {s: kidneys for s in ("site1", "site2", "site3")}
    assert [plan.epochs_in(r) * plan.local.iterations_per_epoch for r in range(1, 5)] == [600, 100, 100, 100]
    assert plan.local.cpu_precision == "bfloat16"  # every strategy and the centralized reference alike
    assert task_iterations(plan) == {"kidneys": 3 * 600 + 3 * 100 + 100, "liver": 100, "spleen": 300, "pancreas": 300}
    # the centralized reference starts every later task from the donor FedDAH's allocation would pick
    assert [d.key for d in reference_donors(plan, "kidneys")] == []
    assert {t: [(d.key, d.last_round) for d in reference_donors(plan, t)] for t in ("liver", "spleen", "pancreas")} \
        == {t: [("kidneys", 2)] for t in ("liver", "spleen", "pancreas")}


def test_demo_stream_keeps_a_federated_continual_learning_demo() -> None:
    _check_fcl_stream(load_plan(bundled_plans_dir() / "phantom_4site.json"), min_sites=3, min_old=1)


def _plan(**local):
    return parse_plan({"name": "p", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": 2,
                       "sites": [{"name": "a", "dataset": 1, "stream": ["kidneys", "liver"]},
                                 {"name": "b", "dataset": 2, "stream": ["liver"], "join_round": 2}],
                       "local": {"epochs": 3, "iterations_per_epoch": 5, **local},
                       "strategy": {"name": "fedavg", "params": {}}}, "p")


def test_per_task_schedule_restarts_the_curve_for_every_task() -> None:
    plan = _plan(lr_schedule="per-task", optimizer="adamw")
    positions = [plan.lr_position("a", r) for r in (1, 2, 3, 4)]
    assert positions == [(0, 6), (3, 6), (0, 6), (3, 6)]
    assert [plan.lr_position("b", r) for r in (2, 3)] == [(0, 6), (3, 6)]
    settings = plan.round_settings("a", 3)
    assert settings["optimizer"] == "adamw" and "lr_schedule" not in settings
    RoundConfig.from_mapping({**settings, "output_weights": "w", "output_metrics": "m"})  # a valid round config
    federation = _plan()
    assert [federation.lr_position("a", r) for r in (1, 3)] == [(0, 12), (6, 12)]
    assert "optimizer" not in federation.to_json()["local"], "defaults stay out of the plan hash"


@pytest.mark.parametrize("field,value", [("optimizer", "adam"), ("lr_schedule", "cosine"), ("cpu_precision", "fp16")])
def test_unknown_local_choice_names_the_field_and_the_choices(field: str, value: str) -> None:
    with pytest.raises(FederationPlanError, match=rf"local\.{field}: must be one of"):
        _plan(**{field: value})


def test_round_config_refuses_an_unknown_optimizer() -> None:
    with pytest.raises(RoundConfigError, match="field 'optimizer'"):
        RoundConfig.from_mapping({"task": "liver", "output_weights": "w", "output_metrics": "m", "optimizer": "lbfgs"})


def test_benchmark_strategies_keep_feddahs_parameters_and_baselines_get_their_defaults() -> None:
    """The bundled CPU-plan stream sets DAHyper's rank (memory); every FedDAH variant must run with it."""

    plan = load_plan(bundled_plans_dir() / "phantom_bench.json")
    assert dict(plan.strategy.params) == {"rank": 8}
    for name in ("feddah", "feddah-noencoder", "feddah-composed", "feddah-composed-noencoder"):
        assert dict(plan_for(plan, name).strategy.params) == {"rank": 8}
    for name in ("fedavg", "local", "fedavg-per-task"):
        assert dict(plan_for(plan, name).strategy.params) == {}


def test_the_benchmarks_default_run_is_feddah_the_generators_two_ablations_and_the_four_baselines() -> None:
    from nnunet_feddah.method.registry import STRATEGIES
    from nnunet_feddah.research.benchmark import DEFAULT_STRATEGIES, QUICK_STRATEGIES

    assert set(DEFAULT_STRATEGIES) == {"feddah", "feddah-hypernet", "feddah-noLR", "feddah-noWs", "fedavg",
                                       "fedavg-per-task", "fedavg-per-task-donor", "local"}
    assert set(QUICK_STRATEGIES) < set(DEFAULT_STRATEGIES) <= set(STRATEGIES)
