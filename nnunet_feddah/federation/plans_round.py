"""The fingerprint round: the shared nnU-Net plans planned from every site's statistics, before round 1.

Why: every site trains the one network DAHyper generates, on data preprocessed the same way, so the plans
are shared — and nnU-Net's premise is that the dataset fingerprint (spacings, shapes, foreground intensities)
decides them. Filling the template from one site's fingerprint is "one site plans for everyone"; this round
plans from the union of all sites' cases while no image, voxel value or per-case intensity leaves a site.

Two exchanges with every site of the plan — late joiners included, since the plans fix the network and the
CT normalisation for everyone:

1. ``statistics``: the site runs :func:`~nnunet_feddah.nnunet.federated_fingerprint.site_statistics` on its raw
   training cases and answers with that file's content (aggregates only; the file lists what it holds).
2. ``install``: the coordinator merges them (:func:`~nnunet_feddah.nnunet.fingerprint_merge.merge_statistics`:
   moments exact, percentiles within one histogram bin), fills the plan's template with nnU-Net's CT
   normalisation, median spacing and shape from the merged fingerprint, keeps everything under
   ``<state>/shared_plans/`` and sends the plans; each site installs them with nnU-Net's
   ``move_plans_between_datasets`` and preprocesses (:func:`~nnunet_feddah.nnunet.shared_plans.install`),
   and answers with the architecture fingerprint of what it installed, which must be the plans' own.

Nothing is committed until every site has installed: a site that does not answer or fails stops the run
with its reason, and the next run repeats the whole round (a site may have fixed its data meanwhile).
``<state>/shared_plans/fingerprint_round.json`` is written last and marks the round done; a resumed
federation reads the plans from there (:func:`round_plans`). The transport is an :data:`Ask` — Flower's
(``FlowerExecutor.ask``) or this process's (``InProcessExecutor.ask``); the same two functions,
:func:`answer` at the site and :func:`run_fingerprint_round` at the coordinator, serve both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nnunet_feddah.atomic import atomic_write_json
from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation import checkpoint
from nnunet_feddah.federation.plan import FederationPlan

STATISTICS, INSTALL = "statistics", "install"
STAGES = (STATISTICS, INSTALL)
PLANS_DIR = "shared_plans"
RECORD = "fingerprint_round.json"

#: ``ask(stage, {site: request}, deadline_s) -> {site: reply or the reason there is none}``.
Ask = Callable[[str, Mapping[str, Mapping[str, Any]], float], dict[str, Any]]


class FingerprintRoundError(FedDAHError, RuntimeError):
    """The fingerprint round could not plan: which site, why, and that the next run repeats the round."""


# ---------------------------------------------------------------------------------------------- site side
def answer(plan: FederationPlan, site: str, stage: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """A site's answer to one stage; nnU-Net's folders (``nnUNet_*`` variables) must already be the site's own.

    Each stage runs the very command a site would run offline (``nnfeddah fingerprint site``, ``nnfeddah plans
    install --plans-file``) in a child process: nnU-Net's fingerprinting and preprocessing fork worker pools,
    and forking a Flower ClientApp (gRPC and HTTP threads running) deadlocked a site in testing.
    """
    from nnunet_feddah.nnunet.shared_plans import raw_dataset_name, site_fingerprint

    dataset = str(plan.site(site).dataset)
    with tempfile.TemporaryDirectory(prefix="feddah_fingerprint_round_") as folder:
        if stage == STATISTICS:
            out = Path(folder) / f"{site}.json"
            command = ["fingerprint", "site", "-d", dataset, "--out", str(out)]
            if request.get("min_count"):
                command += ["--min-count", str(int(request["min_count"]))]
            _run_site_command(command, site, stage)
            return {"statistics": json.loads(out.read_text())}
        if stage == INSTALL:
            received = Path(folder) / f"{plan.plans_identifier}.json"
            received.write_text(json.dumps(request["plans"]))
            _run_site_command(["plans", "install", "--plans-file", str(received), "-d", dataset], site, stage)
            return {"architecture_fingerprint": site_fingerprint(raw_dataset_name(dataset), plan.plans_identifier)}
    raise FingerprintRoundError(f"unknown fingerprint-round stage {stage!r}; expected one of {STAGES}")


def _run_site_command(args: list[str], site: str, stage: str) -> None:
    """``nnfeddah ARGS`` in a child process; its error (already naming file, field and fix) is raised as ours."""
    done = subprocess.run([sys.executable, "-m", "nnunet_feddah.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        # nnU-Net prints some of its errors (e.g. the file its integrity check failed on) on stdout: keep both
        tail = "\n".join(part[-1500:] for part in (done.stdout.strip(), done.stderr.strip()) if part)
        raise FingerprintRoundError(f"site {site}, stage {stage!r}: `nnfeddah {' '.join(args)}` failed "
                                    f"(exit {done.returncode}): {tail}")


# ---------------------------------------------------------------------------------------------- coordinator
RECORD_FIELDS = {"plans_file": str, "architecture_fingerprint": str, "training_cases": dict}


def _damaged(path: Path, problem: str) -> FingerprintRoundError:
    return FingerprintRoundError(
        f"{path}: {problem}. The fingerprint round's record is damaged; nothing was changed. Fix: restore "
        f"{path.parent} from a backup, or, if no round has been committed yet, move {path.parent} aside and run "
        f"the same command again to repeat the fingerprint round")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"not readable JSON ({exc})") from None


def round_record(state_dir: Path) -> dict[str, Any] | None:
    """The finished round's record in ``state_dir``, or None (no round, or one that did not finish).

    A record that is there but damaged is an error naming the file and the way back, never None: treating it
    as absent would plan the federation again over a state that already trained on the old plans."""
    path = Path(state_dir) / PLANS_DIR / RECORD
    if not path.is_file():
        return None
    record = _read_json(path)
    if not isinstance(record, dict):
        raise _damaged(path, f"holds a {type(record).__name__}, expected an object")
    for name, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind):
            raise _damaged(path, f"field '{name}' is {record.get(name)!r}, expected a {kind.__name__}")
    return record


def round_plans(state_dir: Path) -> tuple[dict[str, Any], str, dict[str, int]] | None:
    """Plans, architecture fingerprint and per-site training cases of the finished round, or None."""
    record = round_record(state_dir)
    if record is None:
        return None
    plans = _read_json(Path(state_dir) / PLANS_DIR / Path(record["plans_file"]).name)
    return plans, record["architecture_fingerprint"], dict(record["training_cases"])


def ensure_shared_plans(plan: FederationPlan, state_dir: Path, ask: Ask,
                        log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run the fingerprint round if the plan asks for one and the state has neither its plans nor a round.

    Returns the round's record (None: the plan installs its plans beforehand, or a state committed before
    fingerprint rounds existed keeps the plans its sites have).
    """
    if plan.fingerprint_round is None:
        return None
    record = round_record(state_dir)
    if record is not None:
        return record
    if checkpoint.read_committed(Path(state_dir), verify=False) is not None:
        log(f"{state_dir}: rounds were committed without a fingerprint round; keeping the sites' installed plans")
        return None
    return run_fingerprint_round(plan, Path(state_dir), ask, log)


