"""AMR's round aggregation on real trained nnU-Net uploads: order-free, and it keeps each round's work.

Two phantom sites train kidneys for two rounds from FedDAH's weights, then one of them trains liver for two
rounds while kidneys go idle (≈ 1 min on 2 cores). The uploads are recorded, so the same real uploads can be
folded into fresh strategies in other orders.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nnunet_feddah.federation.coordinator import Coordinator
from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.method.aggregate import change_lost
from nnunet_feddah.method.registry import make_strategy
from nnunet_feddah.method.strategy import Upload
from nnunet_feddah.nnunet.network import is_head

FINGERPRINT = "sha256:amr-rounds"


def plan_dict() -> dict:
    return {
        "name": "amr-rounds", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": 2,
        "sites": [{"name": "a", "dataset": 701, "stream": ["kidneys", "liver"]},
                  {"name": "b", "dataset": 702, "stream": ["kidneys"]}],
        "local": {"epochs": 1, "iterations_per_epoch": 6, "val_iterations_per_epoch": 1, "max_validation_cases": 1},
        "strategy": {"name": "feddah", "params": {}},
    }


@pytest.fixture(scope="module")
def real_run(phantom_federation, tmp_path_factory):
    """The run's coordinator, its history and every round's (jobs, results) as the sites produced them."""
    from nnunet_feddah.federation.site_round import InProcessExecutor
    from nnunet_feddah.nnunet.network import hypernet_base

    work = tmp_path_factory.mktemp("amr_rounds")
    plan = parse_plan(plan_dict(), str(work / "plan.json"))
    base = hypernet_base(_plans(phantom_federation))
    recorded: list[tuple[dict, dict]] = []
    execute = InProcessExecutor(plan, work / "sites")

    def recording(jobs, deadline):
        results = execute(jobs, deadline)
        recorded.append((dict(jobs), dict(results)))
        return results

    coordinator = Coordinator.open(plan, work / "state", base, is_head, FINGERPRINT, log=lambda *_: None)
    history = coordinator.run(recording)
    return {"coordinator": coordinator, "history": history, "recorded": recorded, "base": base}


def _plans(fed: dict) -> dict:
    import json

    return json.loads((fed["root"] / "nnUNet_preprocessed" / fed["full"] / f"{fed['plans']}.json").read_text())


def _uploads(jobs: dict, results: dict) -> list[Upload]:
    return [Upload(site, r.task, jobs[site].organs, r.weights, r.metrics["num_training_cases"])
            for site, r in results.items()]


def test_every_accepted_real_upload_reaches_the_next_round_whole(real_run):
    lines = [(h["round"], site, line) for h in real_run["history"] for site, line in h["sites"].items()]
    assert [(r, s) for r, s, line in lines if line["status"] != "accepted"] == []
    for round_index, site, line in lines:
        update = line["update"]
        assert update["update_lost"] <= 0.01, (round_index, site, update)
        assert update["contributions"] == (2 if round_index <= 2 else 1)
    # the generators alone would lose more than the rule allows: the exact residual is what keeps the work
    assert max(line["update"]["generator_lost"] for r, _, line in lines if r == 2) > 0.01
    # the site measured how far its predictions moved from the received weights; it reaches AMR's report
    assert all(0 < line["update"]["predictive_js"] < 0.5 for _, _, line in lines)
    # two sites of one task share one target: each keeps half of its own change (equal training cases)
    assert all(line["update"]["case_weight"] == pytest.approx(0.5) for r, _, line in lines if r <= 2)


def test_round_one_base_is_the_consensus_of_both_sites(real_run):
    jobs, results = real_run["recorded"][0]
    hyper = real_run["coordinator"].strategy.hyper
    mean = {k: (results["a"].weights[k].double() + results["b"].weights[k].double()) / 2
            for k in results["a"].weights}
    name = "encoder.stages.0.0.convs.0.conv.weight"
    torch.testing.assert_close(hyper.base[name].double(), mean[name], rtol=0, atol=1e-6)


def test_idle_task_is_compressed_once_and_its_loss_reported(real_run):
    history = real_run["history"]
    compressed = {h["round"]: h.get("strategy", {}).get("compressed", []) for h in history}
    assert [e["task"] for e in compressed[3]] == ["kidneys"]  # kidneys got no upload in round 3
    assert all(not compressed[r] for r in (1, 2, 4))
    assert 0 < compressed[3][0]["lost_of_delta"] < 1
    hyper = real_run["coordinator"].strategy.hyper
    assert "kidneys" not in hyper.residuals and "liver" in hyper.residuals  # memory: one active task held


def test_same_round_uploads_in_two_orders_give_bit_identical_states(real_run):
    forward = make_strategy("feddah", {}, real_run["base"], is_head)
    backward = copy.deepcopy(forward)
    for round_index, (jobs, results) in enumerate(real_run["recorded"], start=1):
        uploads = _uploads(jobs, results)
        for strategy in (forward, backward):
            for site, job in sorted(jobs.items()):
                strategy.weights_for(site, job.task, job.organs, round_index)
        forward.update(uploads, round_index)
        backward.update(list(reversed(uploads)), round_index)
        a, _ = forward.state()
        b, _ = backward.state()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), round_index


def test_update_lost_is_measured_on_the_change_not_the_weights(real_run):
    """The coordinator's whole-vector fidelity looks tiny whatever is lost; the update measure does not."""
    jobs, results = real_run["recorded"][1]
    sent, up = jobs["a"].weights, results["a"].weights
    assert change_lost(sent, up, sent) == pytest.approx(1.0)  # keeping the start loses the whole change
    assert change_lost(sent, up, up) == 0.0
