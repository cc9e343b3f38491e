"""Certificates, site keys and the app-signing key of a federation, made with the ``cryptography`` package.

``cryptography`` is already a Flower dependency, so ``--local`` needs no ``openssl`` or ``ssh-keygen``
program (a slim machine has neither) and no subprocess. Every file is created only if missing, so a
resumed federation keeps its CA (sites keep trusting the SuperLink), its site keys (a SuperNode's identity
— and node id — is its key) and its signing key (the SuperNodes' trusted entity).

Everything under ``pki/`` is owner-only (folder 0700, files 0600), the CA certificate and public keys
included: another local user who could read the CA certificate and the SuperLink's address learns where
the unauthenticated Control API is, and one who could *replace* a file (a looser folder) could swap a key.

For a real deployment ``docs/DEPLOYMENT.md`` spells out the same steps; there the CA key and the
app-signing key belong offline and each site makes its own key and sends only the ``.pub`` file.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nnunet_feddah.atomic import atomic_write_bytes

DAYS = 365
FOLDER_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def site_key(self, site: str) -> Path:
        """The site's ECDSA P-384 private key (OpenSSH format); the public key is ``<key>.pub``."""
        return self.folder / "sites" / site

    def site_public_key(self, site: str) -> Path:
        return self.folder / "sites" / f"{site}.pub"

    @property
    def signing_key(self) -> Path:
        """Ed25519 key (OpenSSH format) that signs the app every SuperNode accepts; ``.pub`` beside it."""
        return self.folder / "app_signing_key"

    @property
    def trusted_entities(self) -> Path:
        """``flower-supernode --trusted-entities`` file: ``{key id: 'ssh-ed25519 ...'}`` (YAML = this JSON)."""
        return self.folder / "trusted_entities.yaml"


# --- owner-only files -------------------------------------------------------------------------------------
def private_folder(folder: Path) -> Path:
    """``folder`` (and missing parents) with mode 0700, also when it already existed with a looser mode."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(FOLDER_MODE)
    return folder


def _new_folder(folder: Path) -> None:
    """A missing folder is made 0700; an existing one is left alone (it may be the user's working folder)."""
    if not folder.is_dir():
        private_folder(folder)


def write_private(path: Path, data: bytes | str) -> Path:
    """Write ``path`` atomically, mode 0600 from the first byte (no window in which others can read it)."""
    _new_folder(path.parent)
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data, FILE_MODE)
    return path


def tighten(folder: Path) -> None:
    """Folders 0700 and files 0600 under ``folder`` (a pki/ made by an older version was world-readable)."""
    private_folder(folder)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(FOLDER_MODE if path.is_dir() else FILE_MODE)


# --- TLS: CA and server certificate -----------------------------------------------------------------------
def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key (delete it and the certificates it signed to "
                         f"have them made again)")
    return key


def _make_ca(pki: Pki, days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("nnunet-feddah-ca")).issuer_name(_name("nnunet-feddah-ca"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    write_private(pki.ca_key, _pem_key(key))
    write_private(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _make_server(pki: Pki, hosts: list[str], days: int) -> None:
    ca_key = _load_pem_key(pki.ca_key)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write_private(pki.server_key, _pem_key(key))
    write_private(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def make_server_certificates(pki: Pki, hosts: Iterable[str] = ("127.0.0.1", "localhost"), days: int = DAYS) -> None:
    """A CA and a server certificate signed by it, valid for ``hosts`` (IP addresses or DNS names).

    A missing CA key with a present CA certificate cannot sign a new server certificate: then both are made
    again (the SuperNodes of a local federation are given the new CA certificate at their next start).
    """
    private_folder(pki.folder)
    hosts = list(hosts)
    need_server = not pki.server_cert.is_file() or not pki.server_key.is_file()
    if not pki.ca_cert.is_file() or (need_server and not pki.ca_key.is_file()):
        _make_ca(pki, days)
        need_server = True  # the old server certificate was signed by the CA just replaced
    if need_server:
        _make_server(pki, hosts, days)


# --- OpenSSH keys: site identities and the app-signing key ------------------------------------------------
def _write_ssh_pair(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, comment: str) -> None:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    write_private(Path(f"{path}.pub"), public + f" {comment}\n".encode())


def make_site_key(path: Path, comment: str) -> Path:
    """An ECDSA P-384 key pair for one SuperNode (``path`` and ``path.pub``, the format ``ssh-keygen -t ecdsa
    -b 384`` writes and ``flower-supernode --auth-supernode-private-key`` / ``flwr supernode register`` read);
    kept if both exist."""
    _new_folder(path.parent)
    if not path.is_file() or not Path(f"{path}.pub").is_file():
        _write_ssh_pair(path, ec.generate_private_key(ec.SECP384R1()), comment)
    return path


def public_key_line(path: Path) -> str:
    """``ssh-ed25519 AAAA...`` of an OpenSSH private key file (no comment)."""
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def key_id(public_line: str) -> str:
    """Flower's trusted-entity id (``fpk_<uuid>``), derived from the key so the same key keeps its id."""
    return "fpk_" + str(uuid.UUID(bytes=hashlib.sha256(public_line.split()[1].encode()).digest()[:16]))


def make_signing_key(pki: Pki, comment: str = "feddah-app-signing") -> Path:
    """The Ed25519 app-signing key (Flower verifies app signatures with Ed25519 only) and the
    ``trusted_entities.yaml`` that names its public key; both kept if they exist."""
    path = pki.signing_key
    if not path.is_file() or not Path(f"{path}.pub").is_file():
        _write_ssh_pair(path, ed25519.Ed25519PrivateKey.generate(), comment)
        pki.trusted_entities.unlink(missing_ok=True)
    if not pki.trusted_entities.is_file():
        line = public_key_line(path)
        write_private(pki.trusted_entities, json.dumps({key_id(line): line}, indent=1) + "\n")  # JSON is YAML
    return path


def sign_fab(fab: bytes, key_path: Path, signed_at: int | None = None) -> dict[str, str | int]:
    """One Flower Hub style verification record for ``fab``: what a SuperNode with ``--trusted-entities``
    checks (Ed25519 over 8-byte big-endian ``signed_at`` + SHA-256 of the FAB, see
    ``flwr/supernode/start_client_internal.py::_verify_fab``)."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key_path}: the app-signing key must be an Ed25519 OpenSSH private key "
                         f"(make one with `ssh-keygen -t ed25519 -f {key_path.name}`)")
    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    signature = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return {"public_key_id": key_id(public_key_line(key_path)), "signed_at": signed_at,
            "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")}


def read_trusted_entities(path: Path) -> Mapping[str, str]:
    """The ``{key id: public key}`` map of a trusted-entities file, as the SuperNode reads it (YAML)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of key ids to 'ssh-ed25519 ...' public keys")
    return data


# --- all of it --------------------------------------------------------------------------------------------
def ensure_pki(folder: Path, sites: Iterable[str]) -> Pki:
    """Loopback CA + server certificate, one key per site and the app-signing key, creating only what is
    missing; then every folder 0700 and every file 0600."""
    pki = Pki(Path(folder))
    make_server_certificates(pki)
    for site in sites:
        make_site_key(pki.site_key(site), f"feddah-{site}")
    make_signing_key(pki)
    tighten(pki.folder)
    return pki


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
