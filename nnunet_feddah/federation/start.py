"""What a coordinator starts from: the sites' shared plans, their architecture and the organ-slot base network.

One function for every way of running a federation (in-process, the Flower ServerApp), so they open a
state folder identically. The plans come from an explicit plans file, from the state's finished fingerprint
round (:mod:`.plans_round`), or from a site's installed data (checked by :func:`~.site_data.validate_sites`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nnunet_feddah.federation import plans_round
from nnunet_feddah.federation.coordinator import DEFAULT_MAX_RELATIVE_CHANGE, DEFAULT_ROUND_ATTEMPTS, Coordinator
from nnunet_feddah.federation.plan import FederationPlan, FederationPlanError
from nnunet_feddah.federation.site_data import validate_sites
from nnunet_feddah.nnunet.network import architecture_fingerprint, hypernet_base, is_head


def shared_plans(plan: FederationPlan, plans_file: str | Path | None = None, state_dir: str | Path | None = None
                 ) -> tuple[dict[str, Any], str, dict[str, int]]:
    """The shared nnU-Net plans, their architecture fingerprint and each site's declared training cases.

    From an explicit plans file (then no site's case count is known here, and an upload's
    ``num_training_cases`` is only checked to be a positive integer); else from the fingerprint round
    finished in ``state_dir``; else from the sites' installed data, when this host has it.
    """
    if plans_file:
        plans = json.loads(Path(plans_file).read_text())
        fingerprint = (plans.get("feddah") or {}).get("architecture_fingerprint") or architecture_fingerprint(plans)
        return plans, fingerprint, {}
    from_round = plans_round.round_plans(Path(state_dir)) if state_dir is not None else None
    if from_round is not None:
        return from_round
    sites = validate_sites(plan, check_cases=False)
    first = next(iter(sites.values()))
    cases = {name: data.training_cases for name, data in sites.items() if data.training_cases is not None}
    return json.loads(first.plans_file.read_text()), first.fingerprint, cases


def parse_case_counts(text: str, plan: FederationPlan) -> dict[str, int]:
    """``"site1=40,site2=25"`` (the operator's ``--training-cases``) as ``{site: cases}``, every site in the plan."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, _, value = item.partition("=")
        if site not in plan.site_names or not value.strip().isdigit() or int(value) < 1:
            raise FederationPlanError(plan.source, [
                f"--training-cases {item!r}: expected SITE=N with SITE one of {list(plan.site_names)} and N ≥ 1"])
        counts[site] = int(value)
    return counts


def open_coordinator(plan: FederationPlan, state_dir: str | Path, plans_file: str | Path | None = None,
                     log: Callable[[str], None] = print,
                     max_relative_change: float | None = None,
                     round_attempts: int = DEFAULT_ROUND_ATTEMPTS,
                     operator_cases: Mapping[str, int] | None = None) -> Coordinator:
    """A fresh coordinator for ``plan``, or the one committed in ``state_dir`` (resume).

    ``operator_cases`` (``--training-cases``) overrides the case counts that bound what a site may claim."""
    plans, fingerprint, training_cases = shared_plans(plan, plans_file, state_dir)
    training_cases = {**training_cases, **(operator_cases or {})}
    return Coordinator.open(plan, Path(state_dir), hypernet_base(plans), is_head, fingerprint, log=log,
                            max_relative_change=max_relative_change or DEFAULT_MAX_RELATIVE_CHANGE,
                            training_cases=training_cases, round_attempts=round_attempts)
