"""A site's SuperNode: ``python -m nnunet_feddah.site --plan P --site NAME --superlink HOST:PORT ...``.

Checks the site's data against the plan first (a wrong dataset id should fail here, in front of the
operator, not an hour later inside a round), then becomes ``flower-supernode`` (exec, so a service
manager's signals reach Flower directly). The node config carries what the ClientApp needs to know
about *this* site: its name, its plan file (with its own ``nnunet_root``), its work folder and device.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nnunet_feddah.flower.launch.flwr_cli import config_arg, flower_env, venv_bin

DEFAULT_CLIENTAPP_PORT = 9094


def supernode_command(superlink: str, root_certificates: Path, auth_key: Path, node_config: Mapping[str, Any],
                      clientapp_port: int = DEFAULT_CLIENTAPP_PORT, max_retries: int | None = None) -> list[str]:
    """``flower-supernode`` with TLS and key authentication; ``clientapp_port`` must differ per node on a host."""
    cmd = [str(venv_bin() / "flower-supernode"), "--superlink", superlink,
           "--root-certificates", str(Path(root_certificates).resolve()),
           "--auth-supernode-private-key", str(Path(auth_key).resolve()),
           "--node-config", config_arg(node_config), "--port", str(clientapp_port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def node_config(site: str, plan: Path, work_dir: Path, device: str) -> dict[str, str]:
    return {"site-name": site, "plan": str(Path(plan).resolve()), "work-dir": str(Path(work_dir).resolve()),
            "device": device}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnunet_feddah.site",
                                description="Run this site's Flower SuperNode for a FedDAH federation.")
    p.add_argument("--plan", required=True, help="federation plan JSON (this site's copy: its nnunet_root)")
    p.add_argument("--site", required=True, help="this site's name in the plan (= its registered SuperNode name)")
    p.add_argument("--superlink", required=True, help="SuperLink Fleet address HOST:PORT")
    p.add_argument("--root-certificates", required=True, type=Path, help="CA certificate that signed the SuperLink's")
    p.add_argument("--auth-key", required=True, type=Path, help="this site's ECDSA private key (ssh-keygen); "
                                                                 "its .pub must be registered at the SuperLink")
    p.add_argument("--work", type=Path, default=Path("feddah_site_work"), help="folder for the round folders")
    p.add_argument("--device", default="cpu", help="training device: cpu, cuda, mps")
    p.add_argument("--clientapp-port", type=int, default=DEFAULT_CLIENTAPP_PORT,
                   help="local port for the SuperNode's ClientApp API (distinct per SuperNode on one host)")
    p.add_argument("--max-retries", type=int, default=None, help="give up after this many connection retries "
                                                                   "(default: retry forever)")
    p.add_argument("--flwr-home", type=Path, default=None, help="Flower's folder for installed apps (default: "
                                                                 "<work>/.flwr)")
    p.add_argument("--no-check", action="store_true", help="skip the data check (it reads every case's labels)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from nnunet_feddah.federation.plan import FederationPlanError
    from nnunet_feddah.federation.plan_reader import load_plan
    from nnunet_feddah.federation.site_data import validate_sites

    args = _parser().parse_args(argv)
    try:
        plan = load_plan(args.plan)
        plan.site(args.site)
        if not args.no_check:
            data = validate_sites(plan, [args.site])[args.site]
            print(f"site {args.site}: {data.dataset_name}, plans {data.plans_file} ({data.fingerprint})")
    except (FederationPlanError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    for path, what in ((args.root_certificates, "--root-certificates"), (args.auth_key, "--auth-key"),
                       (Path(f"{args.auth_key}.pub"), "--auth-key's public key")):
        if not path.is_file():
            print(f"error: {what}: {path} does not exist (see docs/DEPLOYMENT.md, 'Site keys')")
            return 2
    cmd = supernode_command(args.superlink, args.root_certificates, args.auth_key,
                            node_config(args.site, Path(plan.source), args.work, args.device), args.clientapp_port,
                            args.max_retries)
    args.work.mkdir(parents=True, exist_ok=True)
    env = flower_env(args.flwr_home or args.work.resolve() / ".flwr", {})
    print(f"starting SuperNode for site {args.site} -> {args.superlink} (round folders in {args.work.resolve()})",
          flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
