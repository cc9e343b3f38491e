"""Flower 1.41 adapters: the only package that imports ``flwr``.

* :mod:`.server_app` / :mod:`.client_app` — the ServerApp (drives :class:`~nnunet_feddah.federation.coordinator.Coordinator`
  through :class:`.executor.FlowerExecutor`) and the ClientApp (runs :func:`nnunet_feddah.federation.site_round.run_site_round`);
  ``app/`` is the Flower app directory that ``flwr run`` packs (its components live in this installed package,
  because SuperLink and SuperNodes run with runtime dependency installation disabled).
* :mod:`.launch` — a whole federation on loopback (TLS SuperLink, one SuperNode per site) for demos and tests.
* :mod:`.supernode` — a site's ``flower-supernode`` command line (``python -m nnunet_feddah.site``).

Importing this package itself must stay cheap: Flower imports it while it only *looks up* a component.
"""

from __future__ import annotations

from pathlib import Path

TIMINGS_FILE = "flower_timings.jsonl"  # in the state folder: per round and site, where the time went


def app_dir() -> Path:
    """The Flower app directory (``pyproject.toml`` with the component references and run-config keys)."""
    from importlib import resources

    return Path(str(resources.files("nnunet_feddah.flower") / "app"))
