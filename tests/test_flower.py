"""Flower adapters: wire format, the executor's round logic against a fake Grid, the app directory, the CLIs,
and (slow) a real loopback federation that loses a site mid-round and its launcher, then resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array

from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.jobs import SiteJob, SiteResult
from nnunet_feddah.flower import app_dir, messages
from nnunet_feddah.flower.executor import FlowerExecutor
from nnunet_feddah.flower.launch import procs
from nnunet_feddah.flower.launch.flwr_cli import config_arg, flower_env
from nnunet_feddah.flower.launch.pki import make_site_key
from nnunet_feddah.flower.launch.supernode import supernode_command


# --- wire format ----------------------------------------------------------------------------------------
def _job(site: str = "a", round_index: int = 1) -> SiteJob:
    weights = {"enc.w": torch.randn(4, 3), "enc.b": torch.randn(4), "decoder.seg_layers.0.w": torch.randn(2, 4, 1)}
    return SiteJob(site, round_index, "kidneys", [2, 3], 0, {"epochs": 1, "seed": 7}, weights)


def _result(job: SiteJob) -> SiteResult:
    metrics = {"train_loss": 0.5, "iterations": 2, "dice": {"spleen": 0.25}, "wall_time_s": {"train": 1.0}}
    return SiteResult(job.site, job.round, job.task, {k: v + 0.01 for k, v in job.weights.items()}, metrics, 3.5)


def test_weights_are_packed_and_restored_exactly():
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(5), "steps": torch.arange(4), "x": torch.randn(2, 2, 2),
               "empty": torch.zeros(0)}
    record = messages.tensors_to_record(tensors)
    assert len(record) == 3  # one array per dtype + the layout: few objects to transfer
    restored = messages.record_to_tensors(record)
    assert list(restored) == list(tensors)
    for k, v in tensors.items():
        assert restored[k].dtype == v.dtype and torch.equal(restored[k], v), k


def test_job_result_and_error_round_trip():
    job = _job()
    back, defaults = messages.job_from_content(messages.job_content(job, {"plan": "/p.json", "work-dir": "/w",
                                                                          "device": "cpu"}))
    assert (back.site, back.round, back.task, back.organs, back.step, back.settings) == (
        job.site, job.round, job.task, job.organs, job.step, job.settings)
    assert defaults == {"plan": "/p.json", "work-dir": "/w", "device": "cpu"}
    result = _result(job)
    content = messages.result_content(result, {"handler_start": 1.0, "handler_end": 2.0})
    back_result = messages.result_from_content(content)
    assert back_result.metrics == result.metrics and back_result.seconds == result.seconds
    assert all(torch.equal(back_result.weights[k], v) for k, v in result.weights.items())
    assert messages.timing_from_content(content) == {"handler_start": 1.0, "handler_end": 2.0}
    assert messages.result_from_content(messages.error_content("ValueError: no data", {})) == \
        "site error: ValueError: no data"


# --- the executor against a fake Grid -------------------------------------------------------------------
def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


class FakeGrid:
    """Online nodes + scripted ClientApps: ``behave[site](message) -> reply content | 'error' | None``."""

    def __init__(self, nodes: dict[int, str], unnamed: tuple[int, ...] = ()):
        self.nodes = {n: SimpleNamespace(node_id=n, name="" if n in unnamed else name,
                                         last_activated_at=_iso(time.time() - 100)) for n, name in nodes.items()}
        self.site_of = dict(nodes)
        self.behave: dict[str, object] = {}
        self.pushed: list[tuple[str, object]] = []
        self.ready: dict[str, object] = {}
        self.on_poll = lambda grid: None

    def get_nodes(self):
        self.on_poll(self)
        return list(self.nodes.values())

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            mid = f"m{len(self.pushed)}"
            self.pushed.append((mid, m))
            ids.append(mid)
            site = self.site_of[m.metadata.dst_node_id]
            answer = self.behave.get(site, "train")
            if answer == "train":
                job, _ = messages.job_from_content(m.content)
                self._reply(mid, messages.result_content(_result(job), {"handler_start": 1.0, "handler_end": 2.0}))
            elif answer == "fingerprint":  # a site answering a fingerprint-round stage with what it was asked
                stage, request, _ = messages.ask_from_content(m.content)
                self._reply(mid, messages.answer_content({"stage": stage, "request": request}, {}))
            elif answer == "error":
                self._reply(mid, None, error=SimpleNamespace(code=5, reason="Node Unavailable"))
            elif answer == "malformed":  # a reply whose layout promises more values than it carries
                job, _ = messages.job_from_content(m.content)
                content = messages.result_content(_result(job), {})
                layout = json.loads(content[messages.WEIGHTS][messages.LAYOUT].numpy().tobytes())
                layout[0][2] = [10 ** 6]
                content[messages.WEIGHTS][messages.LAYOUT] = Array(
                    ndarray=np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy())
                self._reply(mid, content)
        return ids

    def _reply(self, mid: str, content, error=None) -> None:
        self.ready[mid] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), content=content,
                                          error=error, has_error=lambda: error is not None)

    def pull_messages(self, ids):
        return [self.ready.pop(i) for i in list(ids) if i in self.ready]


@pytest.fixture
def task_identity():
    """Flower's Message() needs the run id a ServerApp process would have."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = None, None, None


