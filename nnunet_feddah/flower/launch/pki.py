"""Certificates and site keys for a federation, made with the ``openssl`` and ``ssh-keygen`` command lines.

Every file is created only if missing, so a resumed federation keeps its CA (sites keep trusting the
SuperLink) and its site keys (a SuperNode's identity — and node id — is its key). For a real deployment
the same commands are spelled out in ``docs/DEPLOYMENT.md``; there the CA key belongs offline and each
site makes its own key and sends only the ``.pub`` file.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DAYS = 365


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def site_key(self, site: str) -> Path:
        """The site's ECDSA private key (``ssh-keygen`` format); the public key is ``<key>.pub``."""
        return self.folder / "sites" / site

    def site_public_key(self, site: str) -> Path:
        return self.folder / "sites" / f"{site}.pub"


def _run(cmd: list[str], cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}: {out.stderr.strip()[-1000:]}")


def make_server_certificates(pki: Pki, hosts: Iterable[str] = ("127.0.0.1", "localhost"), days: int = DAYS) -> None:
    """A CA and a server certificate signed by it, valid for ``hosts`` (IP addresses or DNS names)."""
    d = pki.folder
    d.mkdir(parents=True, exist_ok=True)
    if not pki.ca_cert.is_file():
        _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days), "-subj",
              "/CN=nnunet-feddah-ca", "-keyout", "ca.key", "-out", "ca.crt"], d)
        (d / "ca.key").chmod(0o600)
    if not pki.server_cert.is_file() or not pki.server_key.is_file():
        hosts = list(hosts)
        san = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
        (d / "server.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
        _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={hosts[0]}", "-keyout",
              "server.key", "-out", "server.csr"], d)
        _run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
              "-CAcreateserial", "-days", str(days), "-extfile", "server.ext", "-out", "server.pem"], d)
        pki.server_key.chmod(0o600)


def make_site_key(path: Path, comment: str) -> Path:
    """An ECDSA P-384 key pair for one SuperNode (``path`` and ``path.pub``); kept if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or not Path(f"{path}.pub").is_file():
        path.unlink(missing_ok=True)
        Path(f"{path}.pub").unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", comment, "-f", str(path)], path.parent)
    return path


def ensure_pki(folder: Path, sites: Iterable[str]) -> Pki:
    """Loopback CA + server certificate and one key per site, creating only what is missing."""
    pki = Pki(Path(folder))
    make_server_certificates(pki)
    for site in sites:
        make_site_key(pki.site_key(site), f"feddah-{site}")
    return pki


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
