"""Faults and abuse (issue 16): failed rounds, the state lock, state integrity, hostile uploads.

Each test reproduces one finding of the fault probe on the engine-agnostic round loop (synthetic uploads,
real strategy and real state files) and fails on a coordinator that commits, restarts or trusts blindly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_coordinator import FINGERPRINT, assert_same, plan_dict, strategy_bytes, synthetic_executor, synthetic_site

from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.coordinator import Coordinator, RoundFailed, SiteResult
from nnunet_feddah.federation.lock import LOCK_FILE, StateBusyError, state_lock
from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.federation.upload_checks import UploadRejected, validate_upload
from nnunet_feddah.flower import messages
from nnunet_feddah.nnunet.network import hypernet_base, is_head
from nnunet_feddah.paths import bundled_plans_dir


@pytest.fixture(scope="module")
def base() -> dict:
    return hypernet_base(json.loads((bundled_plans_dir() / "template_cpu.json").read_text()))


def _open(state: Path, base: dict, strategy: str = "feddah", **limits) -> Coordinator:
    return Coordinator.open(parse_plan(plan_dict(strategy), "unit.json"), state, base, is_head, FINGERPRINT,
                            log=lambda *_: None, **limits)


def _failing(jobs, deadline):
    return {site: "RuntimeError: CUDA is not available" for site in jobs}


def _files(state: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


# --- 1. a round nobody completed is not a round -------------------------------------------------------
@pytest.mark.parametrize("strategy", ["feddah", "fedavg"])
def test_a_round_without_accepted_upload_is_retried_then_stops_and_stays_resumable(tmp_path, base, strategy):
    coordinator = _open(tmp_path / "state", base, strategy, round_attempts=2)
    calls = []
    with pytest.raises(RoundFailed, match="round 1: no upload was accepted.*a: site failed: RuntimeError: CUDA"):
        coordinator.run(lambda jobs, d: calls.append(1) or _failing(jobs, d))
    assert len(calls) == 2 and coordinator.last_round == 0  # tried twice, nothing committed
    assert checkpoint.read_committed(tmp_path / "state") is None
    resumed = _open(tmp_path / "state", base, strategy)  # the cause fixed: the same state resumes at round 1
    resumed.run(synthetic_executor)
    assert resumed.finished and [h["round"] for h in resumed.history] == [1, 2]


def test_a_round_with_one_accepted_upload_still_counts(tmp_path, base):
    coordinator = _open(tmp_path / "state", base)
    jobs = coordinator.jobs(1)
    summary = coordinator.apply(1, jobs, {"a": synthetic_site(jobs["a"]), "b": "RuntimeError: disk full"})
    assert summary.sites["b"]["status"] == "rejected" and coordinator.last_round == 1


def test_strategies_report_no_model_for_a_task_nobody_trained(tmp_path, base):
    """What evaluation asks before it reports a task: FedDAH allocates on sending, yet holds no trained model."""
    for name in ("feddah", "fedavg", "fedavg-per-task", "local"):
        coordinator = _open(tmp_path / name, base, name)
        jobs = coordinator.jobs(1)
        coordinator.apply(1, jobs, {"a": synthetic_site(jobs["a"]), "b": "RuntimeError: crashed"})
        assert set(coordinator.strategy.tasks(trained_only=True)) == {"kidneys"}, name


def test_coordinate_cli_fails_a_systematic_fault_with_exit_code_1(tmp_path, phantom_federation):
    """`--device cuda` on a CPU machine: every round fails -> non-zero exit, nothing committed, no 'finished'."""
    plan = {**plan_dict(), "sites": [{"name": "a", "dataset": phantom_federation["partial"], "stream": ["liver"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, "-m", "nnunet_feddah.coordinate", "--plan", str(tmp_path / "plan.json"),
                           "--state", str(tmp_path / "state"), "--in-process", "--device", "cuda",
                           "--round-attempts", "2"], capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no upload was accepted" in proc.stderr and "federation NOT finished" in proc.stdout
    assert "federation finished" not in proc.stdout.replace("NOT finished", "")
    assert checkpoint.read_committed(tmp_path / "state") is None
    assert proc.stderr.count("Traceback") == 0 or "site failed" in proc.stderr  # site tracebacks only


# --- 2. one coordinator per state folder ----------------------------------------------------------------
def test_a_second_coordinator_is_refused_with_the_holders_pid_and_start(tmp_path):
    with state_lock(tmp_path / "state", "in-process") as holder:
        with pytest.raises(StateBusyError, match=rf"pid {os.getpid()} \(in-process\).*started {holder.started[:10]}"):
            with state_lock(tmp_path / "state", "flower ServerApp"):
                pass
        with pytest.raises(StateBusyError):  # a wrong token is no key
            with state_lock(tmp_path / "state", "flower ServerApp", delegated_token="guess"):
                pass
        with state_lock(tmp_path / "state", "flower ServerApp", delegated_token=holder.token) as inner:
            assert inner == holder  # the ServerApp started by this launcher runs under its lock
    with state_lock(tmp_path / "state", "in-process"):  # released at the end of the block
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    state = tmp_path / "state"
    script = ("import os, sys; from nnunet_feddah.federation.lock import state_lock\n"
              "with state_lock(sys.argv[1], 'in-process'):\n    os._exit(0)\n")  # dies holding the lock
    subprocess.run([sys.executable, "-c", script, str(state)], check=True, timeout=60)
    dead_pid = json.loads((state / LOCK_FILE).read_text())["pid"]
    said: list[str] = []
    with state_lock(state, "in-process", log=said.append) as holder:
        assert holder.pid == os.getpid()
    assert said and f"pid {dead_pid}" in said[0] and "gone" in said[0]


def test_deleting_the_lock_file_does_not_free_the_state(tmp_path):
    with state_lock(tmp_path / "state", "in-process"):
        (tmp_path / "state" / LOCK_FILE).unlink()  # the lock is on the folder: the file only names the holder
        with pytest.raises(StateBusyError, match="unknown process.*coordinator.lock was removed"):
            with state_lock(tmp_path / "state", "flower ServerApp"):
                pass
    with state_lock(tmp_path / "state", "in-process"):
        pass


def test_a_delegated_serverapp_keeps_the_state_when_its_launcher_is_killed(tmp_path):
    """The --local launcher dies (SIGKILL) while the ServerApp it started still runs: nobody else gets in."""
    import signal
    import time

    state = tmp_path / "state"
    script = ("import sys, time; from nnunet_feddah.federation.lock import state_lock\n"
              "with state_lock(sys.argv[1], 'local'):\n    print('held', flush=True); time.sleep(120)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "held"
        token = json.loads((state / LOCK_FILE).read_text())["token"]
        said: list[str] = []
        with state_lock(state, "flower ServerApp", delegated_token=token, log=said.append):
            launcher.send_signal(signal.SIGKILL)
            launcher.wait(timeout=30)
            time.sleep(0.5)
            with pytest.raises(StateBusyError):
                with state_lock(state, "in-process"):
                    pass
            assert any("delegating coordinator is gone" in line for line in said)
    finally:
        launcher.kill()
    with state_lock(state, "in-process"):  # released when the ServerApp's block ends
        pass


def test_in_process_coordinate_refuses_a_state_another_process_holds(tmp_path, phantom_federation):
    plan = {**plan_dict(), "sites": [{"name": "a", "dataset": phantom_federation["partial"], "stream": ["liver"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with state_lock(tmp_path / "state", "local"):
        proc = subprocess.run([sys.executable, "-m", "nnunet_feddah.coordinate", "--plan", str(tmp_path / "plan.json"),
                               "--state", str(tmp_path / "state"), "--in-process"], capture_output=True, text=True,
                               timeout=300, env=os.environ)
    assert proc.returncode == 1 and f"pid {os.getpid()} (local)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "state" / checkpoint.RECORD).exists() and not (tmp_path / "state" / "sites").exists()


# --- 3. state integrity ---------------------------------------------------------------------------------
@pytest.fixture
def committed_state(tmp_path, base) -> Path:
    coordinator = _open(tmp_path / "state", base)
    coordinator.run(synthetic_executor)
    return tmp_path / "state"


def test_state_files_are_owner_only_and_hashed(committed_state):
    record = json.loads((committed_state / checkpoint.RECORD).read_text())
    assert record["strategy_sha256"] == checkpoint.file_sha256(committed_state / record["strategy_file"])
    assert set(record["snapshots"]) == {"1", "2"}
    assert (committed_state / checkpoint.PREVIOUS_RECORD).is_file()
    for path in [committed_state, committed_state / "steps", *committed_state.rglob("*.safetensors"),
                 committed_state / checkpoint.RECORD]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_a_damaged_old_snapshot_does_not_block_exporting_the_final_model(committed_state):
    from nnunet_feddah.results.export import load_state

    old = checkpoint.snapshot_path(committed_state, 1)
    data = bytearray(old.read_bytes())
    data[-5] ^= 0x01  # one bit of a tensor in the round-1 snapshot
    old.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"strategy-r0*1.*does not match the sha256"):
        checkpoint.require_committed(committed_state)  # evaluation reads every snapshot: refused
    strategy, committed = load_state(committed_state, FINGERPRINT)  # export reads only the final strategy
    assert committed.round == 2 and strategy.tasks()


def test_a_deleted_record_is_refused_not_restarted(committed_state, base):
    (committed_state / checkpoint.RECORD).unlink()
    before = _files(committed_state)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint.json is missing.*refusing to start.*cp "):
        _open(committed_state, base)
    assert _files(committed_state) == before  # nothing deleted, nothing written


@pytest.mark.parametrize("damage", ["truncated_record", "random_strategy", "truncated_strategy", "bad_snapshot"])
def test_damaged_state_is_refused_with_the_way_back(committed_state, base, damage):
    record = json.loads((committed_state / checkpoint.RECORD).read_text())
    strategy_file = committed_state / record["strategy_file"]
    if damage == "truncated_record":
        path = committed_state / checkpoint.RECORD
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "random_strategy":  # same size, random values: it would load and export
        data = strategy_file.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        strategy_file.write_bytes(data[:header] + os.urandom(len(data) - header))
    elif damage == "truncated_strategy":
        strategy_file.write_bytes(strategy_file.read_bytes()[:1000])
    else:
        (committed_state / "steps" / "strategy-r0001.safetensors").write_bytes(b"junk")
    before = _files(committed_state)
    with pytest.raises(checkpoint.CheckpointError, match=r"Fix: go back one round with `cp .*checkpoint.previous"):
        _open(committed_state, base)
    assert _files(committed_state) == before


def test_the_kept_previous_record_resumes_one_round_back(committed_state, base):
    (committed_state / checkpoint.PREVIOUS_RECORD).replace(committed_state / checkpoint.RECORD)
    resumed = _open(committed_state, base)
    assert resumed.last_round == 1
    resumed.run(synthetic_executor)
    assert resumed.finished


def test_coordinate_reports_a_damaged_state_once(committed_state, tmp_path, phantom_federation):
    plan = {**plan_dict(), "sites": [{"name": "a", "dataset": phantom_federation["partial"], "stream": ["liver"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (committed_state / checkpoint.RECORD).write_text("{ truncated")
    proc = subprocess.run([sys.executable, "-m", "nnunet_feddah.coordinate", "--plan", str(tmp_path / "plan.json"),
                           "--state", str(committed_state), "--in-process"], capture_output=True, text=True,
                          timeout=300, env=os.environ)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.count("is not valid JSON") == 1


# --- 4. hostile uploads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cases_huge", "cases_string", "cases_zero", "cases_bool", "cases_missing",
                                  "metrics_list", "mean_dice_string", "dice_list", "iterations_float", "seconds_nan",
                                  "js_nan", "js_inf", "all_zero", "times_1_99", "unrelated", "dtype", "not_tensors",
                                  "dice_foreign_organ", "dice_100k_keys", "metrics_huge", "metrics_deep",
                                  "metrics_not_json", "norm_bias_shifted"])
def test_hostile_uploads_are_rejected(base, kind):
    coordinator = _open(Path("/nonexistent-unused"), base)
    job = coordinator.jobs(1)["a"]
    good = synthetic_site(job)
    validate_upload(job, good, coordinator.max_relative_change, max_training_cases=4)  # the reference passes
    bad = SiteResult(good.site, good.round, good.task, dict(good.weights), dict(good.metrics), good.seconds)
    edits = {"cases_huge": ("num_training_cases", 10 ** 9), "cases_string": ("num_training_cases", "4"),
             "cases_zero": ("num_training_cases", 0), "cases_bool": ("num_training_cases", True),
             "mean_dice_string": ("mean_dice", "0.9"), "dice_list": ("dice", [0.5]),
             "iterations_float": ("iterations", 2.5)}
    if kind in edits:
        bad.metrics[edits[kind][0]] = edits[kind][1]
    elif kind == "cases_missing":
        bad.metrics.pop("num_training_cases")
    elif kind == "metrics_list":
        bad.metrics = [1, 2]
    elif kind == "dice_foreign_organ":
        bad.metrics["dice"] = {"x": float("nan")}
    elif kind == "dice_100k_keys":  # grew checkpoint.json to 5.4 MB before (issue 37)
        bad.metrics["dice"] = {f"o{i}": 0.5 for i in range(100_000)}
    elif kind == "metrics_huge":
        bad.metrics["train_loss_per_epoch"] = [0.5] * 300_000
    elif kind == "metrics_deep":
        nested: dict = {}
        for _ in range(50):
            nested = {"x": nested}
        bad.metrics["notes"] = nested
    elif kind == "metrics_not_json":
        bad.metrics["notes"] = {1, 2}
    elif kind == "norm_bias_shifted":  # one tensor far off its scale, too small for the global bounds to see
        name = min((k for k in bad.weights if k.endswith("norm.bias")), key=lambda k: bad.weights[k].numel())
        bad.weights[name] = job.weights[name] + 2.0
    elif kind == "seconds_nan":
        bad.seconds = float("nan")
    elif kind in ("js_nan", "js_inf"):  # it steers W_s: a NaN once crashed the generators' SVD (issue 37)
        bad.metrics["predictive_js"] = {"all": float(kind[3:]), "foreground": 0.1}
    elif kind == "all_zero":
        bad.weights = {k: torch.zeros_like(v) for k, v in good.weights.items()}
    elif kind == "times_1_99":
        bad.weights = {k: v * 1.99 for k, v in job.weights.items()}
    elif kind == "unrelated":  # another network of the same norms (relative change ~1.41): only the change bound sees it
        draw = torch.Generator().manual_seed(0)
        bad.weights = {k: (r := torch.randn(v.shape, generator=draw, dtype=v.dtype)) * (v.norm() / r.norm().clamp_min(1e-12))
                       for k, v in job.weights.items()}
    elif kind == "dtype":
        name = next(iter(bad.weights))
        bad.weights[name] = bad.weights[name].double()
    else:
        bad.weights = {k: v.numpy() for k, v in good.weights.items()}
    expected = {"unrelated": "relative change 1.4", "times_1_99": "norm is 1.990",
                "js_nan": "'predictive_js.all' is nan", "js_inf": "'predictive_js.all' is inf",
                "dice_foreign_organ": "organ.*outside the task", "dice_100k_keys": "bytes as JSON|outside the task",
                "metrics_huge": "bytes as JSON", "norm_bias_shifted": r"norm.bias moved by 20.0x its own scale", "metrics_deep": "nested deeper", "metrics_not_json": "not plain JSON",
                }.get(kind)
    with pytest.raises(UploadRejected, match=expected):
        validate_upload(job, bad, coordinator.max_relative_change, max_training_cases=4)


def test_an_inflated_case_count_cannot_take_over_fedavg(tmp_path, base):
    coordinator = _open(tmp_path / "state", base, "fedavg", training_cases={"a": 5, "b": 5})
    jobs = coordinator.jobs(1)
    results = synthetic_executor(jobs, 0)
    results["b"].metrics["num_training_cases"] = 10 ** 9
    summary = coordinator.apply(1, jobs, results)
    assert summary.sites["b"]["status"] == "rejected" and "holds only 5 training cases for b" in summary.sites["b"]["reason"]
    after = strategy_bytes(coordinator)
    trunk = next(k for k in after if k.startswith("global/encoder") and after[k].numel() > 1)
    assert torch.equal(after[trunk], results["a"].weights[trunk.removeprefix("global/")])  # a's upload, alone


def test_without_a_recorded_count_a_site_registers_its_first_claim_and_cannot_inflate_it_later(tmp_path, base):
    """A deployment with --plans-file has no fingerprint round and no site data on the coordinator's host."""
    said: list[str] = []
    coordinator = _open(tmp_path / "state", base, "fedavg")
    coordinator.log = said.append
    jobs = coordinator.jobs(1)
    coordinator.apply(1, jobs, synthetic_executor(jobs, 0))  # both claim 4: registered
    assert coordinator.training_cases == {"a": 4, "b": 4} and any("b: registered 4 training cases" in x for x in said)
    resumed = _open(tmp_path / "state", base, "fedavg")  # the registration is part of the committed state
    assert resumed.training_cases == {"a": 4, "b": 4}
    jobs = resumed.jobs(2)
    results = synthetic_executor(jobs, 0)
    results["b"].metrics["num_training_cases"] = 10 ** 9
    summary = resumed.apply(2, jobs, results)
    assert summary.sites["b"]["status"] == "rejected"
    assert "'num_training_cases' is 1000000000" in summary.sites["b"]["reason"] and "only 4 training cases for b" in \
        summary.sites["b"]["reason"] and "--training-cases" in summary.sites["b"]["reason"]
    # the operator's count (or a fingerprint round's) replaces the registration
    assert _open(tmp_path / "state", base, "fedavg", training_cases={"b": 9}).training_cases == {"a": 4, "b": 9}
    from nnunet_feddah.federation.plan import FederationPlanError
    from nnunet_feddah.federation.start import parse_case_counts

    plan = parse_plan(plan_dict("fedavg"), "unit.json")
    assert parse_case_counts("a=40, b=25", plan) == {"a": 40, "b": 25} and parse_case_counts("", plan) == {}
    for wrong in ("c=4", "a=0", "a=x", "a"):
        with pytest.raises(FederationPlanError, match="--training-cases"):
            parse_case_counts(wrong, plan)