def _run(grid: FakeGrid, sites=("a", "b"), deadline: float = 5.0):
    lines: list[str] = []
    executor = FlowerExecutor(grid, ("a", "b"), {"plan": "/p.json"}, lines.append, poll_s=0.01)
    jobs = {s: _job(s) for s in sites}
    return executor(jobs, deadline), lines


def test_executor_collects_every_reply(task_identity):
    results, lines = _run(FakeGrid({11: "a", 12: "b"}))
    assert all(isinstance(results[s], SiteResult) for s in "ab")
    assert any("ClientApp start" in line for line in lines)  # per-site timing line


def test_executor_site_offline_is_missed_without_waiting(task_identity):
    started = time.time()
    results, _ = _run(FakeGrid({11: "a"}), deadline=30)
    assert isinstance(results["a"], SiteResult)
    assert "no SuperNode" in results["b"] and time.time() - started < 5


def test_executor_error_reply_and_unnamed_node(task_identity):
    """A site is only ever the node registered under its name (issue 16: an unnamed node claimed any site)."""
    grid = FakeGrid({11: "a", 12: "b", 13: "b"}, unnamed=(11, 13))  # 13 would claim b on its own word
    grid.behave["b"] = "error"
    results, lines = _run(grid)
    assert "no SuperNode registered as this site" in results["a"]
    assert results["b"].startswith("Flower error 5")
    assert [m.metadata.dst_node_id for _, m in grid.pushed] == [12]  # the unnamed nodes got nothing
    assert sum("node 11 is registered without a name" in line for line in lines) == 1


def test_executor_counts_a_malformed_reply_as_a_missed_round(task_identity):
    """Issue 16: a malformed weight layout raised an exception the executor did not catch (round crashed)."""
    grid = FakeGrid({11: "a", 12: "b"})
    grid.behave["b"] = "malformed"
    results, _ = _run(grid)
    assert isinstance(results["a"], SiteResult)
    assert results["b"].startswith("malformed reply: MalformedMessageError")


def test_executor_node_lost_or_restarted_mid_round(task_identity):
    grid = FakeGrid({11: "a", 12: "b"})
    grid.behave["a"] = grid.behave["b"] = None  # both take the job and never answer

    def lose(g):
        if g.pushed:
            g.nodes.pop(11, None)  # a's SuperNode goes offline
            g.nodes[12].last_activated_at = _iso(time.time() + 1)  # b's SuperNode restarted

    grid.on_poll = lose
    results, _ = _run(grid, deadline=30)
    assert "went offline" in results["a"] and "restarted" in results["b"]


def test_executor_late_join_and_deadline(task_identity):
    grid = FakeGrid({11: "a"})
    grid.behave["a"] = None  # a never answers, so the round runs into its deadline

    def join(g):
        if g.pushed and 12 not in g.nodes:
            g.nodes[12] = SimpleNamespace(node_id=12, name="b", last_activated_at=_iso(time.time()))

    grid.on_poll = join
    grid.site_of[12] = "b"
    import nnunet_feddah.flower.executor as executor_module

    saved, executor_module.MIN_REMAINING_S = executor_module.MIN_REMAINING_S, 0.0
    try:
        results, lines = _run(grid, deadline=1.0)
    finally:
        executor_module.MIN_REMAINING_S = saved
    assert "deadline" in results["a"] and isinstance(results["b"], SiteResult)
    assert any("late join: b=node 12" in line for line in lines)


