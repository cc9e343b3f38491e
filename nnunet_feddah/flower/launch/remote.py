"""Start a run on a SuperLink and follow it until it finishes (deployment mode of ``coordinate``), and
serve a signed app to a SuperLink (:class:`SignedAppServer`).

The coordinator runs as the SuperLink's ServerApp, so it keeps going if this command is interrupted:
Ctrl-C only stops *watching* (the command to stop the run is printed). A second run on the same state
folder is refused while the first is still running — the ServerApp's state lock would refuse it anyway,
but only after Flower had started it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nnunet_feddah.errors import run_cli
from nnunet_feddah.federation.logfile import COORDINATOR_LOG
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.flower import app_dir
from nnunet_feddah.flower.launch.flwr_cli import COMPLETED, FINISHED, FlwrCli, FlwrCliError
from nnunet_feddah.flower.launch.logtail import LogTail

STATUS_EVERY_S = 15.0  # `flwr ls` costs a Python start-up; the coordinator log is checked every second
REMOTE_FILE = "remote_run.json"


def stage_app(folder: Path) -> Path:
    """A clean copy of the app directory to pack (the installed package may be read-only).

    Owner-only like everything in a state folder: copytree would copy the package's 0755/0644 modes."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(app_dir(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    return folder


def build_fab(app: Path) -> bytes:
    """The FAB ``flwr run <app>`` would build (Flower's own builder), to be signed and served."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app))


class SignedAppServer:
    """A loopback stand-in for the two Flower Hub endpoints a SuperLink calls to fetch an app, serving one
    FAB with its signature.

    Why: in Flower 1.41 a SuperNode started with ``--trusted-entities`` runs only FABs that carry a
    verification record, and the SuperLink attaches such records *only* to apps it fetched from the Hub
    (``flwr run @publisher/app==x.y.z``; ``control_handlers.start_run`` → ``_get_remote_fab``). A FAB sent
    by ``flwr run <folder>`` gets no record (``flwr/cli/run/run.py``: ``Fab(fab_hash, fab_bytes, {})``),
    so every SuperNode refuses it. The SuperLink finds the Hub at ``FLWR_SUPERGRID_API_URL``
    (``flwr/supercore/constant.py``); pointing it at :attr:`url` makes our signed app the only one the
    SuperNodes accept — the signature, not this server, is what they check, so another local user who
    talks to this server only gets the same signed app.
    """

    def __init__(self, fab: bytes, verification: Mapping[str, Any], host: str = "127.0.0.1", port: int = 0):
        from flwr.cli.config_utils import get_fab_metadata

        self.fab, self.verification = fab, dict(verification)
        fab_id, self.version = get_fab_metadata(fab)
        self.app_id = f"@{fab_id}"
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    request = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    request = {}
                if self.path != "/v1/hub/fetch-fab" or request.get("app_id") != outer.app_id or \
                        request.get("app_version") not in (None, outer.version):
                    self._send(404, json.dumps({"detail": f"only {outer.app_spec} is served here"}).encode())
                    return
                host, port = self.server.server_address[:2]
                self._send(200, json.dumps({"fab_url": f"http://{host}:{port}/fab",
                                            "verifications": [outer.verification]}).encode())

            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/fab":
                    self._send(404, b'{"detail": "not found"}')
                    return
                outer.fetches += 1
                self._send(200, outer.fab, "application/octet-stream")

            def log_message(self, *_: object) -> None:  # quiet: the SuperLink log shows the fetch
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="signed-app-server", daemon=True)

    @property
    def url(self) -> str:
        """The value for the SuperLink's ``FLWR_SUPERGRID_API_URL``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def app_spec(self) -> str:
        """What ``flwr run`` is given instead of a folder: ``@publisher/name==version``."""
        return f"{self.app_id}=={self.version}"

    def start(self) -> SignedAppServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def watch_run(cli: FlwrCli, run_id: int, tail: LogTail, tick: Callable[[], None] = lambda: None,
              poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Print the coordinator log while the run lasts; returns Flower's final status (``finished:...``)."""
    started, last_check = time.time(), 0.0
    while True:
        tick()
        final = tail.poll()
        if final or time.time() - last_check > STATUS_EVERY_S:
            status, last_check = cli.status(run_id), time.time()
            if status.startswith(FINISHED):
                tail.poll()
                return status
        if timeout_s is not None and time.time() - started > timeout_s:
            raise TimeoutError(f"run {run_id} not finished after {timeout_s:.0f} s")
        time.sleep(poll_s)


def run_remote(plan: FederationPlan, state: Path, superlink: str, root_certificates: Path,
               plans_file: Path | None, work: Path | None, max_change: float | None,
               app_spec: str | None = None, training_cases: str = "") -> bool:
    """``app_spec`` (``@nnunet-feddah/nnunet-feddah-app==x.y.z``): run the signed app the SuperLink fetches
    from its app server (``serve`` below) — needed when the sites run with ``--trusted-entities``; without
    it the installed app folder is sent unsigned."""
    cli = FlwrCli(state / "flower" / "home" / "cli", superlink, root_certificates)
    record = state / REMOTE_FILE
    previous = json.loads(record.read_text()).get("run_id") if record.is_file() else None
    if previous is not None:
        try:
            running = not cli.status(int(previous)).startswith(FINISHED)
        except FlwrCliError:  # unknown to this SuperLink (e.g. a new database): nothing is running
            running = False
        if running:
            raise RuntimeError(f"run {previous} on {superlink} is still running on this state folder; follow "
                               f"{state / COORDINATOR_LOG} or stop it: FLWR_HOME={cli.home} flwr stop {previous}")
    config: dict[str, str | float] = {"plan": str(Path(plan.source).resolve()), "state-dir": str(state),
                                      "work-dir": str(work or "")}
    if plans_file is not None:
        config["plans-file"] = str(plans_file.resolve())
    if max_change is not None:
        config["max-relative-change"] = max_change
    if training_cases:
        config["training-cases"] = training_cases
    tail = LogTail(state / COORDINATOR_LOG)
    run_id = cli.run(app_spec or stage_app(state / "flower" / "app"), config)
    record.write_text(json.dumps({"run_id": run_id, "superlink": superlink}))
    print(f"run {run_id} started on {superlink}; stop it with: FLWR_HOME={cli.home} flwr stop {run_id}", flush=True)
    try:
        status = watch_run(cli, run_id, tail, poll_s=2.0)
    except KeyboardInterrupt:
        print(f"stopped watching; run {run_id} goes on (coordinator log: {state / COORDINATOR_LOG})")
        return False
    print(f"run {run_id}: {status}")
    return status == COMPLETED


# --- signing for a real deployment: python -m nnunet_feddah.flower.launch.remote build|sign|trust|serve ----
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnunet_feddah.flower.launch.remote",
                                description="Build, sign and serve the FedDAH app for SuperNodes that run only "
                                            "signed apps (docs/DEPLOYMENT.md, 'App signing').")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pack the installed app into a FAB file")
    b.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("sign", help="sign a FAB (on the machine that holds the signing key)")
    s.add_argument("--fab", type=Path, required=True)
    s.add_argument("--key", type=Path, required=True, help="Ed25519 OpenSSH private key")
    s.add_argument("--out", type=Path, required=True, help="signature record (JSON) to write")
    t = sub.add_parser("trust", help="write a --trusted-entities file for the sites from a signing key's .pub")
    t.add_argument("--pub", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("serve", help="serve a signed FAB to the SuperLink (set its FLWR_SUPERGRID_API_URL)")
    v.add_argument("--fab", type=Path, required=True)
    v.add_argument("--signature", type=Path, required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=9095)
    return p


def main(argv: list[str] | None = None) -> int:
    from nnunet_feddah.flower.launch.pki import key_id, sign_fab, write_private

    args = _parser().parse_args(argv)

    def run() -> None:
        if args.command == "build":
            with tempfile.TemporaryDirectory() as tmp:
                args.out.write_bytes(build_fab(stage_app(Path(tmp) / "app")))
            print(f"{args.out}: {hashlib.sha256(args.out.read_bytes()).hexdigest()}")
        elif args.command == "sign":
            record = sign_fab(args.fab.read_bytes(), args.key)
            args.out.write_text(json.dumps(record, indent=1) + "\n")
            print(f"{args.out}: signed by {record['public_key_id']}")
        elif args.command == "trust":
            line = " ".join(args.pub.read_text().split()[:2])
            if not line.startswith("ssh-ed25519 "):
                raise ValueError(f"{args.pub}: not an Ed25519 public key ('ssh-ed25519 AAAA...'); make the signing "
                                 f"key with `ssh-keygen -t ed25519`")
            write_private(args.out, json.dumps({key_id(line): line}, indent=1) + "\n")
            print(f"{args.out}: give it to every site (python -m nnunet_feddah.site --trusted-entities {args.out})")
        else:
            server = SignedAppServer(args.fab.read_bytes(), json.loads(args.signature.read_text()), args.host,
                                     args.port).start()
            print(f"serving {server.app_spec}: start flower-superlink with FLWR_SUPERGRID_API_URL={server.url} "
                  f"and run `flwr run {server.app_spec} ...`", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                server.close()

    return run_cli("python -m nnunet_feddah.flower.launch.remote", run)

if __name__ == "__main__":
    sys.exit(main())
