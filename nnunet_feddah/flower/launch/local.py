"""A whole federation on this machine: TLS SuperLink, one authenticated SuperNode per site, one signed app.

The SuperNodes run only apps signed with this federation's key (``--trusted-entities``), and the launcher
hands the SuperLink its app signed, through a loopback stand-in for the Flower Hub
(:class:`~.remote.SignedAppServer`): the Control API has no authentication in open-source Flower 1.41, so
a run another local user submits reaches the SuperNodes but none of its code runs there.

Everything lives under the state folder, so a crashed launcher can be started again on it and resume:
``pki/`` (CA, server certificate, site keys — same keys, same node ids — and the app-signing key; owner
only), ``flower/superlink.db``
(registrations survive), ``flower/home/*`` (private FLWR_HOMEs; ``~/.flwr`` is never touched),
``flower/logs/`` and ``launcher.json`` (the launch id and pids, so the next launcher ends the previous
one's leftovers and stops its unfinished run before starting a new one). SuperNodes that exit are
restarted: a SIGKILLed SuperNode can only re-activate once the SuperLink has given up on it (≤ 60 s).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation.logfile import COORDINATOR_LOG
from nnunet_feddah.federation.plan import FederationPlan
from nnunet_feddah.flower.launch import procs
from nnunet_feddah.flower.launch.flwr_cli import FINISHED, FlwrCli, flower_env, venv_bin
from nnunet_feddah.flower.launch.logtail import LogTail, stamped
from nnunet_feddah.flower.launch.pki import Pki, ensure_pki, sign_fab, write_private
from nnunet_feddah.flower.launch.remote import SignedAppServer, build_fab, stage_app, watch_run
from nnunet_feddah.flower.launch.supernode import node_config, supernode_command

LAUNCH_FILE = "launcher.json"


class LaunchError(FedDAHError, RuntimeError):
    """The local federation could not be started."""


class LocalFederation:
    """Start with :meth:`start`, then :meth:`run`; :meth:`close` (or ``with``) ends every process."""

    def __init__(self, plan: FederationPlan, state_dir: Path, work_dir: Path, device: str = "cpu",
                 log: Callable[[str], None] = stamped, run_config: dict[str, Any] | None = None) -> None:
        self.plan, self.device, self.log = plan, device, log
        self.state = Path(state_dir).resolve()
        self.work = Path(work_dir).resolve()
        self.flower = self.state / "flower"
        self.extra_config = dict(run_config or {})
        self.launch_id = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, float] = {}  # site -> when its SuperNode was last started
        self.failures: dict[str, int] = {}  # site -> quick SuperNode exits in a row
        self._ended: dict[str, float] = {}  # site -> when its SuperNode was seen dead
        self._guardian: subprocess.Popen | None = None
        self.node_ids: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.run_id: int | None = None
        self.cli: FlwrCli | None = None
        self.pki: Pki | None = None
        self.app: SignedAppServer | None = None
        self._lock = None
        self._closing = False

    # --- start-up -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        previous = self._read_launch_file()
        if previous.get("launch_id"):
            left = procs.end_marked(previous["launch_id"])
            if left:
                self.log(f"ended {len(left)} process(es) left over from the previous launcher")
        (self.flower / "logs").mkdir(parents=True, exist_ok=True)
        self._start_guardian()
        t0 = time.time()
        self.pki = ensure_pki(self.state / "pki", self.plan.site_names)
        self.timings["pki_s"] = time.time() - t0
        self._serve_signed_app()
        t0 = time.time()
        port = procs.free_port()
        address = f"127.0.0.1:{port}"
        # --host 127.0.0.1: the Fleet, Control and Runtime APIs share this one port (1.41 ignores
        # --control-api-address), so loopback keeps the unauthenticated Control API off the network.
        self._spawn("superlink", [
            str(venv_bin() / "flower-superlink"), "--ssl-certfile", str(self.pki.server_cert),
            "--ssl-keyfile", str(self.pki.server_key), "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--database", str(self.flower / "superlink.db"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            {"FLWR_SUPERGRID_API_URL": self.app.url, "NO_PROXY": "127.0.0.1,localhost",
             "no_proxy": "127.0.0.1,localhost"})
        self._wait(lambda: procs.https_ready(f"https://{address}/", self.pki.ca_cert), 60, "the SuperLink")
        self.timings["superlink_start_s"] = time.time() - t0
        self.cli = FlwrCli(self.flower / "home" / "cli", address, self.pki.ca_cert)
        if previous.get("run_id") is not None:
            self._stop_stale_run(int(previous["run_id"]))
        t0 = time.time()
        self._register()
        self.timings["register_s"] = time.time() - t0
        t0 = time.time()
        for site in self.plan.site_names:
            self._start_supernode(site)
        self._wait(self._all_online, 150, "every SuperNode online", step=1.0)
        self.timings["supernodes_online_s"] = time.time() - t0
        self._write_launch_file()
        self.log("local federation up: SuperLink " + address + ", sites " + ", ".join(
            f"{s} (node {self.node_ids.get(s, '?')})" for s in self.plan.site_names) + " | start-up " + ", ".join(
            f"{k} {v:.1f}s" for k, v in self.timings.items()))

    def _serve_signed_app(self) -> None:
        """Pack the app, sign it with ``pki/app_signing_key`` and serve it to the SuperLink on loopback."""
        t0 = time.time()
        fab = build_fab(stage_app(self.flower / "app"))
        verification = sign_fab(fab, self.pki.signing_key)
        write_private(self.flower / "app.fab", fab)  # what the sites were asked to run, for the record
        self.app = SignedAppServer(fab, verification).start()
        self.timings["sign_app_s"] = time.time() - t0

    def _take_lock(self, wait_s: float = 30.0) -> None:
        """One launcher per state folder; waits a little for a dead launcher's guardian to finish tearing down."""
        self._lock = open(self.state / "launcher.lock", "a+")
        end = time.time() + wait_s
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.time() > end:
                    raise LaunchError(f"another launcher is running on {self.state} (see "
                                      f"{self.state / LAUNCH_FILE})") from None
                time.sleep(0.5)

    def _start_guardian(self) -> None:
        """Orderly teardown even if this process is SIGKILLed (see :mod:`.guardian`)."""
        log = open(self.flower / "logs" / "guardian.log", "ab")
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "nnunet_feddah.flower.launch.guardian", str(self.state), self.launch_id],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(self._lock.fileno(),),
            start_new_session=True)
        log.close()

    def _register(self) -> None:
        ids_file = self.state / "pki" / "node_ids.json"
        known = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        for site in self.plan.site_names:
            node_id = self.cli.register(self.pki.site_public_key(site), site)
            if node_id is not None:
                known[site] = node_id
        write_private(ids_file, json.dumps(known, indent=1))
        self.node_ids = {s: int(v) for s, v in known.items() if s in self.plan.site_names}

    def _all_online(self) -> bool:
        status = self.cli.node_status()
        if len(self.node_ids) == len(self.plan.site_names):
            return all(status.get(n) == "online" for n in self.node_ids.values())
        return sum(v == "online" for v in status.values()) >= len(self.plan.site_names)

    def _stop_stale_run(self, run_id: int) -> None:
        """A killed launcher's run is still 'running' in the database; its queued messages must not be served."""
        try:
            if not self.cli.status(run_id).startswith(FINISHED) and self.cli.stop(run_id):
                self.log(f"stopped run {run_id} of the previous launcher")
        except Exception as exc:  # an unknown run id is fine: nothing to stop
            self.log(f"previous run {run_id}: {exc}")

    # --- processes ------------------------------------------------------------------------------------
    def _env(self, home: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return flower_env(self.flower / "home" / home, {procs.MARKER: self.launch_id, **(extra or {})})

    def _spawn(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> None:
        self.procs[name] = procs.spawn(cmd, self._env(name, extra_env), self.flower / "logs" / f"{name}.log")
        self._write_launch_file()

    def _start_supernode(self, site: str) -> None:
        assert self.cli is not None and self.pki is not None
        cmd = supernode_command(self.cli.address, self.pki.ca_cert, self.pki.site_key(site),
                                node_config(site, Path(self.plan.source), self.work, self.device),
                                procs.free_port(), max_retries=3, trusted_entities=self.pki.trusted_entities)
        threads = str(max(1, (os.cpu_count() or 1) // len(self.plan.site_names)))  # sites share these cores
        self._spawn(f"supernode-{site}", cmd, {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)})
        self.restarts[site] = time.time()

    def supervise(self) -> None:
        """Restart SuperNodes that exited (crash, kill): after 5 s, then every 10 s while they keep failing.

        A SIGKILLed SuperNode's successor is refused until the SuperLink marks the old one offline (30–60 s
        after the kill); retrying every 10 s lets the site rejoin soon after, while the round is running.
        """
        for site in self.plan.site_names:
            proc = self.procs.get(f"supernode-{site}")
            if proc is None or proc.poll() is None or self._closing:
                continue
            started = self.restarts.get(site, 0.0)
            quick = self._ended.setdefault(site, time.time()) - started < 60
            wait = min(10.0, 5.0 * 2 ** self.failures.get(site, 0)) if quick else 0.0
            if time.time() - self._ended[site] < wait:
                continue
            self.failures[site] = self.failures.get(site, 0) + 1 if quick else 0
            self.log(f"SuperNode of site {site} exited (code {proc.returncode}); restarting it")
            procs.end_group(proc.pid, grace_s=1)
            del self._ended[site]
            self._start_supernode(site)

    def close(self) -> None:
        """Stop the run if unfinished, then end every process group; idempotent."""
        if self._closing:
            return
        self._closing = True
        if self.cli is not None and self.run_id is not None:
            try:
                if not self.cli.status(self.run_id).startswith(FINISHED):
                    self.cli.stop(self.run_id)
            except Exception:  # the SuperLink may already be gone
                pass
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            if name in self.procs:
                procs.end_process(self.procs.pop(name))
        procs.end_marked(self.launch_id, grace_s=2)
        if self.app is not None:
            self.app.close()
        if self._guardian is not None:
            self._guardian.stdin.close()  # the guardian finds nothing left and exits
            try:
                self._guardian.wait(15)
            except subprocess.TimeoutExpired:
                self._guardian.kill()
        if self._lock is not None:
            self._lock.close()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- the run --------------------------------------------------------------------------------------
    def run(self, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
        """``flwr run`` the signed app with this federation's config; returns the final run status."""
        assert self.cli is not None and self.app is not None
        config = {"plan": str(Path(self.plan.source).resolve()), "state-dir": str(self.state),
                  "work-dir": str(self.work), "device": self.device, **self.extra_config}
        tail = LogTail(self.state / COORDINATOR_LOG)
        started = time.time()
        self.run_id = self.cli.run(self.app.app_spec, config)
        self._write_launch_file()
        self.log(f"flwr run: run {self.run_id} submitted in {time.time() - started:.1f}s")
        status = watch_run(self.cli, self.run_id, tail, self.supervise, poll_s, timeout_s)
        (self.flower / "logs" / f"run-{self.run_id}.log").write_text(self.cli.log_text(self.run_id))
        self.log(f"run {self.run_id}: {status} after {time.time() - started:.1f}s")
        return status

    # --- bookkeeping ----------------------------------------------------------------------------------
    def _read_launch_file(self) -> dict[str, Any]:
        path = self.state / LAUNCH_FILE
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}

    def _write_launch_file(self) -> None:
        info = {"launch_id": self.launch_id, "launcher_pid": os.getpid(), "run_id": self.run_id,
                "superlink": self.cli.address if self.cli else None,
                "root_certificates": str(self.pki.ca_cert) if self.pki else None,
                "processes": {n: p.pid for n, p in self.procs.items()}, "node_ids": self.node_ids,
                "timings": self.timings}
        tmp = self.state / f".{LAUNCH_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(self.state / LAUNCH_FILE)

    def _wait(self, predicate: Callable[[], bool], timeout_s: float, what: str, step: float = 0.3) -> None:
        end = time.time() + timeout_s
        while time.time() < end:
            if predicate():
                return
            superlink = self.procs.get("superlink")
            if superlink is not None and superlink.poll() is not None:
                raise LaunchError(f"the SuperLink exited (code {superlink.returncode}) while waiting for {what}; "
                                  f"see {self.flower / 'logs' / 'superlink.log'}")
            self.supervise()  # a SuperNode refused because its killed predecessor still counts as online
            time.sleep(step)
        raise LaunchError(f"timed out after {timeout_s:.0f} s waiting for {what}; see {self.flower / 'logs'}")