# --- app directory and command lines --------------------------------------------------------------------
def test_executor_ask_waits_for_every_site_and_names_the_one_that_never_came(task_identity):
    """The fingerprint round's transport: a late site is asked once it is online; one never online is named."""
    grid = FakeGrid({1: "a", 2: "b"})
    grid.behave.update({"a": "fingerprint", "b": "fingerprint"})
    late = grid.nodes.pop(2)
    polls = []
    grid.on_poll = lambda g: polls.append(1) if len(polls) < 3 else g.nodes.setdefault(2, late)
    lines: list[str] = []
    executor = FlowerExecutor(grid, ("a", "b"), {"plan": "/p.json"}, lines.append, poll_s=0.01)
    replies = executor.ask("statistics", {"a": {"min_count": 5}, "b": {}}, 5.0)
    assert replies == {"a": {"stage": "statistics", "request": {"min_count": 5}},
                       "b": {"stage": "statistics", "request": {}}}
    assert [m.metadata.message_type for _, m in grid.pushed] == [messages.FINGERPRINT_ROUND] * 2
    assert sum("fingerprint round (statistics): asking" in line for line in lines) == 2  # a first, b when it came

    alone = FakeGrid({1: "a"})
    alone.behave["a"] = "error"
    replies = FlowerExecutor(alone, ("a", "b"), {}, lines.append, poll_s=0.01).ask("install", {"a": {}, "b": {}}, 0.2)
    assert replies["a"].startswith("Flower error 5") and "never online" in replies["b"]


def test_app_directory_components_resolve_from_the_package():
    from flwr.supercore.object_ref import validate

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    config = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    components = config["tool"]["flwr"]["app"]["components"]
    for ref in components.values():
        assert validate(ref, check_module=True, project_dir=app_dir()) == (True, None), ref
    assert {"plan", "state-dir", "work-dir", "device", "max-relative-change", "plans-file"} <= set(
        config["tool"]["flwr"]["app"]["config"])
    assert config["project"]["name"] and config["project"]["version"] and config["tool"]["flwr"]["app"]["publisher"]


def test_config_arg_is_parsed_by_flower_and_refuses_quotes():
    from flwr.common.config import parse_config_args

    values = {"site-name": "a", "plan": "/x y/plan.json", "max-relative-change": 0.5, "flag": True, "n": 3}
    assert parse_config_args([config_arg(values)]) == values
    with pytest.raises(ValueError, match="quotes"):
        config_arg({"plan": "/it's/plan.json"})


def test_coordinate_reports_a_bad_plan(tmp_path, capsys):
    from nnunet_feddah.coordinate import main

    (tmp_path / "plan.json").write_text(json.dumps({"name": "x", "sites": []}))
    assert main(["--plan", str(tmp_path / "plan.json"), "--state", str(tmp_path / "s"), "--local"]) == 2
    assert "plans_identifier" in capsys.readouterr().err


def test_site_cli_refuses_missing_key(tmp_path, capsys):
    from nnunet_feddah.site import main

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_dict(tmp_path, rounds_per_step=1)))
    (tmp_path / "ca.crt").write_text("x")
    code = main(["--plan", str(plan), "--site", "a", "--superlink", "127.0.0.1:1", "--root-certificates",
                 str(tmp_path / "ca.crt"), "--auth-key", str(tmp_path / "missing"), "--no-check"])
    assert code == 2 and "--auth-key" in capsys.readouterr().out


# --- real processes -------------------------------------------------------------------------------------
def _plan_dict(root: Path, rounds_per_step: int = 2, steps: int = 2) -> dict:
    return {
        "name": "flower-test", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": rounds_per_step,
        "nnunet_root": str(root), "round_deadline_s": 600,
        "sites": [{"name": "a", "dataset": 701, "stream": ["kidneys", "spleen"][:steps]},
                  {"name": "b", "dataset": 702, "stream": ["liver", "kidneys"][:steps]}],
        "local": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "max_validation_cases": 1},
        "strategy": {"name": "feddah", "params": {"beta": 1.0}},
    }


