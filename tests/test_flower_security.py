"""The local federation's keys and app signing (issue 16, item 6b): a PKI made without ``openssl`` or
``ssh-keygen``, owner-only files, stable keys on resume, signatures checked by Flower's own verification,
and (slow) a real loopback SuperLink + SuperNode that refuses unsigned and wrongly signed apps."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from nnunet_feddah.flower.launch import procs
from nnunet_feddah.flower.launch.flwr_cli import FlwrCli, flower_env, venv_bin
from nnunet_feddah.flower.launch.pki import (
    Pki,
    ensure_pki,
    make_signing_key,
    read_trusted_entities,
    sign_fab,
)
from nnunet_feddah.flower.launch.remote import SignedAppServer, build_fab, stage_app
from nnunet_feddah.flower.launch.supernode import supernode_command


@pytest.fixture
def bare_path(tmp_path, monkeypatch):
    """No ``openssl`` or ``ssh-keygen`` to be found, as on a slim machine."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("openssl") is None and shutil.which("ssh-keygen") is None
    return empty


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the PKI --------------------------------------------------------------------------------------------
def test_pki_is_made_without_openssl_and_the_ca_verifies_the_server_for_loopback(tmp_path, bare_path):
    pki = ensure_pki(tmp_path / "pki", ["a", "b"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    for host in (x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")), x509.DNSName("localhost")):
        verifier = x509.verification.PolicyBuilder().store(x509.verification.Store([ca])).build_server_verifier(host)
        assert verifier.verify(server, [])[0] == server
    other = ensure_pki(tmp_path / "other", [])
    stranger = x509.verification.PolicyBuilder().store(x509.verification.Store(
        [x509.load_pem_x509_certificate(other.ca_cert.read_bytes())])).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(x509.verification.VerificationError):
        stranger.verify(server, [])

    # and a real TLS handshake with Python's ssl (OpenSSL's own checks, hostname 127.0.0.1)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.recv(2) == b"ok"
    thread.join(10)
    listener.close()


def test_site_keys_are_openssh_ecdsa_p384_as_flower_reads_them(tmp_path, bare_path):
    pki = ensure_pki(tmp_path / "pki", ["a"])
    raw = pki.site_key("a").read_bytes()
    assert raw.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = load_ssh_private_key(raw, password=None)  # what flower-supernode --auth-supernode-private-key does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub_text = pki.site_public_key("a").read_text()
    assert pub_text.startswith("ecdsa-sha2-nistp384 ") and pub_text.rstrip().endswith(" feddah-a")
    public = load_ssh_public_key(pub_text.encode())  # what `flwr supernode register` does
    assert public.public_numbers() == key.public_key().public_numbers()


def test_pki_is_owner_only_also_when_an_older_version_left_it_readable(tmp_path, bare_path):
    folder = tmp_path / "pki"
    folder.mkdir(mode=0o755)
    (folder / "sites").mkdir(mode=0o755)
    pki = ensure_pki(folder, ["a"])
    pki.ca_cert.chmod(0o644)
    (folder / "sites").chmod(0o755)
    (folder / "node_ids.json").write_text("{}")
    (folder / "node_ids.json").chmod(0o644)
    ensure_pki(folder, ["a"])
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes["."] == 0o700 and modes["sites"] == 0o700, modes
    files = {k: v for k, v in modes.items() if (folder / k).is_file()}
    assert {"ca.crt", "ca.key", "server.key", "server.pem", "app_signing_key", "trusted_entities.yaml",
            "sites/a", "sites/a.pub", "node_ids.json"} <= set(files)
    assert set(files.values()) == {0o600}, files


def test_rerunning_keeps_every_key_and_remakes_only_what_is_missing(tmp_path, bare_path):
    folder = tmp_path / "pki"
    pki = ensure_pki(folder, ["a", "b"])
    first = _files(folder)
    assert _files(ensure_pki(folder, ["a", "b"]).folder) == first
    pki.server_cert.unlink()
    pki.site_public_key("b").unlink()
    ensure_pki(folder, ["a", "b", "c"])
    again = _files(folder)
    same = {"ca.crt", "ca.key", "sites/a", "sites/a.pub", "app_signing_key", "app_signing_key.pub",
            "trusted_entities.yaml"}
    assert all(again[k] == first[k] for k in same)
    assert again["server.pem"] != first["server.pem"] and again["sites/b"] != first["sites/b"]
    assert "sites/c" in again
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).verify_directly_issued_by(ca)


# --- app signing, checked by Flower's own code ----------------------------------------------------------
def _superlink_record(record: dict) -> dict[str, str]:
    """The verification dict the SuperLink stores with a Hub app (its own formatting function)."""
    from flwr.superlink.servicer.control.control_handlers import _format_verification

    return _format_verification([record])


def _supernode_accepts(fab: bytes, verifications: dict[str, str], trusted_entities: Path) -> bool:
    """The SuperNode's decision (``start_client_internal._pull_and_store_message``): a record must exist
    (``valid_license``) and one trusted key must verify it."""
    import hashlib

    from flwr.supercore.fab import Fab
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519
    from flwr.supernode.start_client_internal import _verify_fab

    entities = _try_obtain_trusted_entities(trusted_entities)
    _validate_public_keys_ed25519(entities)  # exits the SuperNode if a key is not Ed25519
    if not verifications.get("valid_license", ""):
        return False
    return _verify_fab(Fab(hashlib.sha256(fab).hexdigest(), fab, verifications), entities)


def test_signed_app_is_accepted_and_a_wrong_key_or_changed_app_is_refused(tmp_path, bare_path):
    pki = ensure_pki(tmp_path / "pki", [])
    key = load_ssh_private_key(pki.signing_key.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert list(read_trusted_entities(pki.trusted_entities).values()) == [
        " ".join(pki.signing_key.with_suffix(".pub").read_text().split()[:2])]
    fab = build_fab(stage_app(tmp_path / "app"))
    record = sign_fab(fab, pki.signing_key)
    assert _supernode_accepts(fab, _superlink_record(record), pki.trusted_entities)

    assert not _supernode_accepts(fab, {}, pki.trusted_entities)  # `flwr run <folder>`: no record at all
    assert not _supernode_accepts(fab + b"x", _superlink_record(record), pki.trusted_entities)  # changed app
    rogue = Pki(tmp_path / "rogue")
    make_signing_key(rogue)
    assert not _supernode_accepts(fab, _superlink_record(sign_fab(fab, rogue.signing_key)), pki.trusted_entities)
    forged = dict(sign_fab(fab, rogue.signing_key), public_key_id=record["public_key_id"])  # claims our key id
    assert not _supernode_accepts(fab, _superlink_record(forged), pki.trusted_entities)


def test_signed_app_server_speaks_the_hub_protocol_flowers_client_uses(tmp_path):
    from flwr.supercore.utils import request_download_link

    pki = ensure_pki(tmp_path / "pki", [])
    fab = build_fab(stage_app(tmp_path / "app"))
    server = SignedAppServer(fab, sign_fab(fab, pki.signing_key)).start()
    try:
        assert server.app_spec == "@nnunet-feddah/nnunet-feddah-app==0.1.0"
        url, verifications, _ = request_download_link(server.app_id, server.version, f"{server.url}/hub/fetch-fab",
                                                      "fab_url")
        import requests

        assert requests.get(url, timeout=10).content == fab
        assert _supernode_accepts(fab, _superlink_record(verifications[0]), pki.trusted_entities)
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@someone/else", "1.0.0", f"{server.url}/hub/fetch-fab", "fab_url")
    finally:
        server.close()


def test_supernodes_are_started_with_the_trusted_entities(tmp_path, capsys):
    pki = ensure_pki(tmp_path / "pki", ["a"])
    cmd = supernode_command("127.0.0.1:1", pki.ca_cert, pki.site_key("a"), {"site-name": "a"},
                            trusted_entities=pki.trusted_entities)
    assert cmd[cmd.index("--trusted-entities") + 1] == str(pki.trusted_entities.resolve())

    from nnunet_feddah.site import main

    bad = tmp_path / "bad.yaml"  # an ECDSA site key is not an app-signing key
    bad.write_text(f"fpk_x: '{pki.site_public_key('a').read_text().strip()}'\n")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "name": "x", "plans_identifier": "FedDAHPlansCPU", "rounds_per_step": 1, "nnunet_root": str(tmp_path),
        "sites": [{"name": "a", "dataset": 701, "stream": ["kidneys"]}],
        "local": {"epochs": 1, "iterations_per_epoch": 2}, "strategy": {"name": "feddah", "params": {}}}))
    code = main(["--plan", str(plan), "--site", "a", "--superlink", "127.0.0.1:1", "--root-certificates",
                 str(pki.ca_cert), "--auth-key", str(pki.site_key("a")), "--trusted-entities", str(bad),
                 "--no-check"])
    out = capsys.readouterr().out
    assert code == 2 and "--trusted-entities" in out and str(bad) in out and "Ed25519" in out, out