def test_an_unmeasured_dice_is_recorded_as_null_and_the_state_stays_strict_json(tmp_path, base):
    coordinator = _open(tmp_path / "state", base)
    jobs = coordinator.jobs(1)
    results = synthetic_executor(jobs, 0)
    for result in results.values():  # an honest site whose validation cases lack the organ: NaN = "not measured"
        result.metrics.update(mean_dice=float("nan"), dice={k: float("nan") for k in result.metrics["dice"]})
    coordinator.apply(1, jobs, results)

    def refuse(constant: str) -> None:
        raise AssertionError(f"checkpoint.json holds {constant}, which JSON does not allow")

    record = json.loads((tmp_path / "state" / "checkpoint.json").read_text(), parse_constant=refuse)
    line = record["history"][0]["sites"]["a"]
    assert line["status"] == "accepted" and line["mean_dice"] is None and set(line["dice"].values()) == {None}


@pytest.mark.parametrize("layout", ["not_json", "wrong_shape", "unknown_dtype", "duplicate", "too_few", "too_many"])
def test_malformed_weight_layouts_raise_one_error_type(layout):
    record = messages.tensors_to_record({"w": torch.randn(3, 4), "b": torch.randn(5)})
    entries = [["w", "float32", [3, 4]], ["b", "float32", [5]]]
    changed = {"wrong_shape": [["w", "float32", [3, 5]], ["b", "float32", [5]]],
               "unknown_dtype": [["w", "float64", [3, 4]], ["b", "float32", [5]]],
               "duplicate": [["w", "float32", [3, 4]], ["w", "float32", [5]]],
               "too_few": entries[:1], "too_many": [*entries, ["c", "float32", [1]]]}
    raw = b"\xff{" if layout == "not_json" else json.dumps(changed[layout]).encode()
    import numpy as np
    from flwr.app import Array

    record[messages.LAYOUT] = Array(ndarray=np.frombuffer(raw, dtype=np.uint8).copy())
    with pytest.raises(messages.MalformedMessageError):
        messages.record_to_tensors(record)
    assert_same(messages.record_to_tensors(messages.tensors_to_record({"x": torch.ones(2)})), {"x": torch.ones(2)})
