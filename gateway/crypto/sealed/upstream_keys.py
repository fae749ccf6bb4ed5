"""Loading the keys a recipient (the upstream) holds: its private key and the signers it trusts.

The gateway never holds a recipient private key; the upstream simulator, the test
vectors and the tests do. Problems raise :class:`SealKeyError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from gateway.crypto.sealed.errors import SealKeyError
from gateway.crypto.sealed.format import Kem, SuiteKind
from gateway.crypto.sealed.keyformat import (
    HYBRID_PRIVATE_LABEL,
    HYBRID_SEED_SIZE,
    HpkePrivateKey,
    SignerPublicKey,
    _describe,
    _hybrid_from_seed,
    _pem_labels,
    _pem_single,
    _spki,
    key_id,
)
from gateway.crypto.sealed.keys import (
    VerifyKey,
    _read_private_file,
    _read_public_file,
    _signer_alg,
)

__all__ = [
    "RecipientPrivateKey",
    "load_recipient_private_key",
    "load_verify_key",
    "recipient_private_key_from_pem",
    "verify_key_from_pem",
]


@dataclass(frozen=True)
class RecipientPrivateKey:
    """A recipient's private key (the upstream side; the gateway never holds one)."""

    suite: SuiteKind
    kem: Kem | None
    key_id: str
    hpke_key: HpkePrivateKey | None = field(default=None, repr=False)
    rsa_key: rsa.RSAPrivateKey | None = field(default=None, repr=False)
    certificate: x509.Certificate | None = field(default=None, repr=False)


def recipient_private_key_from_pem(
    data: bytes, *, certificate_pem: bytes | None = None, source: str = "recipient private key"
) -> RecipientPrivateKey:
    """Parse a recipient private key.

    * ``BEGIN MLKEM768-X25519 PRIVATE KEY``: the 32-byte X-Wing seed (hpke, hybrid);
    * PKCS#8 X25519 (hpke, x25519);
    * PKCS#8 RSA together with ``certificate_pem`` (cms): the certificate's key must match.
    """
    labels = _pem_labels(data)
    if labels == [HYBRID_PRIVATE_LABEL]:
        seed = _pem_single(data, HYBRID_PRIVATE_LABEL)
        if seed is None or len(seed) != HYBRID_SEED_SIZE:
            raise SealKeyError(
                f"{source}: an MLKEM768-X25519 private key is a {HYBRID_SEED_SIZE}-byte seed"
            )
        hybrid, public = _hybrid_from_seed(seed)
        return RecipientPrivateKey(
            suite="hpke",
            kem="mlkem768-x25519",
            key_id=key_id(public),
            hpke_key=hybrid,
        )
    if len(labels) != 1 or not labels[0].endswith("PRIVATE KEY") or "ENCRYPTED" in labels[0]:
        raise SealKeyError(f"{source}: must hold exactly one unencrypted PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SealKeyError(f"{source}: not a readable unencrypted PEM private key") from None
    if isinstance(key, x25519.X25519PrivateKey):
        return RecipientPrivateKey(
            suite="hpke",
            kem="x25519",
            key_id=key_id(_spki(key.public_key())),
            hpke_key=key,
        )
    if isinstance(key, rsa.RSAPrivateKey):
        if certificate_pem is None:
            raise SealKeyError(f"{source}: an RSA (CMS) private key needs its certificate")
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem)
            cert_key = cert.public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SealKeyError(f"{source}: the certificate is not readable") from None
        if not isinstance(cert_key, rsa.RSAPublicKey) or _spki(cert_key) != _spki(key.public_key()):
            raise SealKeyError(f"{source}: the certificate does not match the private key")
        return RecipientPrivateKey(
            suite="cms",
            kem=None,
            key_id=key_id(_spki(cert_key)),
            rsa_key=key,
            certificate=cert,
        )
    raise SealKeyError(
        f"{source}: is {_describe(key)}; a recipient key is X25519, MLKEM768-X25519 or RSA"
    )


def load_recipient_private_key(
    path: Path, *, certificate: Path | None = None
) -> RecipientPrivateKey:
    """Load a recipient private key file (mode 0600 enforced) and, for CMS, its certificate."""
    path = Path(path)
    data = _read_private_file(path, "recipient private key")
    cert_pem = None
    if certificate is not None:
        cert_pem = _read_public_file(Path(certificate), "recipient certificate")
    return recipient_private_key_from_pem(
        data, certificate_pem=cert_pem, source=f"recipient private key {path}"
    )


def verify_key_from_pem(data: bytes, *, source: str = "signer public key") -> VerifyKey:
    """A trusted signer's SubjectPublicKeyInfo PEM; :class:`SealKeyError` if unusable."""
    labels = _pem_labels(data)
    if labels != ["PUBLIC KEY"]:
        raise SealKeyError(f'{source}: must hold exactly one PEM public key ("BEGIN PUBLIC KEY")')
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SealKeyError(f"{source}: not a readable PEM public key") from None
    alg = _signer_alg(key, source)
    public = cast(SignerPublicKey, key)
    return VerifyKey(alg=alg, public_key=public, key_id=key_id(_spki(public)))


def load_verify_key(path: Path) -> VerifyKey:
    """Load a trusted signer's public key file (recipient side)."""
    path = Path(path)
    data = _read_public_file(path, "signer public key")
    return verify_key_from_pem(data, source=f"signer public key {path}")