# --- real processes -------------------------------------------------------------------------------------
PROBE_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "probe"
version = "1.0.0"
dependencies = ["flwr==1.41.0"]

[tool.flwr.app]
publisher = "feddahtest"

[tool.flwr.app.components]
serverapp = "probe:server"
clientapp = "probe:client"

[tool.flwr.app.config]
out = ""
marker = ""
"""

PROBE_APP = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes, end = [], time.time() + 60
    while not nodes and time.time() < end:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=nodes[0], message_type="query")
    replies = list(grid.send_and_receive([msg], timeout=60))
    Path(context.run_config["out"]).write_text(json.dumps(
        [{"error": r.has_error(), "reason": r.error.reason if r.has_error() else ""} for r in replies]))


@client.query()
def query(msg: Message, context: Context) -> Message:
    Path(context.run_config["marker"]).write_text("ClientApp code ran")
    return Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)
'''


@pytest.mark.slow
def test_supernode_refuses_unsigned_and_wrongly_signed_apps(tmp_path):
    """A real SuperLink and SuperNode on loopback, started as ``--local`` starts them: ``flwr run <folder>``
    (what any local user can send to the Control API) and an app signed by another key get an error reply
    and their ClientApp never runs; the same app signed with the federation's key runs."""
    pki = ensure_pki(tmp_path / "pki", ["a"])
    app = tmp_path / "probe"
    app.mkdir()
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "probe.py").write_text(PROBE_APP)
    fab = build_fab(app)
    rogue = Pki(tmp_path / "rogue")
    make_signing_key(rogue)
    server = SignedAppServer(fab, sign_fab(fab, rogue.signing_key)).start()
    port = procs.free_port()
    started = []
    try:
        started.append(procs.spawn([
            str(venv_bin() / "flower-superlink"), "--ssl-certfile", str(pki.server_cert), "--ssl-keyfile",
            str(pki.server_key), "--ssl-ca-certfile", str(pki.ca_cert), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            flower_env(tmp_path / "home" / "superlink", {"FLWR_SUPERGRID_API_URL": server.url,
                                                         "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}),
            tmp_path / "superlink.log"))
        end = time.time() + 60
        while not procs.https_ready(f"https://127.0.0.1:{port}/", pki.ca_cert):
            assert time.time() < end and started[0].poll() is None, (tmp_path / "superlink.log").read_text()[-3000:]
            time.sleep(0.3)
        cli = FlwrCli(tmp_path / "home" / "cli", f"127.0.0.1:{port}", pki.ca_cert)
        node_id = cli.register(pki.site_public_key("a"), "a")
        started.append(procs.spawn(supernode_command(cli.address, pki.ca_cert, pki.site_key("a"), {"site-name": "a"},
                                                     procs.free_port(), trusted_entities=pki.trusted_entities),
                                   flower_env(tmp_path / "home" / "supernode"), tmp_path / "supernode.log"))
        end = time.time() + 60
        while cli.node_status().get(node_id) != "online":
            assert time.time() < end and started[1].poll() is None, (tmp_path / "supernode.log").read_text()[-3000:]
            time.sleep(0.5)

        def run(app_ref, name: str) -> tuple[list, bool]:
            out, marker = tmp_path / f"{name}.json", tmp_path / f"{name}.marker"
            run_id = cli.run(app_ref, {"out": str(out), "marker": str(marker)})
            end = time.time() + 120
            while not cli.status(run_id).startswith("finished:"):
                assert time.time() < end, f"run {name} did not finish: {cli.log_text(run_id)[-3000:]}"
                time.sleep(1)
            assert out.is_file(), cli.log_text(run_id)[-3000:]
            return json.loads(out.read_text()), marker.exists()

        replies, ran = run(app, "unsigned")
        assert not ran and replies and replies[0]["error"], replies
        replies, ran = run(server.app_spec, "rogue-signed")
        assert not ran and replies and replies[0]["error"], replies
        assert server.fetches >= 1  # the SuperLink did fetch the wrongly signed app; the SuperNode refused it
        log = (tmp_path / "supernode.log").read_text()
        assert "could not be verified" in log and "FAB verification failed" in log, log[-3000:]

        server.verification = sign_fab(fab, pki.signing_key)
        replies, ran = run(server.app_spec, "signed")
        assert ran and replies and not replies[0]["error"], replies
    finally:
        for proc in reversed(started):
            procs.end_process(proc, grace_s=2)
        server.close()
