#!/usr/bin/env python
"""Fault-and-abuse probe (issue 16): every fault of the list against the real code, one table.

    python scripts/fault_probe.py [--work DIR]

Each row: the fault, what the project did, how many committed rounds it cost, and whether the state
folder is bit-identical afterwards (every file but the lock compared byte for byte). A row whose outcome
is "lost" or "accepted silently" is a defect. Coordinator faults use the real round loop, strategy and
state files with synthetic uploads; the CLI faults run `python -m nnunet_feddah.coordinate` on a one-site
phantom (real nnU-Net data, no training needed: the faults stop it first); prediction faults run
`nnfeddah predict` on an exported model folder. Takes about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import builtins
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str, str]] = []


def _files(state: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*"))
            if p.is_file() and p.name != "coordinator.lock"} if state.exists() else {}


def _row(fault: str, outcome: str, rounds_lost: int | str, identical: bool | str) -> None:
    ident = identical if isinstance(identical, str) else ("yes" if identical else "NO")
    ROWS.append((fault, outcome, str(rounds_lost), ident))
    print(f"  {fault}: {outcome}", flush=True)


def _plan_dict(datasets: tuple[int | str, int | str] = (701, 702), **extra) -> dict:
    return {"name": "probe", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": 1,
            "sites": [{"name": "a", "dataset": datasets[0], "stream": ["kidneys", "spleen"]},
                      {"name": "b", "dataset": datasets[1], "stream": ["liver", "kidneys"]}],
            "local": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1}, **extra,
            "strategy": {"name": "feddah", "params": {}}}


def _synthetic(job, scale: float = 0.02):
    from nnunet_feddah.federation.coordinator import SiteResult

    g = torch.Generator().manual_seed(job.round * 10 + len(job.site))
    weights = {k: v + scale * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
               for k, v in job.weights.items()}
    from nnunet_feddah.organs import BY_LABEL

    metrics = {"task": job.task, "train_loss": 0.5, "iterations": 2, "dice": {BY_LABEL[job.organs[0]].key: 0.5},
               "mean_dice": 0.5, "num_training_cases": 4}
    return SiteResult(job.site, job.round, job.task, weights, metrics, 0.1)


# --- coordinator faults (synthetic uploads, real state) ---------------------------------------------------
def probe_coordinator(work: Path) -> None:
    from nnunet_feddah.federation import checkpoint
    from nnunet_feddah.federation.coordinator import Coordinator, RoundFailed
    from nnunet_feddah.federation.plan_reader import parse_plan
    from nnunet_feddah.flower import messages
    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.paths import bundled_plans_dir

    base = hypernet_base(json.loads((bundled_plans_dir() / "template_cpu.json").read_text()))
    plan = parse_plan(_plan_dict(), "probe.json")

    def open_(state: Path, **limits) -> Coordinator:
        return Coordinator.open(plan, state, base, is_head, "sha256:probe", log=lambda *_: None, **limits)

    def finished_state(name: str) -> Path:
        state = work / name
        open_(state).run(lambda jobs, d: {s: _synthetic(j) for s, j in jobs.items()})
        return state

    # a systematic fault at every site
    state = work / "all_fail"
    coordinator = open_(state, round_attempts=3)
    try:
        coordinator.run(lambda jobs, d: {s: "RuntimeError: CUDA is not available" for s in jobs})
        _row("every site fails every round", "accepted silently (rounds committed)", 0, False)
    except RoundFailed:
        committed = checkpoint.read_committed(state) is not None
        _row("every site fails every round", "refused: round not committed, retried 3x, run stops", 0,
             not committed)

    # one upload at a time, each against the same committed state
    def upload_case(fault: str, edit: Callable, limits: dict | None = None) -> None:
        coordinator = open_(work / f"upload_{len(ROWS)}", **(limits or {}))
        jobs = coordinator.jobs(1)
        results = {s: _synthetic(j) for s, j in jobs.items()}
        results["b"] = edit(jobs["b"], results["b"])
        summary = coordinator.apply(1, jobs, results)
        line = summary.sites["b"]
        outcome = f"rejected: {line['reason'][:60]}" if line["status"] == "rejected" else "accepted silently"
        _row(fault, outcome, 0, "yes (only the honest upload)" if line["status"] == "rejected" else False)

    def cases(value):
        def edit(job, result):
            result.metrics["num_training_cases"] = value
            return result
        return edit

    upload_case("num_training_cases = 1e9", cases(10 ** 9), {"training_cases": {"a": 5, "b": 5}})
    upload_case("num_training_cases = '4'", cases("4"))
    upload_case("num_training_cases = 0", cases(0))

    def metric(field, value):
        def edit(job, result):
            result.metrics[field] = value
            return result
        return edit

    upload_case("mean_dice = 'high' (crashes the final table)", metric("mean_dice", "high"))
    upload_case("dice = [0.5] (not an object)", metric("dice", [0.5]))
    upload_case("dice names another organ (NaN)", metric("dice", {"x": float("nan")}))
    upload_case("dice with 100,000 keys (grew checkpoint.json to 5.4 MB)",
                metric("dice", {f"o{i}": 0.5 for i in range(100_000)}))
    upload_case("metrics nested 50 levels deep", metric("notes", json.loads("[" * 50 + "]" * 50)))
    upload_case("predictive_js.all = NaN (crashed the generators' SVD)",
                metric("predictive_js", {"all": float("nan"), "foreground": 0.1}))
    upload_case("num_training_cases = 1e9, no count on the coordinator's host",
                cases(10 ** 9), {"training_cases": {"b": 4}})  # as registered by b's first upload

    def shift_norm_bias(job, result):
        name = min((k for k in result.weights if k.endswith("norm.bias")), key=lambda k: result.weights[k].numel())
        result.weights[name] = job.weights[name] + 2.0
        return result

    upload_case("one norm bias shifted by 2 (too small for the global bounds)", shift_norm_bias)
    upload_case("all-zero weights", lambda job, r: type(r)(r.site, r.round, r.task,
                                                            {k: torch.zeros_like(v) for k, v in r.weights.items()},
                                                            r.metrics, r.seconds))
    upload_case("weights x 1.99", lambda job, r: type(r)(r.site, r.round, r.task,
                                                          {k: v * 1.99 for k, v in job.weights.items()},
                                                          r.metrics, r.seconds))

    # a malformed weight layout on the wire
    record = messages.tensors_to_record({"w": torch.ones(2, 2)})
    import numpy as np
    from flwr.app import Array

    record[messages.LAYOUT] = Array(ndarray=np.frombuffer(b'[["w", "float32", [9, 9]]]', dtype=np.uint8).copy())
    try:
        messages.record_to_tensors(record)
        _row("malformed weight layout in a reply", "accepted silently", 0, False)
    except messages.MalformedMessageError as exc:
        _row("malformed weight layout in a reply", f"missed round: {str(exc)[:55]}", 0, "yes")

    # state damage
    def damage_case(fault: str, damage: Callable[[Path], None]) -> None:
        state = finished_state(f"damage_{len(ROWS)}")
        damage(state)
        before = _files(state)
        try:
            open_(state)
            _row(fault, "accepted silently", "?", False)
        except checkpoint.CheckpointError as exc:
            how = "refused, way back: previous record" if "checkpoint.previous" in str(exc) else "refused"
            _row(fault, how, 0, _files(state) == before)

    def strategy_file(state: Path) -> Path:
        return state / json.loads((state / checkpoint.RECORD).read_text())["strategy_file"]

    damage_case("checkpoint.json deleted", lambda s: (s / checkpoint.RECORD).unlink())
    damage_case("checkpoint.json truncated", lambda s: (s / checkpoint.RECORD).write_text('{"format": "nnun'))

    def randomise(state: Path) -> None:
        path = strategy_file(state)
        data = path.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        path.write_bytes(data[:header] + os.urandom(len(data) - header))

    damage_case("strategy file overwritten with random values", randomise)
    damage_case("strategy file truncated", lambda s: strategy_file(s).write_bytes(strategy_file(s).read_bytes()[:999]))
    damage_case("time-step snapshot replaced", lambda s: (s / "steps" / "strategy-r0001.safetensors").write_bytes(b"x"))

    from nnunet_feddah.federation.lock import StateBusyError, state_lock
    from nnunet_feddah.federation.plan import FederationPlanError
    from nnunet_feddah.federation.plans_round import PLANS_DIR, FingerprintRoundError, round_plans
    from nnunet_feddah.results.export import load_state

    state = finished_state("snapshot_bitflip")
    old = state / "steps" / "strategy-r0001.safetensors"
    old.write_bytes(old.read_bytes()[:-1] + bytes([old.read_bytes()[-1] ^ 1]))
    try:
        load_state(state, "sha256:probe")
        _row("bit flip in an old time-step snapshot, then export", "final model exported (evaluation refuses the "
             "snapshot)", 0, "yes")
    except Exception as exc:  # noqa: BLE001 - any refusal is the defect this row looks for
        _row("bit flip in an old time-step snapshot, then export", f"export refused: {str(exc)[:50]}", 0, "yes")

    state = finished_state("plan_changed")
    before = _files(state)
    changed = parse_plan({**_plan_dict(), "sites": [{**_plan_dict()["sites"][0], "stream": ["kidneys", "liver"]},
                                                    _plan_dict()["sites"][1]]}, "probe.json")
    try:
        Coordinator.open(changed, state, base, is_head, "sha256:probe", log=lambda *_: None)
        _row("resume under a changed plan", "accepted silently", "?", False)
    except FederationPlanError as exc:
        named = "stream[1]" in str(exc)
        _row("resume under a changed plan", "refused, naming the field" if named else "refused, field not named",
             0, _files(state) == before)
    longer = parse_plan({**_plan_dict(), "round_deadline_s": 9999}, "probe.json")
    resumed = Coordinator.open(longer, state, base, is_head, "sha256:probe", log=lambda *_: None)
    _row("resume with a longer round deadline", "resumed" if resumed.finished else "refused", 0, _files(state) == before)

    state = work / "lock_deleted"
    with state_lock(state, "in-process"):
        (state / "coordinator.lock").unlink()
        try:
            with state_lock(state, "flower ServerApp"):
                _row("coordinator.lock deleted under a running coordinator", "second coordinator ran", 0, False)
        except StateBusyError:
            _row("coordinator.lock deleted under a running coordinator", "second coordinator refused", 0, "yes")

    state = finished_state("fingerprint_record")
    (state / PLANS_DIR).mkdir()
    (state / PLANS_DIR / "fingerprint_round.json").write_text('{"plans_file": "FedDAHPl')
    try:
        round_plans(state)
        _row("shared_plans/fingerprint_round.json truncated", "accepted silently", "?", False)
    except FingerprintRoundError as exc:
        _row("shared_plans/fingerprint_round.json truncated", f"refused: {str(exc).split(': ', 1)[1][:45]}", 0, "yes")

    twins = [finished_state(f"twin_{i}") for i in range(2)]
    same = _files(twins[0]).keys() == _files(twins[1]).keys() and all(
        _files(twins[0])[k] == _files(twins[1])[k] for k in _files(twins[0]) if k.endswith(".safetensors"))
    _row("two identical runs: tensor files byte-identical", "identical" if same else "differ", 0, "yes" if same else "NO")

    state = finished_state("permissions")
    loose = [str(p.relative_to(state)) for p in [state, *state.rglob("*")] if p.stat().st_mode & 0o077
             and p.name != "coordinator.lock"]
    _row("state files readable by other users", "owner-only" if not loose else f"readable: {loose[:3]}", 0, "yes")


# --- CLI faults on a real one-site phantom ----------------------------------------------------------------
def probe_cli(work: Path) -> Path:
    env = {**os.environ, **_nnunet_env(work / "nnunet")}
    nnfeddah = [sys.executable, "-m", "nnunet_feddah.cli"]
    raw = Path(env["nnUNet_raw"])
    if not any(raw.glob("Dataset951_*")):
        subprocess.run([*nnfeddah, "phantom", "--out", str(raw), "--sites", "1", "--train", "5", "--test", "2",
                        "--first-id", "951", "--seed", "3"], env=env, check=True, capture_output=True)
        subprocess.run([*nnfeddah, "plans", "install", "--template", "cpu", "-d", "951"], env=env, check=True,
                       capture_output=True)
    plan = {**_plan_dict(), "sites": [{"name": "a", "dataset": 951, "stream": ["liver"]}]}
    (work / "plan.json").write_text(json.dumps(plan))
    coordinate = [sys.executable, "-m", "nnunet_feddah.coordinate", "--plan", str(work / "plan.json"), "--in-process"]

    state = work / "cli_cuda"
    proc = subprocess.run([*coordinate, "--state", str(state), "--device", "cuda", "--round-attempts", "2"], env=env,
                          capture_output=True, text=True, timeout=900)
    finished = "federation finished" in proc.stdout.replace("NOT finished", "")
    _row("`--device cuda` without CUDA (systematic site fault)",
         f"exit {proc.returncode}, {'finished' if finished else 'not committed, stops with the sites error'}", 0,
         not (state / "checkpoint.json").exists())

    from nnunet_feddah.federation.lock import state_lock

    state = work / "cli_locked"
    with state_lock(state, "another coordinate --local"):
        before = _files(state)
        proc = subprocess.run([*coordinate, "--state", str(state)], env=env, capture_output=True, text=True,
                              timeout=300)
    refused = proc.returncode != 0 and "in use by another coordinator" in proc.stderr
    _row("second coordinator on a held state folder", "refused with the holder's pid and start" if refused
         else f"ran anyway (exit {proc.returncode})", 0, _files(state) == before)
    return work / "nnunet"


def _nnunet_env(root: Path) -> dict[str, str]:
    from nnunet_feddah.paths import nnunet_env

    return nnunet_env(root)


# --- prediction faults --------------------------------------------------------------------------------------
class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def probe_predict(work: Path, nnunet_root: Path) -> None:
    from nnunet_feddah.nnunet.network import build_network, is_head, unique_tensors
    from nnunet_feddah.results import export, nnunet_folder
    from nnunet_feddah.results.amos_channels import amos_dataset_json, pad_heads_to_amos

    site = next(p.name for p in (nnunet_root / "nnUNet_preprocessed").glob("Dataset951_*"))
    pre = nnunet_root / "nnUNet_preprocessed" / site
    plans = json.loads((pre / "FedDAHPlansCPU.json").read_text())
    dataset_json = amos_dataset_json(json.loads((pre / "dataset.json").read_text()))
    folder = work / "model" / nnunet_folder.model_folder_name("FedDAHPlansCPU")
    target = folder / "fold_0" / "liver.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    weights = pad_heads_to_amos(unique_tensors(build_network(plans, 2, deep_supervision=False)), [6], is_head)
    torch.save(nnunet_folder.nnunet_checkpoint(nnunet_folder.nnunet_state_dict(plans, weights, 1), plans,
                                               dataset_json, feddah={"task": "liver"}), target)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    export._write_manifest(folder, [export.ExportedTask("liver", (6,), target)], "feddah", folder, 1,
                           plans["feddah"]["architecture_fingerprint"], site, "FedDAHPlansCPU", "3d_fullres")
    images = work / "images"
    images.mkdir(exist_ok=True)
    good = sorted((nnunet_root / "nnUNet_raw" / site / "imagesTs").iterdir())
    shutil.copy(good[0], images / "good_0000.nii.gz")
    data = good[1].read_bytes()
    (images / "truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    (images / "garbage_0000.nii.gz").write_bytes(gzip.compress(os.urandom(4096)))
    predict = [sys.executable, "-m", "nnunet_feddah.cli", "predict", "-i", str(images), "-o", str(work / "pred"),
               "-m", str(folder)]
    proc = subprocess.run(predict, capture_output=True, text=True, timeout=600, env=os.environ)
    merge = json.loads((work / "pred" / "feddah_merge.json").read_text()) if (work / "pred").exists() else {}
    skipped = sorted(merge.get("skipped", {}))
    for case in ("truncated", "garbage"):
        fault = f"{case} .nii.gz among good images"
        if case in skipped and "good" in merge.get("cases", {}):
            _row(fault, f"skipped and listed, the others predicted, exit {proc.returncode}", 0, "n/a")
        else:
            _row(fault, "predicted silently" if "good" in merge.get("cases", {}) else "whole folder lost", 0, "n/a")

    marker = work / "pwned"
    crafted = work / "crafted" / folder.name
    shutil.copytree(folder, crafted)
    torch.save({"network_weights": _Marker(marker)}, crafted / "fold_0" / "liver.pth")
    proc = subprocess.run([*predict[:-1], str(crafted), "-o", str(work / "pred2")], capture_output=True, text=True,
                          timeout=600, env=os.environ)
    _row("crafted liver.pth in a model folder (code on load)",
         "ran the file's code" if marker.exists() else f"refused unloaded (exit {proc.returncode})", 0, "n/a")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="feddah_fault_probe_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "2", "nnUNet_compile": "false"})
    started = time.perf_counter()
    print("coordinator faults:")
    probe_coordinator(work / "coordinator")
    print("command-line faults (one-site phantom):")
    root = probe_cli(work / "cli")
    os.environ.update(_nnunet_env(root))
    print("prediction faults:")
    probe_predict(work / "predict", root)
    widths = [max(len(r[i]) for r in [("fault", "outcome", "rounds lost", "state bit-identical"), *ROWS])
              for i in range(4)]
    print()
    for row in [("fault", "outcome", "rounds lost", "state bit-identical"), tuple("-" * w for w in widths), *ROWS]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    bad = [r for r in ROWS if r[1].startswith(("accepted silently", "lost", "predicted silently", "ran ",
                                                "whole folder")) or r[3] == "NO"]
    print(f"\n{len(ROWS)} faults in {time.perf_counter() - started:.0f} s; {len(bad)} defect(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
