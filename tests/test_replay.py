"""The benchmark's job replay: identical site jobs are trained once, also across processes (the disk store).

A counting fake site executor and tiny tensors: milliseconds, no nnU-Net training.
"""

from __future__ import annotations

import torch

from nnunet_feddah.federation.coordinator import SiteJob, SiteResult
from nnunet_feddah.results.benchmark import ReplayingExecutor, job_key


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
