"""The benchmark's job replay: identical site jobs are trained once, also across processes (the disk store).

A counting fake site executor and tiny tensors: milliseconds, no nnU-Net training.
"""

from __future__ import annotations

import torch

from nnunet_feddah.federation.jobs import SiteJob, SiteResult
from nnunet_feddah.results.replay import ReplayingExecutor, job_key, relative_gap


class CountingSites:
    """Trains by adding the round number to every tensor; counts the jobs it was really given."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, jobs, deadline_s):
        self.calls += list(jobs)
        return {site: SiteResult(site, job.round, job.task, {k: v + job.round for k, v in job.weights.items()},
                                 {"train_loss": -0.5}, seconds=7.0) for site, job in jobs.items()}


def job(site: str, value: float, round_number: int = 1) -> SiteJob:
    return SiteJob(site, round_number, "kidneys", [2, 3], 0, {"epochs": 1, "seed": round_number},
                   {"w": torch.full((2, 3), value), "b": torch.zeros(3)})


def test_identical_jobs_train_once_and_replays_are_charged(tmp_path) -> None:
    sites = CountingSites()
    replay = ReplayingExecutor(sites, store=tmp_path / "replay")
    first = replay({"a": job("a", 1.0), "b": job("b", 1.0)}, 60)
    again = replay({"a": job("a", 1.0), "b": job("b", 2.0)}, 60)  # b starts from other weights: trained
    assert sites.calls == ["a", "b", "b"]
    assert replay.trained == 3 and replay.replayed == 1 and replay.replayed_s == 7.0
    assert torch.equal(again["a"].weights["w"], first["a"].weights["w"])
    again["a"].weights["w"].add_(100)  # a replay is a copy: the cached upload stays as trained
    assert torch.equal(replay({"a": job("a", 1.0)}, 60)["a"].weights["w"], torch.full((2, 3), 2.0))
    assert job_key(job("a", 1.0)) != job_key(job("a", 1.0 + 1e-7))  # the exact bytes of the weights count


def test_a_new_process_replays_from_the_store(tmp_path) -> None:
    ReplayingExecutor(CountingSites(), store=tmp_path)({"a": job("a", 1.0, round_number=2)}, 60)
    sites = CountingSites()
    later = ReplayingExecutor(sites, store=tmp_path)
    result = later({"a": job("a", 1.0, round_number=2)}, 60)["a"]
    assert sites.calls == [] and later.replayed == 1 and later.replayed_s == 7.0
    assert (result.site, result.round, result.task, result.metrics) == ("a", 2, "kidneys", {"train_loss": -0.5})
    assert torch.equal(result.weights["w"], torch.full((2, 3), 3.0))
    # a record whose weights file is gone is not trusted: the job is trained again
    (tmp_path / f"{job_key(job('a', 1.0, round_number=2))}.safetensors").unlink()
    ReplayingExecutor(sites, store=tmp_path)({"a": job("a", 1.0, round_number=2)}, 60)
    assert sites.calls == ["a"]


def test_upload_replay_trains_each_slot_once_and_lays_its_change_onto_the_new_start(tmp_path) -> None:
    sites = CountingSites()
    replay = ReplayingExecutor(sites, store=tmp_path, replay_uploads=True)
    live = replay({"a": job("a", 1.0, round_number=2)}, 60)["a"]  # trained: w = 1 + 2
    same = replay({"a": job("a", 1.0, round_number=2)}, 60)["a"]
    assert torch.equal(same.weights["w"], live.weights["w"]) and replay.start_gaps == [0.0]  # the live run, exactly
    other = replay({"a": job("a", 1.5, round_number=2)}, 60)["a"]  # another start: replayed, not trained
    assert sites.calls == ["a"] and replay.replayed == 2
    assert torch.equal(other.weights["w"], torch.full((2, 3), 3.5))  # its own start + the site's change (+2)
    assert torch.equal(other.weights["b"], torch.full((3,), 2.0))
    # the gap: ‖0.5 · 1‖ over ‖change‖ = ‖2 · 1 (w) and 2 · 1 (b)‖
    assert abs(replay.start_gaps[-1] - (6 * 0.25) ** 0.5 / (9 * 4) ** 0.5) < 1e-12
    assert relative_gap({"w": torch.ones(2)}, {"w": torch.ones(2)}, {"w": torch.ones(2)}) == 0.0
    # a later process reads the start it was trained from back from the store
    # a change float32 cannot add back exactly: the same start still gets the upload's exact bytes
    odd = ReplayingExecutor(lambda jobs, d: {s: SiteResult(s, j.round, j.task, {k: v + 0.1 * torch.randn(v.shape)
                                                                               for k, v in j.weights.items()}, {}, 1.0)
                                             for s, j in jobs.items()}, replay_uploads=True)
    start = job("c", 0.3, round_number=3)
    assert torch.equal(odd({"c": start}, 60)["c"].weights["w"], odd({"c": start}, 60)["c"].weights["w"])
    later = ReplayingExecutor(CountingSites(), store=tmp_path, replay_uploads=True)
    assert torch.equal(later({"a": job("a", 0.0, round_number=2)}, 60)["a"].weights["w"], torch.full((2, 3), 2.0))
    assert later.trained == 0 and later.replayed == 1
