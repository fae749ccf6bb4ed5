"""X.509 for the development PKI: fingerprints, loading, and issuing CAs and leaf
certificates (ECDSA P-256, SHA-256), each written as PEM beside its 0600 key."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import GatewayError
from gateway.fsutil import write_atomic

_ORG = "Gateway Development PKI"
_CA_LIFETIME = timedelta(days=3650)
_SERVER_LIFETIME = timedelta(days=397)
_CLIENT_LIFETIME = timedelta(days=825)
_BACKDATE = timedelta(minutes=5)
_LOOPBACK_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


class PkiError(GatewayError):
    """A PKI directory or file is missing, unreadable, or inconsistent."""


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
    return load_cert(path).public_bytes(serialization.Encoding.DER)


def load_cert(path: Path) -> x509.Certificate:
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


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
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


def now_utc(now: datetime | None) -> datetime:
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
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def x509_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def save_issued(
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


def make_ca(directory: Path, name: str, common_name: str, now: datetime) -> tuple[Issued, Ca]:
    key = new_key()
    subject = x509_name(common_name)
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
    return save_issued(directory, name, cert, key), Ca(cert, key)


def make_leaf(
    directory: Path,
    name: str,
    ca: Ca,
    *,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    server: bool,
    now: datetime,
) -> Issued:
    key = new_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    lifetime = _SERVER_LIFETIME if server else _CLIENT_LIFETIME
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509_name(common_name))
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
    return save_issued(directory, name, cert, key)


def server_sans(hostnames: Sequence[str]) -> list[x509.GeneralName]:
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


def loopback_sans() -> list[x509.GeneralName]:
    return server_sans(())
