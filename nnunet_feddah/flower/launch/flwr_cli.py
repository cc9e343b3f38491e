"""The ``flwr`` command line with a private ``FLWR_HOME``: register sites, start, poll and stop a run.

The CLI (not Flower's Python internals) is the supported interface to a SuperLink's Control API, and a
private ``FLWR_HOME`` keeps our connection settings out of the user's ``~/.flwr``. Every call uses
``--format json`` so results are parsed, not scraped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_feddah.errors import FedDAHError

FEDERATION = "feddah"
FINISHED = "finished:"
COMPLETED = "finished:completed"


class FlwrCliError(FedDAHError, RuntimeError):
    """A ``flwr`` command that failed; the message has the command and Flower's answer."""


def venv_bin() -> Path:
    """Folder of this interpreter's console scripts (flwr, flower-superlink, flwr-serverapp, ...)."""
    return Path(sys.executable).parent


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, venv bin first on PATH (SuperLink and SuperNode
    spawn ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), telemetry off.

    Telemetry off is a privacy default for hospitals, and also a speed-up: every Flower process posts an
    event when it exits and waits for it, which stalls each ClientApp where the internet is unreachable.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(venv_bin()), os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_HOME": str(home), "PATH": path, "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"), **(extra or {})}


def toml_string(value: str) -> str:
    """A TOML literal string; refuses the one character it cannot hold."""
    if "'" in value or "\n" in value:
        raise ValueError(f"{value!r}: paths and names given to Flower must not contain quotes or newlines")
    return f"'{value}'"


def config_arg(values: Mapping[str, Any]) -> str:
    """``key='str' key=1.0`` as ``flwr run -c`` and ``flower-supernode --node-config`` parse it."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value!r}")
        else:
            parts.append(f"{key}={toml_string(str(value))}")
    return " ".join(parts)


@dataclass
class FlwrCli:
    """``flwr`` against one SuperLink, configured as federation ``feddah`` in a private FLWR_HOME."""

    home: Path
    address: str
    root_certificates: Path

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f"address = {toml_string(self.address)}\n"
            f"root-certificates = {toml_string(str(Path(self.root_certificates).resolve()))}\n")

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> dict[str, Any]:
        cmd = [str(venv_bin() / "flwr"), *args, "--format", "json"]
        out = subprocess.run(cmd, env=flower_env(self.home), capture_output=True, text=True, timeout=timeout)
        try:
            result = json.loads(out.stdout)
        except json.JSONDecodeError:
            result = {"success": False, "error-message": (out.stdout + out.stderr).strip()[-2000:]}
        if check and not result.get("success", False):
            raise FlwrCliError(f"{' '.join(args[:3])} failed: {result.get('error-message', result)}")
        return result

    # --- SuperNodes -----------------------------------------------------------------------------------
    def register(self, public_key: Path, name: str) -> int | None:
        """Register a site's public key under its name; None if the key is already registered (a resume).

        ``flwr supernode ls`` shows neither names nor keys, so callers remember the ids they were given.
        """
        result = self("supernode", "register", str(public_key), "--name", name, check=False)
        if result.get("success"):
            return int(result["node-id"])
        if "already in use" in str(result.get("error-message", "")):
            return None
        raise FlwrCliError(f"registering {public_key} as {name} failed: {result.get('error-message', result)}")

    def nodes(self) -> list[dict[str, Any]]:
        return list(self("supernode", "ls")["nodes"])

    def node_status(self) -> dict[int, str]:
        return {int(n["node-id"]): str(n.get("status", "")) for n in self.nodes()}

    # --- runs -----------------------------------------------------------------------------------------
    def run(self, app: Path | str, config: Mapping[str, Any]) -> int:
        """``flwr run``: ``app`` is a folder (packed by the CLI, unsigned) or ``@publisher/name==x.y.z``
        (fetched and verified by the SuperLink: the only kind a SuperNode with trusted entities runs)."""
        return int(self("run", str(app), FEDERATION, "--run-config", config_arg(config), timeout=300)["run-id"])

    def status(self, run_id: int) -> str:
        return str(self("ls", "--run-id", str(run_id))["runs"][0]["status"])

    def stop(self, run_id: int) -> bool:
        return bool(self("stop", str(run_id), check=False).get("success"))

    def log_text(self, run_id: int) -> str:
        out = subprocess.run([str(venv_bin() / "flwr"), "log", str(run_id), "--show"], env=flower_env(self.home),
                             capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr
