"""Development and test PKI: three CAs and their leaf certificates (ECDSA P-256, SHA-256).

Layout of a PKI directory (``gatewayctl pki init``)::

    device-ca        signs device (tablet/PC) client certificates
    gateway-ca       signs the gateway's server and client certificates
    upstream-ca      stands in for J-LIS / a contractor; signs upstream server certificates
    gateway-server   server auth; SAN localhost, 127.0.0.1, ::1 (+ extra hostnames)
    gateway-client   client auth, CN "gateway"
    upstream-<name>  server auth per upstream; SAN localhost, 127.0.0.1, ::1
    device-<id>      client auth per device, CN = device id

Each name has ``<name>.pem`` (certificate, 0644) and ``<name>.key`` (PKCS#8 PEM,
unencrypted, 0600, written atomically). ``pki.json`` lists the device ids and upstream
names only; it is written last, so a directory with it is complete.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import GatewayError
from gateway.fsutil import write_atomic

__all__ = [
    "MANIFEST",
    "Issued",
    "PkiError",
    "PkiExistsError",
    "PkiLayout",
    "cert_fingerprint",
    "init_pki",
    "issue_device",
    "load_cert_der",
    "load_layout",
    "spki_sha256_b64",
]

MANIFEST = "pki.json"
_MANIFEST_VERSION = 1
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_NAME_RULE = "must match ^[a-z0-9][a-z0-9._-]{0,62}$"
_ORG = "Gateway Development PKI"

_CA_LIFETIME = timedelta(days=3650)
_SERVER_LIFETIME = timedelta(days=397)
_CLIENT_LIFETIME = timedelta(days=825)
_BACKDATE = timedelta(minutes=5)
_LOOPBACK_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


class PkiError(GatewayError):
    """A PKI directory or file is missing, unreadable, or inconsistent."""


class PkiExistsError(PkiError, FileExistsError):
    """``init_pki`` would overwrite an existing PKI (or a device already exists)."""


# --------------------------------------------------------------------------- helpers


def cert_fingerprint(cert_der: bytes) -> str:
    """``sha256:`` + lowercase hex SHA-256 of the certificate DER (device registry key)."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


def spki_sha256_b64(cert_der: bytes) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo DER (HPKP-style pin)."""
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def load_cert_der(path: Path) -> bytes:
    """Read a PEM file and return the DER of its first certificate."""
    return _load_cert(path).public_bytes(serialization.Encoding.DER)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read certificate ({exc.strerror or exc})") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate file") from exc
    if not certs:  # pragma: no cover - load_pem_x509_certificates raises instead
        raise PkiError(f"{path}: no certificate found")
    return certs[0]


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read private key ({exc.strerror or exc})") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # never echo key material
        raise PkiError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: private key is not an EC key")
    return key


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{kind} {_NAME_RULE}")
    return name


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Issued:
    """One certificate and its key on disk."""

    name: str
    cert: Path
    key: Path
    fingerprint: str


@dataclass(frozen=True)
class PkiLayout:
    """Every certificate of a development PKI directory."""

    dir: Path
    device_ca: Issued
    gateway_ca: Issued
    upstream_ca: Issued
    gateway_server: Issued
    gateway_client: Issued
    upstreams: Mapping[str, Issued]
    devices: Mapping[str, Issued]
    clients: Mapping[str, Issued]
    """The gateway's own client certificate for each upstream (one per destination)."""


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _save(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    key_path = directory / f"{name}.key"
    cert_path = directory / f"{name}.pem"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(key_path, key_pem, mode=0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    der = cert.public_bytes(serialization.Encoding.DER)
    return Issued(name=name, cert=cert_path, key=key_path, fingerprint=cert_fingerprint(der))


def _make_ca(directory: Path, name: str, common_name: str, now: datetime) -> tuple[Issued, _Ca]:
    key = _new_key()
    subject = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _save(directory, name, cert, key), _Ca(cert, key)


def _make_leaf(
    directory: Path,
    name: str,
    ca: _Ca,
    *,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    server: bool,
    now: datetime,
) -> Issued:
    key = _new_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    lifetime = _SERVER_LIFETIME if server else _CLIENT_LIFETIME
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return _save(directory, name, cert, key)


def _server_sans(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in ("localhost", *hostnames):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not host or not host.isascii() or any(c.isspace() for c in host):
                raise ValueError(
                    "hostnames must be non-empty ASCII DNS names or IP addresses"
                ) from None
            general: x509.GeneralName = x509.DNSName(host.lower())
        else:
            general = x509.IPAddress(ip)
        if general not in sans:
            sans.append(general)
    for ip in _LOOPBACK_IPS:
        if x509.IPAddress(ip) not in sans:
            sans.append(x509.IPAddress(ip))
    return sans


def _loopback_sans() -> list[x509.GeneralName]:
    return _server_sans(())


def _issue_device(directory: Path, device_ca: _Ca, device_id: str, now: datetime) -> Issued:
    return _make_leaf(
        directory,
        f"device-{device_id}",
        device_ca,
        common_name=device_id,
        sans=[x509.DNSName(device_id)],
        server=False,
        now=now,
    )


def _issue_client(directory: Path, gateway_ca: _Ca, upstream: str, now: datetime) -> Issued:
    return _make_leaf(
        directory,
        f"client-{upstream}",
        gateway_ca,
        common_name=f"gateway-{upstream}",
        sans=[x509.DNSName("gateway")],
        server=False,
        now=now,
    )


def _unique(kind: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{kind} must be a sequence of names, not a string")
    out: list[str] = []
    for name in names:
        _check_name(kind, name)
        if name in out:
            raise ValueError(f"{kind} must be unique")
        out.append(name)
    return out


# --------------------------------------------------------------------------- manifest


def _read_manifest(directory: Path) -> tuple[list[str], list[str]]:
    path = directory / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PkiError(f"{path}: no PKI manifest (run pki init first)") from exc
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: unreadable PKI manifest") from exc
    if not isinstance(doc, dict) or doc.get("version") != _MANIFEST_VERSION:
        raise PkiError(f"{path}: unsupported PKI manifest version")
    lists: list[list[str]] = []
    for key in ("devices", "upstreams"):
        value = doc.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PkiError(f"{path}: {key} must be a list of names")
        try:
            lists.append(_unique(key, value))
        except ValueError as exc:
            raise PkiError(f"{path}: {exc}") from exc
    return lists[0], lists[1]


def _write_manifest(directory: Path, devices: Sequence[str], upstreams: Sequence[str]) -> None:
    doc = {"version": _MANIFEST_VERSION, "devices": list(devices), "upstreams": list(upstreams)}
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    write_atomic(directory / MANIFEST, data, mode=0o644)


def _issued_from_disk(directory: Path, name: str) -> Issued:
    cert = directory / f"{name}.pem"
    key = directory / f"{name}.key"
    if not key.is_file():
        raise PkiError(f"{key}: missing private key")
    return Issued(name=name, cert=cert, key=key, fingerprint=cert_fingerprint(load_cert_der(cert)))


def _load_ca(directory: Path, name: str) -> _Ca:
    cert = _load_cert(directory / f"{name}.pem")
    key = _load_key(directory / f"{name}.key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise PkiError(f"{directory / name}.key: does not match {name}.pem")
    return _Ca(cert, key)


# --------------------------------------------------------------------------- public API


def init_pki(
    directory: Path,
    *,
    devices: Sequence[str] = ("tablet-01",),
    upstreams: Sequence[str] = ("upstream",),
    hostnames: Sequence[str] = ("localhost",),
    now: datetime | None = None,
    overwrite: bool = False,
) -> PkiLayout:
    """Create a complete development PKI in ``directory`` and return its layout."""
    device_ids = _unique("device id", devices)
    upstream_names = _unique("upstream name", upstreams)
    if isinstance(hostnames, str):
        raise TypeError("hostnames must be a sequence of names, not a string")
    server_sans = _server_sans(hostnames)
    at = _now(now)
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    manifest = directory / MANIFEST
    stale: list[str] = []
    if manifest.exists():
        if not overwrite:
            raise PkiExistsError(f"{manifest}: a PKI already exists here (use overwrite)")
        with contextlib.suppress(PkiError):
            old_devices, old_upstreams = _read_manifest(directory)
            stale = [f"device-{d}" for d in old_devices if d not in device_ids]
            stale += [f"upstream-{u}" for u in old_upstreams if u not in upstream_names]
            stale += [f"client-{u}" for u in old_upstreams if u not in upstream_names]
        manifest.unlink()  # the directory is incomplete until the new manifest is written

    device_ca, device_ca_k = _make_ca(directory, "device-ca", "Gateway Dev Device CA", at)
    gateway_ca, gateway_ca_k = _make_ca(directory, "gateway-ca", "Gateway Dev Gateway CA", at)
    upstream_ca, upstream_ca_k = _make_ca(directory, "upstream-ca", "Gateway Dev Upstream CA", at)
    gateway_server = _make_leaf(
        directory,
        "gateway-server",
        gateway_ca_k,
        common_name="gateway-server",
        sans=server_sans,
        server=True,
        now=at,
    )
    gateway_client = _make_leaf(
        directory,
        "gateway-client",
        gateway_ca_k,
        common_name="gateway",
        sans=[x509.DNSName("gateway")],
        server=False,
        now=at,
    )
    upstream_certs = {
        u: _make_leaf(
            directory,
            f"upstream-{u}",
            upstream_ca_k,
            common_name=u,
            sans=_loopback_sans(),
            server=True,
            now=at,
        )
        for u in upstream_names
    }
    client_certs = {u: _issue_client(directory, gateway_ca_k, u, at) for u in upstream_names}
    device_certs = {d: _issue_device(directory, device_ca_k, d, at) for d in device_ids}
    for name in stale:
        for suffix in (".pem", ".key"):
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{name}{suffix}").unlink()
    _write_manifest(directory, device_ids, upstream_names)
    return PkiLayout(
        dir=directory,
        device_ca=device_ca,
        gateway_ca=gateway_ca,
        upstream_ca=upstream_ca,
        gateway_server=gateway_server,
        gateway_client=gateway_client,
        upstreams=upstream_certs,
        devices=device_certs,
        clients=client_certs,
    )


def issue_device(layout_dir: Path, device_id: str, *, now: datetime | None = None) -> Issued:
    """Issue one more device client certificate from the device CA in ``layout_dir``."""
    _check_name("device id", device_id)
    at = _now(now)
    directory = Path(layout_dir)
    devices, upstreams = _read_manifest(directory)
    if device_id in devices:
        raise PkiExistsError(f"{directory / MANIFEST}: device {device_id!r} already issued")
    issued = _issue_device(directory, _load_ca(directory, "device-ca"), device_id, at)
    _write_manifest(directory, [*devices, device_id], upstreams)
    return issued


def reissue_gateway_server(
    layout_dir: Path, *, hostnames: Sequence[str] = ("localhost",), now: datetime | None = None
) -> Issued:
    """A new key and certificate for the gateway's server, from the same gateway CA,
    written over the old files (certificate rotation: then reload the daemon)."""
    directory = Path(layout_dir)
    return _make_leaf(
        directory,
        "gateway-server",
        _load_ca(directory, "gateway-ca"),
        common_name="gateway-server",
        sans=_server_sans(hostnames),
        server=True,
        now=_now(now),
    )


def load_layout(directory: Path) -> PkiLayout:
    """Re-read a PKI directory written by :func:`init_pki`."""
    directory = Path(directory)
    devices, upstreams = _read_manifest(directory)
    return PkiLayout(
        dir=directory,
        device_ca=_issued_from_disk(directory, "device-ca"),
        gateway_ca=_issued_from_disk(directory, "gateway-ca"),
        upstream_ca=_issued_from_disk(directory, "upstream-ca"),
        gateway_server=_issued_from_disk(directory, "gateway-server"),
        gateway_client=_issued_from_disk(directory, "gateway-client"),
        upstreams={u: _issued_from_disk(directory, f"upstream-{u}") for u in upstreams},
        devices={d: _issued_from_disk(directory, f"device-{d}") for d in devices},
        clients={u: _issued_from_disk(directory, f"client-{u}") for u in upstreams},
    )
