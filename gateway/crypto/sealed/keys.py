"""Loading and checking the keys the gateway holds: recipient keys to seal to, signing keys.

The key-loading edge: it reads key files. Problems raise :class:`SealKeyError` naming
the file and the rule broken, never key material. A signing key's public half is a
:class:`VerifyKey`; a recipient loads the ones it trusts with
:mod:`gateway.crypto.sealed.upstream_keys`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from functools import cached_property
from pathlib import Path
from typing import Final, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from gateway.crypto.keys import read_secret_file
from gateway.crypto.sealed.errors import SealKeyError
from gateway.crypto.sealed.format import (
    KEM_IDS,
    KEM_X25519,
    SIG_ECDSA_P256,
    SIG_ED25519,
    Buffer,
    Kem,
    SigAlg,
    SuiteKind,
    _aware,
)
from gateway.crypto.sealed.keyformat import (
    HYBRID_PUBLIC_LABEL,
    HYBRID_PUBLIC_SIZE,
    HpkePublicKey,
    SignerPrivateKey,
    SignerPublicKey,
    _describe,
    _hpke_suite,
    _hybrid_public,
    _pem_labels,
    _pem_single,
    _spki,
    _spki_pem,
    key_id,
)
from gateway.errors import SecretFileError
from gateway.japan import JST

__all__ = [
    "MIN_RSA_BITS",
    "Recipient",
    "SigningKey",
    "VerifyKey",
    "load_recipient",
    "load_signing_key",
]

MIN_RSA_BITS: Final = 3072

_MAX_PUBLIC_FILE_SIZE = 1 << 20
_RULE_SIGNER = "the signing key must be Ed25519 or ECDSA P-256 (secp256r1)"


def _read_public_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SealKeyError(f"{what} {path}: not a regular file")
            data = fh.read(_MAX_PUBLIC_FILE_SIZE + 1)
    except FileNotFoundError:
        raise SealKeyError(f"{what} {path}: does not exist") from None
    except OSError as exc:
        raise SealKeyError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > _MAX_PUBLIC_FILE_SIZE:
        raise SealKeyError(f"{what} {path}: larger than {_MAX_PUBLIC_FILE_SIZE} bytes")
    return data


def _read_private_file(path: Path, what: str) -> bytes:
    try:
        return read_secret_file(path, what=what)
    except SecretFileError as exc:
        raise SealKeyError(str(exc)) from None


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else _aware(now, "now")


def _configured_not_after(value: date | datetime) -> datetime:
    """A configured expiry: a date means the end of that day in Japan (23:59:59 JST)."""
    if isinstance(value, datetime):
        return _aware(value, "not_after")
    return datetime.combine(value, time(23, 59, 59), JST).astimezone(UTC)


def _check_not_expired(not_after: datetime, now: datetime, where: str) -> None:
    if now > not_after:
        raise SealKeyError(f"{where}: expired on {not_after.isoformat()}; configure a current key")


@dataclass(frozen=True)
class Recipient:
    """A destination's recipient key, validated: what the gateway seals to.

    ``not_after`` is the certificate's notAfter for CMS (or the configured expiry if it
    is earlier) and the configured expiry for an HPKE public key; export it as a metric.
    """

    suite: SuiteKind
    kem: Kem | None
    key_id: str
    not_after: datetime
    public_key: HpkePublicKey | None = field(default=None, repr=False)
    certificate: x509.Certificate | None = field(default=None, repr=False)

    @property
    def suite_name(self) -> str:
        """``hpke-x25519``, ``hpke-mlkem768-x25519`` or ``cms``."""
        return f"hpke-{self.kem}" if self.suite == "hpke" else "cms"


def _recipient_hpke(
    data: bytes, *, kem: str, not_after: datetime, now: datetime, where: str
) -> Recipient:
    labels = _pem_labels(data)
    if kem == KEM_X25519:
        if labels != ["PUBLIC KEY"]:
            raise SealKeyError(
                f'{where}: payload_encryption = "hpke" with kem = "x25519" needs a PEM file '
                f"holding exactly one X25519 public key (SubjectPublicKeyInfo, "
                f'"BEGIN PUBLIC KEY")'
            )
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SealKeyError(f"{where}: not a readable PEM public key") from None
        if not isinstance(key, x25519.X25519PublicKey):
            raise SealKeyError(
                f'{where}: holds {_describe(key)}; kem = "x25519" needs an X25519 public key'
            )
        public_key: HpkePublicKey = key
        kid = key_id(_spki(key))
    else:
        raw = _pem_single(data, HYBRID_PUBLIC_LABEL)
        if raw is None:
            raise SealKeyError(
                f'{where}: kem = "mlkem768-x25519" needs a PEM file holding exactly one '
                f'"BEGIN {HYBRID_PUBLIC_LABEL}" block of {HYBRID_PUBLIC_SIZE} bytes '
                f"(ML-KEM-768 | X25519)"
            )
        try:
            public_key = _hybrid_public(raw)
        except (ValueError, UnsupportedAlgorithm):
            raise SealKeyError(
                f"{where}: not a valid MLKEM768-X25519 public key "
                f"({HYBRID_PUBLIC_SIZE} bytes: ML-KEM-768 encapsulation key | X25519)"
            ) from None
        kid = key_id(raw)
    try:  # a key that cannot be encrypted to fails now, not on the first submission
        _hpke_suite(kem).encrypt(b"", public_key, b"load check")
    except (ValueError, TypeError):
        raise SealKeyError(f"{where}: the public key is not usable for HPKE") from None
    _check_not_expired(not_after, now, where)
    return Recipient(
        suite="hpke",
        kem=cast(Kem, kem),
        key_id=kid,
        not_after=not_after,
        public_key=public_key,
    )


def _recipient_cms(
    data: bytes, *, not_after: datetime | None, now: datetime, where: str
) -> Recipient:
    labels = _pem_labels(data)
    if labels != ["CERTIFICATE"]:
        raise SealKeyError(
            f'{where}: payload_encryption = "cms" needs a PEM file holding exactly one '
            f'X.509 certificate ("BEGIN CERTIFICATE") and nothing else'
        )
    try:
        cert = x509.load_pem_x509_certificate(data)
        key = cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SealKeyError(f"{where}: not a readable X.509 certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise SealKeyError(
            f"{where}: the certificate holds {_describe(key)}; CMS recipients must have "
            f"an RSA key of at least {MIN_RSA_BITS} bits (RSA key transport is the only "
            f"kind cryptography's CMS envelope supports)"
        )
    if key.key_size < MIN_RSA_BITS:
        raise SealKeyError(
            f"{where}: the certificate's RSA key has {key.key_size} bits; "
            f"at least {MIN_RSA_BITS} are required"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    except ValueError:
        raise SealKeyError(f"{where}: the certificate has malformed extensions") from None
    if usage is not None and not usage.key_encipherment:
        raise SealKeyError(f"{where}: the certificate's keyUsage does not allow keyEncipherment")
    if now < cert.not_valid_before_utc:
        raise SealKeyError(
            f"{where}: the certificate is not valid until {cert.not_valid_before_utc.isoformat()}"
        )
    effective = cert.not_valid_after_utc
    if not_after is not None and not_after < effective:
        effective = not_after
    _check_not_expired(effective, now, where)
    return Recipient(
        suite="cms",
        kem=None,
        key_id=key_id(_spki(key)),
        not_after=effective,
        certificate=cert,
    )


def _recipient_from_pem(
    data: bytes,
    *,
    suite: str,
    kem: str,
    not_after: date | datetime | None,
    now: datetime | None,
    where: str,
) -> Recipient:
    moment = _now(now)
    if any("PRIVATE KEY" in label for label in _pem_labels(data)):
        raise SealKeyError(
            f"{where}: holds a private key; configure only the recipient's public key or "
            f"certificate (and remove this copy of the private key)"
        )
    configured = None if not_after is None else _configured_not_after(not_after)
    if suite == "hpke":
        if kem not in KEM_IDS:
            raise SealKeyError(f'{where}: kem must be "x25519" or "mlkem768-x25519"')
        if configured is None:
            raise SealKeyError(
                f"{where}: an HPKE recipient key needs a configured not_after "
                f"(raw public keys carry no expiry)"
            )
        return _recipient_hpke(data, kem=kem, not_after=configured, now=moment, where=where)
    if suite == "cms":
        return _recipient_cms(data, not_after=configured, now=moment, where=where)
    raise SealKeyError(f'{where}: payload_encryption must be "none", "hpke" or "cms"')


def load_recipient(
    path: Path,
    *,
    suite: SuiteKind,
    kem: Kem = "x25519",
    not_after: date | datetime | None = None,
    now: datetime | None = None,
) -> Recipient:
    """Load and validate a destination's recipient key.

    ``suite="hpke"``: a PEM public key, X25519 SubjectPublicKeyInfo for ``kem="x25519"``
    or a ``BEGIN MLKEM768-X25519 PUBLIC KEY`` block (1216 bytes, ML-KEM-768 encapsulation
    key then X25519) for ``kem="mlkem768-x25519"``; ``not_after`` is required (a
    ``date`` means through 23:59:59 JST that day). ``suite="cms"``: one X.509
    certificate with an RSA key of at least 3072 bits, currently valid, keyUsage (if
    present) allowing keyEncipherment; ``not_after``, if given, can only shorten it.

    Raises :class:`SealKeyError` for a missing or unreadable file, a file holding a
    private key, a key of the wrong type or size, an expired key or certificate, or a
    certificate not yet valid.
    """
    path = Path(path)
    data = _read_public_file(path, "recipient key")
    return _recipient_from_pem(
        data, suite=suite, kem=kem, not_after=not_after, now=now, where=f"recipient key {path}"
    )


@dataclass(frozen=True)
class VerifyKey:
    """A signer's public key as a recipient trusts it."""

    alg: SigAlg
    public_key: SignerPublicKey = field(repr=False)
    key_id: str

    def verify(self, signature: bytes, message: Buffer) -> bool:
        try:
            if isinstance(self.public_key, ed25519.Ed25519PublicKey):
                self.public_key.verify(signature, message)
            else:
                self.public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def public_pem(self) -> bytes:
        return _spki_pem(self.public_key)