def run_fingerprint_round(plan: FederationPlan, state_dir: Path, ask: Ask,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both stages with every site; writes ``<state>/shared_plans/`` and returns the round's record."""
    from nnunet_feddah.nnunet.fingerprint_merge import merge_statistics
    from nnunet_feddah.nnunet.network import architecture_fingerprint, num_input_channels
    from nnunet_feddah.nnunet.shared_plans import fill_template, load_template

    spec = plan.fingerprint_round
    if spec is None:
        raise FingerprintRoundError(f"{plan.source}: no 'fingerprint_round' section; add one to plan from the sites")
    template = load_template(spec.template)
    if template["plans_name"] != plan.plans_identifier:
        raise FingerprintRoundError(
            f"{plan.source}: fingerprint_round.template {spec.template!r} makes plans {template['plans_name']!r}, "
            f"but plans_identifier is {plan.plans_identifier!r}. Fix: set plans_identifier to "
            f"{template['plans_name']!r} or use a template with that plans_name")
    folder = Path(state_dir) / PLANS_DIR
    sites = plan.site_names
    started = time.perf_counter()
    request = {"min_count": spec.min_count} if spec.min_count is not None else {}
    log(f"fingerprint round: asking {len(sites)} site(s) for nnU-Net fingerprint statistics of their training cases")
    replies = _ask_every_site(ask, STATISTICS, {site: request for site in sites}, plan)
    statistics = {site: replies[site]["statistics"] for site in sites}
    up_bytes = {site: len(json.dumps(stats).encode()) for site, stats in statistics.items()}
    merged = merge_statistics(statistics)
    plans = fill_template(template, merged["fingerprint"], statistics[sites[0]]["dataset_name"],
                          merged["dataset"]["image_reader_writer"])
    fingerprint = architecture_fingerprint(plans, num_input_channels(merged["dataset"]))
    source = f"fingerprint round of {', '.join(sites)} filling {spec.template}"
    plans["feddah"] = {"architecture_fingerprint": fingerprint, "source": source}
    for site, stats in statistics.items():  # what left each site, kept for its data officer's audit
        atomic_write_json(folder / "statistics" / f"{site}.json", stats)
    atomic_write_json(folder / "dataset_fingerprint.json", merged["fingerprint"])
    atomic_write_json(folder / "merge_report.json", {k: merged[k] for k in ("format", "report", "sites", "dataset")})
    plans_file = f"{plan.plans_identifier}.json"
    atomic_write_json(folder / plans_file, plans)
    merged_at = time.perf_counter()
    for channel, entry in merged["fingerprint"]["foreground_intensity_properties_per_channel"].items():
        log(f"fingerprint round: channel {channel} of {merged['dataset']['numTraining']} cases: mean "
            f"{entry['mean']:.1f} std {entry['std']:.1f} percentiles 0.5/99.5 {entry['percentile_00_5']:.1f}/"
            f"{entry['percentile_99_5']:.1f}; plans {folder / plans_file} ({fingerprint})")
    installed = _ask_every_site(ask, INSTALL, {site: {"plans": plans} for site in sites}, plan)
    wrong = {site: r.get("architecture_fingerprint") for site, r in installed.items()
             if r.get("architecture_fingerprint") != fingerprint}
    if wrong:
        raise FingerprintRoundError(f"fingerprint round: site(s) installed a different architecture than "
                                    f"{fingerprint}: {wrong}; their nnU-Net versions or channels differ. Fix: "
                                    f"install the same nnunet-feddah at every site, then run again")
    record = {
        "plans_file": plans_file, "architecture_fingerprint": fingerprint, "template": spec.template,
        "sites": list(sites), "training_cases": dict(zip(sites, merged["cases_per_site"], strict=True)),
        "seconds": {"statistics": merged_at - started, "install": time.perf_counter() - merged_at,
                    "total": time.perf_counter() - started},
        "bytes": {"statistics_up": up_bytes, "plans_down_per_site": len(json.dumps(plans).encode())},
        "normalisation": merged["fingerprint"]["foreground_intensity_properties_per_channel"],
    }
    atomic_write_json(folder / RECORD, record)  # last: the round is done
    log(f"fingerprint round done in {record['seconds']['total']:.1f} s: {sum(up_bytes.values())} bytes of "
        f"statistics up, {record['bytes']['plans_down_per_site']} bytes of plans down per site")
    return record


def _ask_every_site(ask: Ask, stage: str, requests: Mapping[str, Mapping[str, Any]],
                    plan: FederationPlan) -> dict[str, dict[str, Any]]:
    """Every site's reply to a stage; any site without one stops the round, naming it and its reason."""
    replies = ask(stage, requests, plan.round_deadline_s)
    missing = {site: replies.get(site, "no reply") for site in requests if not isinstance(replies.get(site), dict)}
    if missing:
        reasons = "; ".join(f"{site}: {why}" for site, why in missing.items())
        raise FingerprintRoundError(f"fingerprint round, stage {stage!r}: {len(missing)} site(s) did not answer — "
                                    f"{reasons}. The plans fix the network for every site, so all must take part; "
                                    f"fix the site(s) and run again (the round is repeated, nothing was committed)")
    return {site: replies[site] for site in requests}
