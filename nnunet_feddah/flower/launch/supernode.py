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
                      clientapp_port: int = DEFAULT_CLIENTAPP_PORT, max_retries: int | None = None,
                      trusted_entities: Path | None = None) -> list[str]:
    """``flower-supernode`` with TLS and key authentication; ``clientapp_port`` must differ per node on a host.

    With ``trusted_entities`` the SuperNode runs only apps signed by one of its keys: an unsigned or
    wrongly signed run gets an error reply and none of its code runs at the site.
    """
    cmd = [str(venv_bin() / "flower-supernode"), "--superlink", superlink,
           "--root-certificates", str(Path(root_certificates).resolve()),
           "--auth-supernode-private-key", str(Path(auth_key).resolve()),
           "--node-config", config_arg(node_config), "--port", str(clientapp_port)]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(Path(trusted_entities).resolve())]
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
    p.add_argument("--trusted-entities", type=Path, default=None,
                   help="YAML {key id: 'ssh-ed25519 ...'} of the app-signing keys this site trusts; the SuperNode "
                        "then runs only apps signed by one of them (docs/DEPLOYMENT.md, 'App signing')")
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


def _trusted_entities_problem(path: Path) -> str | None:
    """What Flower would refuse in a trusted-entities file, said here with the file and the fix."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    from nnunet_feddah.flower.launch.pki import read_trusted_entities

    if not path.is_file():
        return f"{path} does not exist"
    try:
        entities = read_trusted_entities(path)
        for key_id, line in entities.items():
            if not isinstance(load_ssh_public_key(str(line).encode()), ed25519.Ed25519PublicKey):
                return f"{path}: entry {key_id} is not an Ed25519 key ('ssh-ed25519 AAAA...'); Flower verifies " \
                       f"app signatures with Ed25519 keys only"
    except Exception as exc:  # YAML or key syntax: name the file and what was wrong
        return f"{path}: {exc}; expected lines like `fpk_<id>: 'ssh-ed25519 AAAA...'`"
    return None if entities else f"{path} names no key: the SuperNode would accept unsigned apps"


def main(argv: Sequence[str] | None = None) -> int:
    from nnunet_feddah.federation.plan import FederationPlanError
    from nnunet_feddah.federation.plan_reader import load_plan
    from nnunet_feddah.federation.site_data import validate_sites

    args = _parser().parse_args(argv)
    try:
        plan = load_plan(args.plan)
        plan.site(args.site)
        if not args.no_check:
            # with a fingerprint round the plans arrive over Flower: only the raw data must be here yet
            data = validate_sites(plan, [args.site], require_plans=plan.fingerprint_round is None)[args.site]
            print(f"site {args.site}: {data.dataset_name}, plans {data.plans_file} "
                  f"({data.fingerprint or 'from the fingerprint round'})")
    except (FederationPlanError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    for path, what in ((args.root_certificates, "--root-certificates"), (args.auth_key, "--auth-key"),
                       (Path(f"{args.auth_key}.pub"), "--auth-key's public key")):
        if not path.is_file():
            print(f"error: {what}: {path} does not exist (see docs/DEPLOYMENT.md, 'Site keys')")
            return 2
    if args.trusted_entities is not None:
        problem = _trusted_entities_problem(args.trusted_entities)
        if problem:
            print(f"error: --trusted-entities: {problem} (see docs/DEPLOYMENT.md, 'App signing')")
            return 2
    cmd = supernode_command(args.superlink, args.root_certificates, args.auth_key,
                            node_config(args.site, Path(plan.source), args.work, args.device), args.clientapp_port,
                            args.max_retries, args.trusted_entities)
    args.work.mkdir(parents=True, exist_ok=True)
    env = flower_env(args.flwr_home or args.work.resolve() / ".flwr", {})
    print(f"starting SuperNode for site {args.site} -> {args.superlink} (round folders in {args.work.resolve()})",
          flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