@dataclass(frozen=True)
class SigningKey:
    """The gateway's signing key for a destination (Ed25519 or ECDSA P-256)."""

    alg: SigAlg
    private_key: SignerPrivateKey = field(repr=False)
    key_id: str
    not_after: datetime | None = None

    def sign(self, message: Buffer) -> bytes:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(message)
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))

    @cached_property
    def verify_key(self) -> VerifyKey:
        """The public half, for the recipient's list of trusted signers."""
        return VerifyKey(alg=self.alg, public_key=self.private_key.public_key(), key_id=self.key_id)

    def public_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM of the public half, to hand to the recipient."""
        return _spki_pem(self.private_key.public_key())


def _signer_alg(key: object, where: str) -> SigAlg:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return SIG_ED25519
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return SIG_ECDSA_P256
        raise SealKeyError(
            f"{where}: is an EC key on curve {key.curve.name}; {_RULE_SIGNER}, no other curve"
        )
    raise SealKeyError(f"{where}: is {_describe(key)}; {_RULE_SIGNER}")


def _signing_key_from_pem(
    data: bytes, *, not_after: date | datetime | None, now: datetime | None, where: str
) -> SigningKey:
    labels = _pem_labels(data)
    if "ENCRYPTED PRIVATE KEY" in labels:
        raise SealKeyError(
            f"{where}: is an encrypted PEM key; store it unencrypted (PKCS#8) in a file only "
            f"its owner can read, or as a systemd credential"
        )
    if len(labels) != 1 or not labels[0].endswith("PRIVATE KEY"):
        raise SealKeyError(f"{where}: must hold exactly one PEM private key (PKCS#8)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SealKeyError(f"{where}: not a readable unencrypted PEM private key") from None
    alg = _signer_alg(key, where)
    signer = cast(SignerPrivateKey, key)
    configured = None if not_after is None else _configured_not_after(not_after)
    if configured is not None:
        _check_not_expired(configured, _now(now), where)
    return SigningKey(
        alg=alg,
        private_key=signer,
        key_id=key_id(_spki(signer.public_key())),
        not_after=configured,
    )


def load_signing_key(
    path: Path, *, not_after: date | datetime | None = None, now: datetime | None = None
) -> SigningKey:
    """Load the gateway's signing key: an unencrypted PEM (PKCS#8) Ed25519 or P-256 key.

    The file must not be accessible by group or others (the rules of
    :func:`gateway.crypto.keys.read_secret_file`, systemd credentials included). A
    configured ``not_after`` (rotation date) is checked and kept for the metric.
    Raises :class:`SealKeyError`.
    """
    path = Path(path)
    where = f"signing key {path}"
    data = _read_private_file(path, "signing key")
    return _signing_key_from_pem(data, not_after=not_after, now=now, where=where)
