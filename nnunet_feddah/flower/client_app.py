"""A site as a Flower ClientApp: one ``train`` message = one :func:`nnunet_feddah.federation.site_round.run_site_round`.

The SuperNode starts a fresh ClientApp process per message, which suits nnU-Net: it reads its folder
variables when it is imported, so they are set here from the site's plan *before* anything imports
nnunetv2. What a site is comes from its own SuperNode's ``--node-config`` (``site-name``, and optionally
``plan``, ``work-dir``, ``device``), never from the coordinator: a message addressed to another site is
refused, and the site's own plan file decides where its data lives.

Failures are answered, not raised: the reply carries the error text, so the coordinator logs the
site's real reason for a missed round instead of Flower's generic "ClientApp exception".
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.flower import messages

_PROCESS_START = messages.process_start_time()
_IMPORTED = time.time()
DEFAULT_WORK_DIR = "feddah_site_work"

app = ClientApp()


class SiteMismatchError(FedDAHError, ValueError):
    """A job addressed to another site than this SuperNode serves."""


def site_name(context: Context) -> str:
    name = str(context.node_config.get("site-name", ""))
    if not name:
        raise SiteMismatchError("this SuperNode has no node config 'site-name'. Fix: start it with "
                                "python -m nnunet_feddah.site --site NAME ... (or --node-config \"site-name='NAME'\")")
    return name


def _setting(node_config: Mapping[str, Any], defaults: Mapping[str, str], key: str, fallback: str) -> str:
    """The site's own node config wins over the coordinator's default."""
    return str(node_config.get(key) or defaults.get(key) or fallback)


def prepare_nnunet_env(folders: Mapping[str, Path]) -> None:
    """Point nnU-Net at the site's folders; refuse if nnunetv2 was already imported with other ones."""
    from nnunet_feddah.paths import nnunet_env

    for name, path in folders.items():
        current = os.environ.get(name)
        if "nnunetv2" in sys.modules and current and Path(current).resolve() != Path(path).resolve():
            raise RuntimeError(f"nnunetv2 was imported with {name}={current}, the site needs {path}")
        os.environ[name] = str(path)
    for key, value in nnunet_env(folders["nnUNet_raw"].parent).items():
        if key not in folders:
            os.environ.setdefault(key, value)


def _timing(handler_start: float) -> dict[str, float]:
    return {"process_start": _PROCESS_START, "imported": _IMPORTED, "handler_start": handler_start,
            "handler_end": time.time()}


@app.query("fingerprint_round")
def fingerprint_round(msg: Message, context: Context) -> Message:
    """One stage of the fingerprint round (:func:`nnunet_feddah.federation.plans_round.answer`) at this site."""
    handler_start = time.time()
    try:
        site = site_name(context)
        stage, request, defaults = messages.ask_from_content(msg.content)
        from nnunet_feddah.federation.plan_reader import load_plan

        plan = load_plan(_setting(context.node_config, defaults, "plan", ""))
        prepare_nnunet_env(plan.nnunet_folders(site))
        from nnunet_feddah.federation.plans_round import answer

        return Message(messages.answer_content(answer(plan, site, stage, request), _timing(handler_start)),
                       reply_to=msg)
    except Exception as exc:  # answered, so the coordinator names this site's reason
        traceback.print_exc()
        return Message(messages.error_content(f"{type(exc).__name__}: {exc}", _timing(handler_start)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    handler_start = time.time()
    try:
        site = site_name(context)
        job, defaults = messages.job_from_content(msg.content)
        if job.site != site:
            raise SiteMismatchError(f"this SuperNode serves site {site!r}, the job is for {job.site!r}")
        from nnunet_feddah.federation.plan_reader import load_plan

        plan = load_plan(_setting(context.node_config, defaults, "plan", ""))
        prepare_nnunet_env(plan.nnunet_folders(site))
        from nnunet_feddah.federation.site_round import run_site_round

        work_dir = Path(_setting(context.node_config, defaults, "work-dir", DEFAULT_WORK_DIR))
        result = run_site_round(job, plan.site(site).dataset, plan.plans_identifier, work_dir,
                                _setting(context.node_config, defaults, "device", "cpu"))
        return Message(messages.result_content(result, _timing(handler_start)), reply_to=msg)
    except Exception as exc:  # answered, so the coordinator logs the site's reason
        traceback.print_exc()
        return Message(messages.error_content(f"{type(exc).__name__}: {exc}", _timing(handler_start)), reply_to=msg)
