"""Generating sealed-payload keys for development and tests (never done by the daemon).

Recipient key pairs (HPKE), the gateway's signing keys, and self-signed RSA recipient
certificates (CMS), all as PEM bytes; writing them is :mod:`gateway.crypto.sealed.keygen`.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID

from gateway.crypto.sealed.format import (
    KEM_MLKEM768_X25519,
    KEM_X25519,
    SIG_ECDSA_P256,
    SIG_ED25519,
    Kem,
    SigAlg,
)
from gateway.crypto.sealed.keyformat import (
    HYBRID_PRIVATE_LABEL,
    HYBRID_PUBLIC_LABEL,
    _hybrid_from_seed,
    _pem,
    _pkcs8_pem,
    _spki_pem,
)
from gateway.crypto.sealed.keys import MIN_RSA_BITS, _now

__all__ = ["generate_cms_recipient", "generate_recipient_key", "generate_signing_key"]


def generate_recipient_key(kem: Kem = "x25519") -> tuple[bytes, bytes]:
    """A new HPKE recipient key pair as ``(private PEM, public PEM)``.

    x25519: PKCS#8 and SubjectPublicKeyInfo. mlkem768-x25519: the 32-byte X-Wing seed
    (``BEGIN MLKEM768-X25519 PRIVATE KEY``) and the 1216-byte public key.
    """
    return _recipient_pems(kem, os.urandom(32))


def _recipient_pems(kem: str, secret: bytes) -> tuple[bytes, bytes]:
    if kem == KEM_X25519:
        key = x25519.X25519PrivateKey.from_private_bytes(secret)
        return _pkcs8_pem(key), _spki_pem(key.public_key())
    if kem == KEM_MLKEM768_X25519:
        _, public = _hybrid_from_seed(secret)
        return _pem(HYBRID_PRIVATE_LABEL, secret), _pem(HYBRID_PUBLIC_LABEL, public)
    raise ValueError('kem must be "x25519" or "mlkem768-x25519"')


def generate_signing_key(alg: SigAlg = "ed25519") -> bytes:
    """A new signing key as unencrypted PKCS#8 PEM (write it with mode 0600)."""
    if alg == SIG_ED25519:
        return _pkcs8_pem(ed25519.Ed25519PrivateKey.generate())
    if alg == SIG_ECDSA_P256:
        return _pkcs8_pem(ec.generate_private_key(ec.SECP256R1()))
    raise ValueError('alg must be "ed25519" or "ecdsa-p256-sha256"')


def generate_cms_recipient(
    common_name: str = "sealed-payload recipient",
    *,
    days: int = 397,
    bits: int = MIN_RSA_BITS,
    now: datetime | None = None,
    key: rsa.RSAPrivateKey | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed RSA recipient certificate for tests and development: (key, cert) PEM."""
    moment = _now(now)
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - timedelta(minutes=5))
        .not_valid_after(moment + timedelta(days=days))
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _pkcs8_pem(key), cert.public_bytes(serialization.Encoding.PEM)
