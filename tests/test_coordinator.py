"""The engine-agnostic round loop: upload validation, commit/resume after crashes, and a real in-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.coordinator import Coordinator, RoundFailed, SiteJob, SiteResult
from nnunet_feddah.federation.plan import FederationPlanError
from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.nnunet.network import hypernet_base, is_head
from nnunet_feddah.organs import BY_LABEL
from nnunet_feddah.paths import bundled_plans_dir

FINGERPRINT = "sha256:unit"


def plan_dict(strategy: str = "feddah") -> dict:
    return {
        "name": "unit", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": 1,
        "sites": [{"name": "a", "dataset": 701, "stream": ["kidneys", "spleen"]},
                  {"name": "b", "dataset": 702, "stream": ["liver", "kidneys"]}],
        "local": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "max_validation_cases": 1},
        "strategy": {"name": strategy, "params": {"beta": 1.0} if strategy == "feddah" else {}},
    }


@pytest.fixture(scope="module")
def base() -> dict:
    return hypernet_base(json.loads((bundled_plans_dir() / "template_cpu.json").read_text()))


def open_coordinator(state: Path, base: dict, strategy: str = "feddah", log=lambda *_: None) -> Coordinator:
    return Coordinator.open(parse_plan(plan_dict(strategy), "unit.json"), state, base, is_head, FINGERPRINT, log=log)


def synthetic_site(job: SiteJob, scale: float = 0.02) -> SiteResult:
    """A deterministic 'trained' upload: the sent weights plus a seeded change, with sane metrics."""
    g = torch.Generator().manual_seed(hash((job.site, job.round)) % 2 ** 31)
    weights = {k: v + scale * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
               for k, v in job.weights.items()}
    metrics = {"task": job.task, "train_loss": -0.5, "iterations": 2,
               "dice": {BY_LABEL[job.organs[0]].key: 0.5}, "mean_dice": 0.5,
               "num_training_cases": 4}
    return SiteResult(job.site, job.round, job.task, weights, metrics, 0.1)


def synthetic_executor(jobs, deadline):
    return {site: synthetic_site(job) for site, job in jobs.items()}


def strategy_bytes(coordinator: Coordinator) -> dict[str, torch.Tensor]:
    tensors, _ = coordinator.strategy.state()
    return {k: v.clone() for k, v in tensors.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rounds_follow_asynchronous_streams_and_commit(tmp_path, base):
    coordinator = open_coordinator(tmp_path / "state", base)
    history = coordinator.run(synthetic_executor)
    assert [h["round"] for h in history] == [1, 2]
    assert {s: v["task"] for s, v in history[0]["sites"].items()} == {"a": "kidneys", "b": "liver"}
    assert {s: v["task"] for s, v in history[1]["sites"].items()} == {"a": "spleen", "b": "kidneys"}
    assert all(v["status"] == "accepted" for h in history for v in h["sites"].values())
    record = checkpoint.read_committed(tmp_path / "state").record
    assert record["round"] == 2 and record["site_steps"] == {"a": 1, "b": 1}
    assert sorted(coordinator.strategy.hyper.tasks) == ["kidneys", "liver", "spleen"]
    # the committed strategy file and the one the kept previous record names (issue 16: the way back)
    assert sorted(p.name for p in (tmp_path / "state").glob("strategy-r*.safetensors")) == [
        "strategy-r0001.safetensors", "strategy-r0002.safetensors"]
    # every round closes a time step here (one round per step): each keeps its snapshot for the evaluation
    assert sorted(p.name for p in (tmp_path / "state" / "steps").iterdir()) == [
        "strategy-r0001.safetensors", "strategy-r0002.safetensors"]
    assert checkpoint.snapshot_path(tmp_path / "state", 2).read_bytes() == checkpoint.read_committed(
        tmp_path / "state").strategy_file.read_bytes()


@pytest.mark.parametrize("kind", ["wrong_task", "missing_tensor", "extra_tensor", "wrong_shape", "nan", "inf",
                                  "too_large_change", "bad_loss", "bad_dice", "site_error"])
def test_bad_uploads_are_rejected_and_leave_state_identical(tmp_path, base, kind):
    coordinator = open_coordinator(tmp_path / "state", base)
    coordinator.apply(1, (jobs := coordinator.jobs(1)), synthetic_executor(jobs, 0))
    jobs = coordinator.jobs(2)  # round 2 allocates spleen before uploads arrive, as in a real round
    before = strategy_bytes(coordinator)
    good = synthetic_site(jobs["a"])
    name = next(iter(good.weights))
    bad = SiteResult(good.site, good.round, good.task, dict(good.weights), dict(good.metrics))
    if kind == "wrong_task":
        bad.task = "liver"
    elif kind == "missing_tensor":
        bad.weights.pop(name)
    elif kind == "extra_tensor":
        bad.weights["extra.weight"] = torch.zeros(1)
    elif kind == "wrong_shape":
        bad.weights[name] = bad.weights[name][:1]
    elif kind in ("nan", "inf"):
        bad.weights[name] = torch.full_like(bad.weights[name], float(kind))
    elif kind == "too_large_change":
        bad.weights = {k: v * 10 for k, v in bad.weights.items()}
    elif kind == "bad_loss":
        bad.metrics["train_loss"] = float("nan")
    elif kind == "bad_dice":
        bad.metrics["dice"] = {"spleen": 3.0}
    else:
        bad = "RuntimeError: trainer crashed"
    with pytest.raises(RoundFailed) as failed:  # the only upload of the round: nothing is committed (issue 16)
        coordinator.apply(2, {"a": jobs["a"]}, {"a": bad})
    summary = failed.value.summary
    assert summary.sites["a"]["status"] == "rejected" and summary.sites["a"]["reason"]
    assert_same(strategy_bytes(coordinator), before)
    assert coordinator.last_round == 1 and checkpoint.read_committed(tmp_path / "state").round == 1


def _crash():
    raise KeyboardInterrupt("injected crash")


@pytest.mark.parametrize("hook", ["before_commit", "mid_commit"])
def test_resume_after_crash_repeats_nothing_and_loses_nothing(tmp_path, base, hook):
    reference = open_coordinator(tmp_path / "reference", base)
    reference.run(synthetic_executor)

    crashing = open_coordinator(tmp_path / "state", base)
    crashing.apply(1, (jobs := crashing.jobs(1)), synthetic_executor(jobs, 0))
    committed = strategy_bytes(crashing)
    setattr(crashing, hook, _crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.apply(2, (jobs := crashing.jobs(2)), synthetic_executor(jobs, 0))

    resumed = open_coordinator(tmp_path / "state", base)
    assert resumed.next_round == 2 and len(resumed.history) == 1
    assert_same(strategy_bytes(resumed), committed)  # identical to the last checkpoint
    resumed.run(synthetic_executor)
    assert_same(strategy_bytes(resumed), strategy_bytes(reference))  # as if it had never crashed
    assert [h["round"] for h in resumed.history] == [1, 2]


def test_resume_refuses_another_plan_naming_the_field_but_lets_operational_fields_change(tmp_path, base):
    open_coordinator(tmp_path / "state", base).run(synthetic_executor)
    with pytest.raises(FederationPlanError, match=r"(?s)plan_hash.*strategy.name: \"feddah\" -> \"fedavg\".*Fix"):
        open_coordinator(tmp_path / "state", base, strategy="fedavg")
    changed = {**plan_dict(), "sites": [{**s, "stream": ["kidneys", "liver"]} if s["name"] == "a" else s
                                        for s in plan_dict()["sites"]]}
    with pytest.raises(FederationPlanError, match=r'sites\[0\].stream\[1\]: "spleen" -> "liver"'):
        Coordinator.open(parse_plan(changed, "unit.json"), tmp_path / "state", base, is_head, FINGERPRINT)
    # a longer deadline and data moved to another nnU-Net folder: the same federation, resumed
    moved = {**plan_dict(), "round_deadline_s": 7200, "nnunet_root": str(tmp_path / "elsewhere")}
    resumed = Coordinator.open(parse_plan(moved, "unit.json"), tmp_path / "state", base, is_head, FINGERPRINT)
    assert resumed.finished


@pytest.mark.parametrize("strategy", ["fedavg", "fedavg-per-task", "local", "feddah-noLR", "feddah-noWs",
                                      "feddah-noencoder"])
def test_baseline_strategies_run_and_resume(tmp_path, base, strategy):
    coordinator = open_coordinator(tmp_path / "state", base, strategy)
    coordinator.run(synthetic_executor)
    resumed = open_coordinator(tmp_path / "state", base, strategy)
    assert resumed.finished
    for task in ("kidneys", "liver", "spleen"):
        assert_same(resumed.strategy.task_weights(task), coordinator.strategy.task_weights(task))


def test_real_sites_in_process(phantom_federation, tmp_path, base):
    """Two real nnU-Net sites, three tasks on asynchronous streams, FedDAH end to end (one process)."""
    from nnunet_feddah.federation.site_round import InProcessExecutor

    plan = parse_plan(plan_dict(), str(tmp_path / "unit.json"))
    lines: list[str] = []
    coordinator = Coordinator.open(plan, tmp_path / "state", base, is_head, FINGERPRINT, log=lines.append)
    history = coordinator.run(InProcessExecutor(plan, tmp_path / "sites"))
    statuses = {(h["round"], s): v["status"] for h in history for s, v in h["sites"].items()}
    assert set(statuses.values()) == {"accepted"}, history
    assert (tmp_path / "sites" / "b" / "round_0002_kidneys" / "metrics.json").is_file()
    assert any(line.startswith("round 2/2 done") for line in lines)
    hyper = coordinator.strategy.hyper
    # every upload is represented: generated weights after the round equal what the site uploaded
    for h in history:
        for site, line in h["sites"].items():
            assert line["update"]["upload_rel_l2"] < 1e-3, (h["round"], site, line["update"])
            assert max(line["update"]["drift"].values(), default=0.0) < 1e-5  # L_R holds the other tasks
    assert sorted(hyper.tasks) == ["kidneys", "liver", "spleen"]


def test_ablation_names_force_their_switch(base):
    from nnunet_feddah.method.registry import make_strategy

    assert make_strategy("feddah-noLR", {"rank": 8}, base, is_head).amr.config.beta == 0.0
    assert make_strategy("feddah-noWs", {}, base, is_head).amr.config.similarity == "fixed"
    no_encoder = make_strategy("feddah-noencoder", {}, base, is_head).hyper
    assert not no_encoder.config.layer_encoder and torch.count_nonzero(no_encoder.params["encoder::F"]) == 0
    assert make_strategy("feddah-composed", {}, base, is_head).amr.config.new_task_start == "composed"
    composed_without = make_strategy("feddah-composed-noencoder", {}, base, is_head)
    assert composed_without.amr.config.new_task_start == "composed" and not composed_without.hyper.config.layer_encoder
    assert make_strategy("feddah-noLR", {"rank": 8}, base, is_head).hyper.config.rank == 8
    # FedDAH itself is the store (no generators); the variants that are about the generators switch them on
    assert not make_strategy("feddah", {"rank": 8}, base, is_head).hyper.config.generators
    for name in ("feddah-hypernet", "feddah-noLR", "feddah-noencoder", "feddah-composed", "feddah-idleLowrank"):
        assert make_strategy(name, {}, base, is_head).hyper.config.generators, name
    assert make_strategy("feddah-idleLowrank", {}, base, is_head).amr.config.idle_bits == 0