def _wait(predicate, timeout: float, what: str, step: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _launch_info(state: Path) -> dict:
    try:
        return json.loads((state / "launcher.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _committed(state: Path) -> int:
    try:
        record = checkpoint.read_committed(state)
    except (checkpoint.CheckpointError, json.JSONDecodeError, KeyError):
        return 0
    return 0 if record is None else record.round


@pytest.mark.slow
def test_local_federation_survives_killed_site_and_killed_launcher(phantom_federation, tmp_path):
    """4 rounds over real Flower: b's SuperNode is SIGKILLed while training round 1 (the round completes
    without it; it comes back with the same node id and is accepted later); an unregistered key is refused;
    the launcher is SIGKILLed after round 2; a second launcher resumes and runs rounds 3–4 exactly once."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_dict(phantom_federation["root"])))
    state, work = tmp_path / "state", tmp_path / "work"
    cmd = [sys.executable, "-m", "nnunet_feddah.coordinate", "--plan", str(plan), "--state", str(state),
           "--work", str(work), "--local"]
    with open(tmp_path / "launcher1.log", "w") as out:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = _wait(lambda: (i := _launch_info(state)).get("run_id") and i, 120, "the first run to start")
        key = make_site_key(tmp_path / "rogue" / "rogue", "rogue")  # never registered
        rogue = procs.spawn(supernode_command(info["superlink"], Path(info["root_certificates"]), key,
                                              {"site-name": "rogue"}, procs.free_port(), max_retries=1),
                            flower_env(tmp_path / "rogue_home"), tmp_path / "rogue.log")
        try:
            assert rogue.wait(120) != 0  # its own children may linger: end the group below
        finally:
            procs.end_process(rogue, grace_s=2)
        assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()

        _wait(lambda: list(work.glob("b/round_0001_*/round.json")), 180, "site b to start training round 1")
        os.killpg(info["processes"]["supernode-b"], signal.SIGKILL)
        _wait(lambda: _committed(state) >= 2, 420, "round 2 to be committed", step=0.2)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        _wait(lambda: not procs.marked(info["launch_id"]), 60, "the guardian to end the first federation")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGTERM)
            launcher.wait(60)

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    history = checkpoint.read_committed(state).history
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    first_round = history[0]["sites"]
    assert first_round["a"]["status"] == "accepted"
    assert first_round["b"]["status"] == "rejected" and re.search(r"offline|restarted|Flower error", first_round["b"]["reason"])
    assert any(h["sites"]["b"]["status"] == "accepted" for h in history[1:]), history
    log = (state / "coordinator.log").read_text()
    b_nodes = set(re.findall(r"\bb=node (\d+)", log))
    assert b_nodes == {str(info["node_ids"]["b"])}, b_nodes  # restarted SuperNodes keep the node id
    assert not procs.marked(_launch_info(state)["launch_id"])  # the second launcher left nothing behind
    assert "federation finished" in output and str(state / "checkpoint.json") in output
    # logs, superlink.db, launcher.json and the rest: owner-only, as docs/DEPLOYMENT.md says (issue 37)
    shared = [p for p in [state, *state.rglob("*")] if p.stat().st_mode & 0o077]
    assert not shared, [f"{p.relative_to(state)} {oct(p.stat().st_mode & 0o777)}" for p in shared]


@pytest.mark.slow
def test_coordinate_in_process(phantom_federation, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_dict(phantom_federation["root"], rounds_per_step=1, steps=1)))
    from nnunet_feddah.coordinate import main

    assert main(["--plan", str(plan), "--state", str(tmp_path / "state"), "--in-process"]) == 0
    assert _committed(tmp_path / "state") == 1
    assert (tmp_path / "state" / "sites" / "b" / "round_0001_liver" / "metrics.json").is_file()
    assert "round 1/1 done" in (tmp_path / "state" / "coordinator.log").read_text()
