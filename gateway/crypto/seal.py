"""Sealed payloads: the submission encrypted to its final recipient and signed (issue 5).

TLS protects one hop; a sealed payload protects the canonical payload (the exact
``multipart/form-data`` body the gateway would otherwise send) end to end, through a
contractor's relay to J-LIS. The wire format is specified for recipients in
``docs/sealed-payload.md``; in short::

    "JPGWSEAL" | 0x01 | signer_kid (32) | header_len u32 | header
               | sig_len u16 | signature | body_len u64 | body

* ``signer_kid``: SHA-256 of the signing key's SubjectPublicKeyInfo, so a recipient
  picks the key and verifies the signature before it parses anything else.
* ``header``: canonical JSON (sorted keys, no whitespace, ASCII) naming the suite, the
  recipient key id, the binding (channel, submission id, destination), the inner
  content type, the creation time, the HPKE encapsulated key and the SHA-256 of ``body``.
* ``signature``: Ed25519 or ECDSA P-256/SHA-256 by the gateway over every byte before
  ``sig_len``. It covers the body through ``body_sha256``.
* ``body``: the RFC 9180 HPKE ciphertext (base mode, single shot, empty aad, ``info``
  bound to the binding), or a DER RFC 5652 EnvelopedData for an RSA certificate.

A recipient verifies the signature before it decrypts anything; every failure raises
:class:`SealOpenError` whose ``reason`` is one of the ``REASON_*`` constants and whose
message never carries plaintext or key material. Key files are validated at load
(:func:`load_recipient`, :func:`load_signing_key`); problems raise :class:`SealKeyError`
naming the file and the rule. ``python -m gateway.crypto.seal --help`` generates keys
and the test vectors in ``docs/test-vectors``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, rsa, x25519
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from gateway.crypto.keys import read_secret_file
from gateway.errors import GatewayError, SecretFileError
from gateway.fsutil import write_atomic

__all__ = [
    "AEAD_AES_256_GCM",
    "DEFAULT_MAX_SIZE",
    "KDF_HKDF_SHA256",
    "KEM_IDS",
    "MAGIC",
    "MEDIA_TYPE",
    "MIN_RSA_BITS",
    "REASONS",
    "VERSION",
    "Opened",
    "Recipient",
    "RecipientPrivateKey",
    "SealError",
    "SealKeyError",
    "SealOpenError",
    "Sealed",
    "SealedHeader",
    "Sealer",
    "SigningKey",
    "VectorMismatch",
    "VerifyKey",
    "binding",
    "check_vector_file",
    "generate_cms_recipient",
    "generate_recipient_key",
    "generate_signing_key",
    "generate_vectors",
    "hpke_info",
    "key_id",
    "load_recipient",
    "load_recipient_private_key",
    "load_signing_key",
    "load_verify_key",
    "open_sealed",
    "recipient_private_key_from_pem",
    "verify_key_from_pem",
]

MEDIA_TYPE: Final = "application/vnd.jp-gateway.sealed-payload.v1"
MAGIC: Final = b"JPGWSEAL"
VERSION: Final = 1
INFO_LABEL: Final = b"jp-gateway-sealed-payload-v1"
MAX_HEADER_SIZE: Final = 65536
MAX_SIGNATURE_SIZE: Final = 512
DEFAULT_MAX_SIZE: Final = 256 * 2**20
"""Largest sealed payload :func:`open_sealed` accepts unless told otherwise (256 MiB)."""

Kem: TypeAlias = Literal["x25519", "mlkem768-x25519"]
SuiteKind: TypeAlias = Literal["hpke", "cms"]
SigAlg: TypeAlias = Literal["ed25519", "ecdsa-p256-sha256"]
HpkePublicKey: TypeAlias = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
HpkePrivateKey: TypeAlias = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
SignerPrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
SignerPublicKey: TypeAlias = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
Buffer: TypeAlias = bytes | bytearray | memoryview

KEM_X25519: Final = "x25519"
KEM_MLKEM768_X25519: Final = "mlkem768-x25519"
KEM_IDS: Final[dict[str, int]] = {KEM_X25519: 0x0020, KEM_MLKEM768_X25519: 0x647A}
"""RFC 9180 / IANA HPKE KEM ids: DHKEM(X25519, HKDF-SHA256) and MLKEM768-X25519 (X-Wing)."""
KDF_HKDF_SHA256: Final = 0x0001
AEAD_AES_256_GCM: Final = 0x0002
SIG_ED25519: Final = "ed25519"
SIG_ECDSA_P256: Final = "ecdsa-p256-sha256"
MIN_RSA_BITS: Final = 3072

HYBRID_PUBLIC_LABEL: Final = "MLKEM768-X25519 PUBLIC KEY"
HYBRID_PRIVATE_LABEL: Final = "MLKEM768-X25519 PRIVATE KEY"
_MLKEM768_PUBLIC_SIZE = 1184
_X25519_SIZE = 32
HYBRID_PUBLIC_SIZE: Final = _MLKEM768_PUBLIC_SIZE + _X25519_SIZE
HYBRID_SEED_SIZE: Final = 32

_HPKE_KEMS = {KEM_X25519: hpke.KEM.X25519, KEM_MLKEM768_X25519: hpke.KEM.MLKEM768_X25519}
_KEM_BY_ID = {v: k for k, v in KEM_IDS.items()}

JST = timezone(timedelta(hours=9), "JST")
_MAX_PUBLIC_FILE_SIZE = 1 << 20
_RULE_SIGNER = "the signing key must be Ed25519 or ECDSA P-256 (secp256r1)"

# -- reasons an open fails (SealOpenError.reason) ---------------------------------------

REASON_MALFORMED: Final = "malformed"
REASON_TOO_LARGE: Final = "too large"
REASON_VERSION: Final = "unsupported version"
REASON_UNTRUSTED_SIGNER: Final = "untrusted signer"
REASON_SIGNATURE: Final = "signature"
REASON_SUITE: Final = "unsupported suite"
REASON_BINDING_CHANNEL: Final = "binding mismatch: channel"
REASON_BINDING_SUBMISSION: Final = "binding mismatch: submission_id"
REASON_BINDING_DESTINATION: Final = "binding mismatch: destination"
REASON_WRONG_RECIPIENT: Final = "wrong recipient"
REASON_BODY_DIGEST: Final = "body digest"
REASON_DECRYPT: Final = "decrypt"
REASONS: Final = (
    REASON_MALFORMED,
    REASON_TOO_LARGE,
    REASON_VERSION,
    REASON_UNTRUSTED_SIGNER,
    REASON_SIGNATURE,
    REASON_SUITE,
    REASON_BINDING_CHANNEL,
    REASON_BINDING_SUBMISSION,
    REASON_BINDING_DESTINATION,
    REASON_WRONG_RECIPIENT,
    REASON_BODY_DIGEST,
    REASON_DECRYPT,
)


class SealError(GatewayError):
    """Base of the errors of this module."""


class SealKeyError(SealError):
    """A recipient key, certificate or signing key cannot be used.

    The message names the file and the rule broken, never key material.
    """


class SealOpenError(SealError):
    """A sealed payload was refused. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"sealed payload refused: {reason}" + (f" ({detail})" if detail else ""))


# ------------------------------------------------------------------------------ helpers


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Strict RFC 4648 section 5 without padding; ValueError on anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:  # non-zero trailing bits: not the canonical encoding
        raise ValueError("not canonical base64url")
    return data


def key_id(public_bytes: bytes) -> str:
    """Lowercase hex SHA-256 of a key's canonical public encoding (see ``_public_bytes``)."""
    return hashlib.sha256(public_bytes).hexdigest()


def _spki(key: x25519.X25519PublicKey | rsa.RSAPublicKey | SignerPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki_pem(key: x25519.X25519PublicKey | rsa.RSAPublicKey | SignerPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pkcs8_pem(
    key: x25519.X25519PrivateKey | rsa.RSAPrivateKey | SignerPrivateKey,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(label: str, data: bytes) -> bytes:
    text = base64.b64encode(data).decode("ascii")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode("ascii")


_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9][A-Z0-9 -]*?)-----")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9][A-Z0-9 -]*?)-----\r?\n([A-Za-z0-9+/=\r\n]*)-----END \1-----"
)


def _pem_labels(data: bytes) -> list[str]:
    return [m.decode("ascii") for m in _PEM_BEGIN.findall(data)]


def _pem_single(data: bytes, label: str) -> bytes | None:
    """The decoded body of the only PEM block, if it has ``label``; None otherwise."""
    blocks = _PEM_BLOCK.findall(data)
    if len(blocks) != 1 or blocks[0][0].decode("ascii") != label:
        return None
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", blocks[0][1]), validate=True)
    except (binascii.Error, ValueError):
        return None


def _describe(key: object) -> str:
    """A key's algorithm in words, for error messages (never its value)."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    if isinstance(key, x25519.X25519PublicKey | x25519.X25519PrivateKey):
        return "an X25519 key"
    if isinstance(key, mlkem.MLKEM768PublicKey | mlkem.MLKEM768PrivateKey):
        return "an ML-KEM-768 key"
    return f"a {type(key).__name__} key"


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


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(UTC)


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


_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,255}")
_TEXT_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,1022}[\x21-\x7e])?")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def _check_token(name: str, value: object) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"{name} must be 1-255 printable ASCII characters without spaces")
    return value


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not _TEXT_RE.fullmatch(value):
        raise ValueError(
            f"{name} must be 1-1024 printable ASCII characters, not starting or ending in a space"
        )
    return value


def _format_created(created: datetime | float) -> str:
    if isinstance(created, datetime):
        moment = _aware(created, "created")
    else:
        moment = datetime.fromtimestamp(float(created), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _lp(text: str) -> bytes:
    data = text.encode("ascii")
    return len(data).to_bytes(2, "big") + data


def binding(
    *, channel: str, submission_id: str, destination: str, content_type: str, signer_kid: str
) -> bytes:
    """The binding: each value as a 2-byte big-endian length and its ASCII bytes, in order."""
    return b"".join(
        _lp(v)
        for v in (
            _check_token("channel", channel),
            _check_token("submission_id", submission_id),
            _check_token("destination", destination),
            _check_text("content_type", content_type),
            _check_token("signer_kid", signer_kid),
        )
    )


def hpke_info(
    *, channel: str, submission_id: str, destination: str, content_type: str, signer_kid: str
) -> bytes:
    """HPKE ``info``: :data:`INFO_LABEL` followed by SHA-256 of :func:`binding` (60 bytes)."""
    bound = binding(
        channel=channel,
        submission_id=submission_id,
        destination=destination,
        content_type=content_type,
        signer_kid=signer_kid,
    )
    return INFO_LABEL + hashlib.sha256(bound).digest()


def _hpke_suite(kem: str) -> hpke.Suite:
    return hpke.Suite(_HPKE_KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _hybrid_from_seed(seed: bytes) -> tuple[hpke.MLKEM768X25519PrivateKey, bytes]:
    """X-Wing key derivation: SHAKE256(seed, 96) = ML-KEM-768 seed (64) | X25519 key (32).

    Returns the private key and the 1216-byte public key (ML-KEM-768 | X25519).
    """
    if len(seed) != HYBRID_SEED_SIZE:
        raise ValueError(f"an MLKEM768-X25519 private key is a {HYBRID_SEED_SIZE}-byte seed")
    expanded = hashlib.shake_256(seed).digest(96)
    m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    public = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
    return hpke.MLKEM768X25519PrivateKey(m, x), public


def _hybrid_public(data: bytes) -> hpke.MLKEM768X25519PublicKey:
    if len(data) != HYBRID_PUBLIC_SIZE:
        raise ValueError(f"an MLKEM768-X25519 public key is {HYBRID_PUBLIC_SIZE} bytes")
    m = mlkem.MLKEM768PublicKey.from_public_bytes(data[:_MLKEM768_PUBLIC_SIZE])
    x = x25519.X25519PublicKey.from_public_bytes(data[_MLKEM768_PUBLIC_SIZE:])
    return hpke.MLKEM768X25519PublicKey(m, x)


# ------------------------------------------------------------------ keys: sending side


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


# --------------------------------------------------------------- keys: receiving side


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


# -------------------------------------------------------------------------- the format


@dataclass(frozen=True)
class SealedHeader:
    """The signed header of a sealed payload (field names as on the wire)."""

    suite: SuiteKind
    channel: str
    submission_id: str
    destination: str
    content_type: str
    created: str
    recipient_kid: str
    sig_alg: SigAlg
    body_sha256: str
    kem_id: int | None = None
    kdf_id: int | None = None
    aead_id: int | None = None
    enc: bytes | None = field(default=None, repr=False)
    version: int = VERSION

    def as_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "version": self.version,
            "suite": self.suite,
            "channel": self.channel,
            "submission_id": self.submission_id,
            "destination": self.destination,
            "content_type": self.content_type,
            "created": self.created,
            "recipient_kid": self.recipient_kid,
            "sig_alg": self.sig_alg,
            "body_sha256": self.body_sha256,
        }
        if self.suite == "hpke":
            assert self.enc is not None
            doc["kem_id"] = self.kem_id
            doc["kdf_id"] = self.kdf_id
            doc["aead_id"] = self.aead_id
            doc["enc"] = _b64url(self.enc)
        return doc

    def encode(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, ASCII (RFC 8785 for these values)."""
        return json.dumps(
            self.as_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")


_COMMON_FIELDS = frozenset(
    {
        "version",
        "suite",
        "channel",
        "submission_id",
        "destination",
        "content_type",
        "created",
        "recipient_kid",
        "sig_alg",
        "body_sha256",
    }
)
_HPKE_FIELDS = _COMMON_FIELDS | {"kem_id", "kdf_id", "aead_id", "enc"}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError("duplicate key")
        doc[key] = value
    return doc


def _no_floats(_: str) -> Any:
    raise ValueError("numbers must be integers")


def _parse_header(raw: bytes) -> SealedHeader:
    """Parse the (already authenticated) header and check its structure."""

    def malformed() -> SealOpenError:
        return SealOpenError(REASON_MALFORMED, "header")

    try:
        doc = json.loads(
            raw.decode("ascii"),
            object_pairs_hook=_no_duplicates,
            parse_float=_no_floats,
            parse_constant=_no_floats,
        )
    except (UnicodeDecodeError, ValueError):
        raise malformed() from None
    if not isinstance(doc, dict):
        raise malformed()
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise SealOpenError(REASON_VERSION, "header")
    suite = doc.get("suite")
    if suite not in ("hpke", "cms"):
        raise SealOpenError(REASON_SUITE)
    if set(doc) != (_HPKE_FIELDS if suite == "hpke" else _COMMON_FIELDS):
        raise malformed()
    try:
        for name in ("channel", "submission_id", "destination"):
            _check_token(name, doc[name])
        _check_text("content_type", doc["content_type"])
        for name in ("recipient_kid", "body_sha256"):
            if not isinstance(doc[name], str) or not _HEX64_RE.fullmatch(doc[name]):
                raise ValueError(name)
        if not isinstance(doc["created"], str) or not _CREATED_RE.fullmatch(doc["created"]):
            raise ValueError("created")
        datetime.strptime(doc["created"], "%Y-%m-%dT%H:%M:%SZ")
        if doc["sig_alg"] not in (SIG_ED25519, SIG_ECDSA_P256):
            raise ValueError("sig_alg")
        enc = None
        if suite == "hpke":
            for name in ("kem_id", "kdf_id", "aead_id"):
                if type(doc[name]) is not int or not 0 <= doc[name] <= 0xFFFF:
                    raise ValueError(name)
            if not isinstance(doc["enc"], str):
                raise ValueError("enc")
            enc = _b64url_decode(doc["enc"])
    except (ValueError, TypeError):
        raise malformed() from None
    header = SealedHeader(
        suite=suite,
        channel=doc["channel"],
        submission_id=doc["submission_id"],
        destination=doc["destination"],
        content_type=doc["content_type"],
        created=doc["created"],
        recipient_kid=doc["recipient_kid"],
        sig_alg=doc["sig_alg"],
        body_sha256=doc["body_sha256"],
        kem_id=doc.get("kem_id"),
        kdf_id=doc.get("kdf_id"),
        aead_id=doc.get("aead_id"),
        enc=enc,
    )
    if header.encode() != raw:
        raise SealOpenError(REASON_MALFORMED, "header is not canonical JSON")
    return header


_KID_SIZE = 32
_HEADER_OFFSET = len(MAGIC) + 1 + _KID_SIZE + 4


def _signed_part(signer_kid: str, header_bytes: bytes) -> bytes:
    return b"".join(
        (
            MAGIC,
            bytes([VERSION]),
            bytes.fromhex(signer_kid),
            len(header_bytes).to_bytes(4, "big"),
            header_bytes,
        )
    )


@dataclass(frozen=True)
class _Frame:
    signer_kid: str
    signed: memoryview
    header: bytes
    signature: bytes
    body: memoryview


def _split_frame(data: Buffer, max_size: int) -> _Frame:
    view = memoryview(data).cast("B")
    total = len(view)
    if total > max_size:
        raise SealOpenError(REASON_TOO_LARGE, f"{total} bytes, limit {max_size}")
    if total < len(MAGIC) + 1 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise SealOpenError(REASON_MALFORMED, "not a sealed payload")
    if view[len(MAGIC)] != VERSION:
        raise SealOpenError(REASON_VERSION, f"format version {view[len(MAGIC)]}")
    pos = len(MAGIC) + 1
    if total < _HEADER_OFFSET:
        raise SealOpenError(REASON_MALFORMED, "truncated")
    signer_kid = bytes(view[pos : pos + _KID_SIZE]).hex()
    pos += _KID_SIZE
    header_len = int.from_bytes(view[pos : pos + 4], "big")
    pos += 4
    if not 1 <= header_len <= MAX_HEADER_SIZE or total < pos + header_len + 2:
        raise SealOpenError(REASON_MALFORMED, "header length")
    header_end = pos + header_len
    sig_len = int.from_bytes(view[header_end : header_end + 2], "big")
    pos = header_end + 2
    if not 1 <= sig_len <= MAX_SIGNATURE_SIZE or total < pos + sig_len + 8:
        raise SealOpenError(REASON_MALFORMED, "signature length")
    signature = bytes(view[pos : pos + sig_len])
    pos += sig_len
    body_len = int.from_bytes(view[pos : pos + 8], "big")
    pos += 8
    if total - pos != body_len:
        raise SealOpenError(REASON_MALFORMED, "body length")
    return _Frame(
        signer_kid=signer_kid,
        signed=view[:header_end],
        header=bytes(view[_HEADER_OFFSET:header_end]),
        signature=signature,
        body=view[pos:],
    )


@dataclass(frozen=True)
class Sealed:
    """A sealed payload: send ``parts`` in order (or ``data``) as ``media_type``."""

    parts: tuple[bytes | memoryview, ...]
    media_type: str
    header: SealedHeader
    size: int

    @cached_property
    def data(self) -> bytes:
        """The whole payload as one bytes object (joined once, on first use)."""
        return b"".join(self.parts)


@dataclass(frozen=True)
class Opened:
    """A verified and decrypted payload."""

    plaintext: bytes = field(repr=False, compare=False)  # never in a test's failure diff
    content_type: str
    header: SealedHeader
    signer_kid: str


class Sealer:
    """Seals canonical payloads for one destination: its recipient and signing key."""

    def __init__(self, recipient: Recipient, signing_key: SigningKey) -> None:
        self.recipient = recipient
        self.signing_key = signing_key
        self._suite: hpke.Suite | None = None
        self._enc_len = 0
        self._cms: pkcs7.PKCS7EnvelopeBuilder | None = None
        if recipient.suite == "hpke":
            assert recipient.kem is not None and recipient.public_key is not None
            self._suite = _hpke_suite(recipient.kem)
            self._enc_len = _HPKE_KEMS[recipient.kem].enc_length()
        else:
            assert recipient.certificate is not None
            self._cms = (
                pkcs7.PKCS7EnvelopeBuilder()
                .set_content_encryption_algorithm(algorithms.AES256)
                .add_recipient(recipient.certificate)
            )

    def seal(
        self,
        plaintext: Buffer,
        *,
        channel: str,
        submission_id: str,
        destination: str,
        content_type: str,
        created: datetime | float,
    ) -> Sealed:
        """Encrypt ``plaintext`` to the recipient, bound to the three names, and sign it.

        ``content_type`` is the canonical payload's own type (with its boundary);
        ``created`` an aware datetime or epoch seconds. ValueError for a bad argument.
        """
        signer_kid = self.signing_key.key_id
        info = hpke_info(
            channel=channel,
            submission_id=submission_id,
            destination=destination,
            content_type=content_type,
            signer_kid=signer_kid,
        )  # also validates the four strings
        created_text = _format_created(created)
        enc: bytes | None = None
        if self._suite is not None:
            assert self.recipient.public_key is not None and self.recipient.kem is not None
            sealed = memoryview(self._suite.encrypt(plaintext, self.recipient.public_key, info))
            enc = bytes(sealed[: self._enc_len])
            body = sealed[self._enc_len :]
            kem_id: int | None = KEM_IDS[self.recipient.kem]
            kdf_id: int | None = KDF_HKDF_SHA256
            aead_id: int | None = AEAD_AES_256_GCM
            suite: SuiteKind = "hpke"
        else:
            assert self._cms is not None
            data = plaintext if isinstance(plaintext, bytes) else bytes(plaintext)
            body = memoryview(
                self._cms.set_data(data).encrypt(
                    serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]
                )
            )
            kem_id = kdf_id = aead_id = None
            suite = "cms"
        header = SealedHeader(
            suite=suite,
            channel=channel,
            submission_id=submission_id,
            destination=destination,
            content_type=content_type,
            created=created_text,
            recipient_kid=self.recipient.key_id,
            sig_alg=self.signing_key.alg,
            body_sha256=hashlib.sha256(body).hexdigest(),
            kem_id=kem_id,
            kdf_id=kdf_id,
            aead_id=aead_id,
            enc=enc,
        )
        signed = _signed_part(signer_kid, header.encode())
        signature = self.signing_key.sign(signed)
        middle = len(signature).to_bytes(2, "big") + signature + len(body).to_bytes(8, "big")
        parts = (signed, middle, body)
        return Sealed(
            parts=parts,
            media_type=MEDIA_TYPE,
            header=header,
            size=len(signed) + len(middle) + len(body),
        )


def open_sealed(
    data: Buffer,
    *,
    recipient_key: RecipientPrivateKey,
    trusted_signers: Iterable[VerifyKey],
    channel: str,
    submission_id: str,
    destination: str,
    max_size: int = DEFAULT_MAX_SIZE,
) -> Opened:
    """Verify and open a sealed payload, in the order docs/sealed-payload.md prescribes.

    ``channel``, ``submission_id`` and ``destination`` are what the recipient expects
    (the ``Gateway-Channel`` and ``Idempotency-Key`` request headers and its own name).
    Raises :class:`SealOpenError`; nothing is decrypted before the signature, the
    binding, the recipient key id and the body digest have been checked.
    """
    frame = _split_frame(data, max_size)
    signers = {k.key_id: k for k in trusted_signers}
    signer = signers.get(frame.signer_kid)
    if signer is None:
        raise SealOpenError(REASON_UNTRUSTED_SIGNER)
    if not signer.verify(frame.signature, frame.signed):
        raise SealOpenError(REASON_SIGNATURE)

    # Authenticated from here on.
    header = _parse_header(frame.header)
    if header.sig_alg != signer.alg:
        raise SealOpenError(REASON_MALFORMED, "sig_alg is not the signer key's algorithm")
    if header.suite == "hpke" and (
        header.kem_id not in _KEM_BY_ID
        or header.kdf_id != KDF_HKDF_SHA256
        or header.aead_id != AEAD_AES_256_GCM
    ):
        raise SealOpenError(REASON_SUITE)
    for name, expected, actual, reason in (
        ("channel", channel, header.channel, REASON_BINDING_CHANNEL),
        ("submission_id", submission_id, header.submission_id, REASON_BINDING_SUBMISSION),
        ("destination", destination, header.destination, REASON_BINDING_DESTINATION),
    ):
        if expected != actual:
            raise SealOpenError(reason, f"the header's {name} is not the expected one")
    if header.recipient_kid != recipient_key.key_id or header.suite != recipient_key.suite:
        raise SealOpenError(REASON_WRONG_RECIPIENT)
    if not hmac.compare_digest(hashlib.sha256(frame.body).hexdigest(), header.body_sha256):
        raise SealOpenError(REASON_BODY_DIGEST)

    if header.suite == "hpke":
        kem = _KEM_BY_ID[cast(int, header.kem_id)]
        if kem != recipient_key.kem or recipient_key.hpke_key is None:
            raise SealOpenError(REASON_WRONG_RECIPIENT)
        assert header.enc is not None
        if len(header.enc) != _HPKE_KEMS[kem].enc_length():
            raise SealOpenError(REASON_MALFORMED, "encapsulated key length")
        info = hpke_info(
            channel=header.channel,
            submission_id=header.submission_id,
            destination=header.destination,
            content_type=header.content_type,
            signer_kid=frame.signer_kid,
        )
        try:
            plaintext = _hpke_suite(kem).decrypt(
                b"".join((header.enc, frame.body)), recipient_key.hpke_key, info
            )
        except (InvalidTag, ValueError):
            raise SealOpenError(REASON_DECRYPT) from None
    else:
        if recipient_key.rsa_key is None or recipient_key.certificate is None:
            raise SealOpenError(REASON_WRONG_RECIPIENT)
        try:
            plaintext = pkcs7.pkcs7_decrypt_der(
                bytes(frame.body), recipient_key.certificate, recipient_key.rsa_key, []
            )
        except ValueError:
            raise SealOpenError(REASON_DECRYPT) from None
    return Opened(
        plaintext=plaintext,
        content_type=header.content_type,
        header=header,
        signer_kid=frame.signer_kid,
    )


# ---------------------------------------------------------------------- key generation


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


# ------------------------------------------------------------------------- test vectors

VECTOR_FORMAT = 1
_VECTOR_CREATED = datetime(2026, 5, 26, 0, 0, 0, tzinfo=UTC)
_VECTOR_SUITES = ("hpke-x25519", "hpke-mlkem768-x25519", "cms")
_VECTOR_BOUNDARY = "vector-boundary-7e1f"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"jp-gateway sealed-payload test vector: " + label.encode()).digest()


def _vector_plaintext() -> tuple[bytes, str]:
    """A small synthetic canonical payload: no real person's data."""
    b = _VECTOR_BOUNDARY
    parts = [
        f'--{b}\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n'
        "00000000000000000000000\r\n",
        f'--{b}\r\nContent-Disposition: form-data; name="wants_e_certificate"\r\n\r\ntrue\r\n',
        f'--{b}\r\nContent-Disposition: form-data; name="wants_braille"\r\n\r\nfalse\r\n',
        f'--{b}\r\nContent-Disposition: form-data; name="face_photo"; '
        'filename="face.jpg"\r\nContent-Type: image/jpeg\r\n\r\n',
    ]
    photo = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\n\r\n\x00\x80\xff" + bytes(range(256)) + b"\xff\xd9"
    body = "".join(parts).encode("ascii") + photo + f"\r\n--{b}--\r\n".encode("ascii")
    return body, f"multipart/form-data; boundary={b}"


def _vector_keys(
    rsa_key: rsa.RSAPrivateKey | None,
) -> tuple[dict[str, tuple[bytes, bytes]], dict[str, bytes], bytes]:
    """Deterministic test keys (RSA excepted): recipients, signers, cms certificate."""
    recipients = {
        "hpke-x25519": _recipient_pems(KEM_X25519, _seed("x25519 recipient")),
        "hpke-mlkem768-x25519": _recipient_pems(
            KEM_MLKEM768_X25519, _seed("mlkem768-x25519 recipient")
        ),
    }
    cms_key, cms_cert = generate_cms_recipient(
        "JP gateway test vector recipient",
        days=7305,
        now=datetime(2026, 1, 1, tzinfo=UTC),
        key=rsa_key,
    )
    recipients["cms"] = (cms_key, cms_cert)
    p256 = int.from_bytes(_seed("ecdsa-p256 signer"), "big") % (_P256_ORDER - 1) + 1
    signers = {
        SIG_ED25519: _pkcs8_pem(
            ed25519.Ed25519PrivateKey.from_private_bytes(_seed("ed25519 signer"))
        ),
        SIG_ECDSA_P256: _pkcs8_pem(ec.derive_private_key(p256, ec.SECP256R1())),
    }
    other = _pkcs8_pem(ed25519.Ed25519PrivateKey.from_private_bytes(_seed("untrusted signer")))
    return recipients, signers, other


def _resign(sealed: bytes, header: SealedHeader, signer: SigningKey) -> bytes:
    """Replace the header (re-signing it with ``signer``) and keep the body."""
    frame = _split_frame(sealed, DEFAULT_MAX_SIZE)
    header = replace(header, sig_alg=signer.alg)
    signed = _signed_part(signer.key_id, header.encode())
    sig = signer.sign(signed)
    body = bytes(frame.body)
    return signed + len(sig).to_bytes(2, "big") + sig + len(body).to_bytes(8, "big") + body


def _edit_header(sealed: bytes, header: SealedHeader) -> bytes:
    """Replace the header but keep the original signature (a forgery attempt)."""
    frame = _split_frame(sealed, DEFAULT_MAX_SIZE)
    signed = _signed_part(frame.signer_kid, header.encode())
    sig = frame.signature
    body = bytes(frame.body)
    return signed + len(sig).to_bytes(2, "big") + sig + len(body).to_bytes(8, "big") + body


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _invalid_cases(
    sealed: bytes,
    header: SealedHeader,
    expected: dict[str, str],
    signers: dict[str, SigningKey],
    untrusted: SigningKey,
) -> list[dict[str, object]]:
    frame = _split_frame(sealed, DEFAULT_MAX_SIZE)
    header_start = _HEADER_OFFSET
    sig_start = header_start + len(frame.header) + 2
    body_start = len(sealed) - len(frame.body)
    cases: list[tuple[str, bytes, dict[str, str], str]] = [
        ("flipped byte in the signer key id", _flip(sealed, len(MAGIC) + 3), expected,
         REASON_UNTRUSTED_SIGNER),
        ("flipped byte in the header", _flip(sealed, header_start + 10), expected, "signature"),
        ("header edited to claim another channel, signature kept",
         _edit_header(sealed, replace(header, channel="express-issuance")),
         {**expected, "channel": "express-issuance"}, "signature"),
        ("flipped byte in the signature", _flip(sealed, sig_start + 5), expected, "signature"),
        ("flipped byte in the body", _flip(sealed, body_start + 40), expected, "body digest"),
        ("flipped last byte of the body", _flip(sealed, len(sealed) - 1), expected, "body digest"),
        ("format version 2", sealed[: len(MAGIC)] + b"\x02" + sealed[len(MAGIC) + 1 :],
         expected, "unsupported version"),
        ("truncated by one byte", sealed[:-1], expected, "malformed"),
        ("one byte appended", sealed + b"\x00", expected, "malformed"),
        ("recipient expects another channel", sealed,
         {**expected, "channel": "express-issuance"}, REASON_BINDING_CHANNEL),
        ("recipient expects another submission id", sealed,
         {**expected, "submission_id": "0" * 32}, REASON_BINDING_SUBMISSION),
        ("recipient expects another destination", sealed,
         {**expected, "destination": "jlis-express"}, REASON_BINDING_DESTINATION),
        ("header edited to another channel and re-signed by an untrusted key",
         _resign(sealed, replace(header, channel="express-issuance"), untrusted),
         {**expected, "channel": "express-issuance"}, REASON_UNTRUSTED_SIGNER),
    ]  # fmt: skip
    if header.suite == "hpke":
        enc_in_header = header_start + frame.header.index(b'"enc":"') + 12
        cases.append(
            (
                "flipped byte in the encapsulated key (header)",
                _flip(sealed, enc_in_header),
                expected,
                "signature",
            )
        )
        other = next(s for s in signers.values() if s.key_id != frame.signer_kid)
        cases.append(
            (
                "ciphertext re-signed by another trusted signer (info binds the signer)",
                _resign(sealed, header, other),
                expected,
                REASON_DECRYPT,
            )
        )
    return [
        {
            "name": name,
            "expected": exp,
            "error": error,
            "sealed_b64": base64.b64encode(data).decode("ascii"),
        }
        for name, data, exp, error in cases
    ]


def generate_vectors(directory: Path, *, rsa_key: rsa.RSAPrivateKey | None = None) -> list[Path]:
    """Write one JSON vector file per suite into ``directory``; returns their paths.

    Keys are derived from fixed labels (the RSA key is generated unless given), so
    only the randomized parts (HPKE ephemeral keys, ECDSA, CMS) change between runs.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recipients, signer_pems, untrusted_pem = _vector_keys(rsa_key)
    signers = {
        alg: _signing_key_from_pem(pem, not_after=None, now=None, where=f"{alg} test signer")
        for alg, pem in signer_pems.items()
    }
    untrusted = _signing_key_from_pem(
        untrusted_pem, not_after=None, now=None, where="untrusted test signer"
    )
    plaintext, content_type = _vector_plaintext()
    written = []
    for suite_name in _VECTOR_SUITES:
        private_pem, public_pem = recipients[suite_name]
        suite = "cms" if suite_name == "cms" else "hpke"
        kem = suite_name.removeprefix("hpke-") if suite == "hpke" else KEM_X25519
        recipient = _recipient_from_pem(
            public_pem,
            suite=suite,
            kem=kem,
            not_after=datetime(2046, 1, 1, tzinfo=UTC),
            now=_VECTOR_CREATED,
            where=f"{suite_name} test recipient",
        )
        cases: list[dict[str, object]] = []
        invalid: list[dict[str, object]] = []
        for n, (alg, signer) in enumerate(signers.items()):
            expected = {
                "channel": "online-application",
                "submission_id": f"019e6a4c0000{n:04x}7a5d3c2b1e0f9a8b",
                "destination": "dnp-relay",
            }
            sealed = Sealer(recipient, signer).seal(
                plaintext, content_type=content_type, created=_VECTOR_CREATED, **expected
            )
            bound = binding(content_type=content_type, signer_kid=signer.key_id, **expected)
            case: dict[str, object] = {
                "name": f"{suite_name}, signed with {alg}",
                "signer_key_id": signer.key_id,
                "expected": expected,
                "binding_hex": bound.hex(),
                "header_json": sealed.header.encode().decode("ascii"),
                "content_type": content_type,
                "plaintext_b64": base64.b64encode(plaintext).decode("ascii"),
                "sealed_b64": base64.b64encode(sealed.data).decode("ascii"),
            }
            if suite == "hpke":
                case["hpke_info_hex"] = hpke_info(
                    content_type=content_type, signer_kid=signer.key_id, **expected
                ).hex()
            cases.append(case)
            if alg == SIG_ED25519:
                invalid = _invalid_cases(sealed.data, sealed.header, expected, signers, untrusted)
        doc = {
            "vector_format": VECTOR_FORMAT,
            "media_type": MEDIA_TYPE,
            "suite": suite_name,
            "generated_by": "python -m gateway.crypto.seal --write-vectors DIR",
            "recipient": {
                "key_id": recipient.key_id,
                "private_key_pem": private_pem.decode("ascii"),
                ("certificate_pem" if suite == "cms" else "public_key_pem"): public_pem.decode(
                    "ascii"
                ),
            },
            "signers": [
                {"alg": alg, "key_id": s.key_id, "public_key_pem": s.public_pem().decode("ascii")}
                for alg, s in signers.items()
            ],
            "cases": cases,
            "invalid": invalid,
        }
        path = directory / f"{suite_name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


class VectorMismatch(SealError):
    """A test vector no longer opens (or fails) the way it says."""


def check_vector_file(path: Path) -> int:
    """Open every case of a vector file as a recipient would; returns the cases checked.

    Raises :class:`VectorMismatch` naming the case when a valid case does not open to
    its plaintext (or its binding/info differ) or an invalid case does not fail with
    its stated reason.
    """
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("vector_format") != VECTOR_FORMAT or doc.get("media_type") != MEDIA_TYPE:
        raise VectorMismatch(f"{path}: unknown vector format")
    rec = doc["recipient"]
    cert = rec.get("certificate_pem")
    key = recipient_private_key_from_pem(
        rec["private_key_pem"].encode("ascii"),
        certificate_pem=None if cert is None else cert.encode("ascii"),
        source=f"{path} recipient",
    )
    if key.key_id != rec["key_id"]:
        raise VectorMismatch(f"{path}: recipient key id differs")
    trusted = [verify_key_from_pem(s["public_key_pem"].encode("ascii")) for s in doc["signers"]]
    if [t.key_id for t in trusted] != [s["key_id"] for s in doc["signers"]]:
        raise VectorMismatch(f"{path}: signer key ids differ")
    checked = 0
    for case in doc["cases"]:
        where = f"{path}: case {case['name']!r}"
        exp = case["expected"]
        try:
            opened = open_sealed(
                base64.b64decode(case["sealed_b64"]),
                recipient_key=key,
                trusted_signers=trusted,
                **exp,
            )
        except SealOpenError as exc:
            raise VectorMismatch(f"{where}: refused ({exc.reason})") from None
        if opened.plaintext != base64.b64decode(case["plaintext_b64"]):
            raise VectorMismatch(f"{where}: plaintext differs")
        if opened.content_type != case["content_type"]:
            raise VectorMismatch(f"{where}: content type differs")
        if opened.header.encode().decode("ascii") != case["header_json"]:
            raise VectorMismatch(f"{where}: header differs")
        bind = dict(exp, content_type=case["content_type"], signer_kid=case["signer_key_id"])
        if binding(**bind).hex() != case["binding_hex"]:
            raise VectorMismatch(f"{where}: binding differs")
        if "hpke_info_hex" in case and hpke_info(**bind).hex() != case["hpke_info_hex"]:
            raise VectorMismatch(f"{where}: HPKE info differs")
        checked += 1
    for case in doc["invalid"]:
        where = f"{path}: invalid case {case['name']!r}"
        try:
            open_sealed(
                base64.b64decode(case["sealed_b64"]),
                recipient_key=key,
                trusted_signers=trusted,
                **case["expected"],
            )
        except SealOpenError as exc:
            if exc.reason != case["error"]:
                raise VectorMismatch(
                    f"{where}: refused for {exc.reason!r}, expected {case['error']!r}"
                ) from None
        else:
            raise VectorMismatch(f"{where}: opened, expected {case['error']!r}")
        checked += 1
    return checked


# ------------------------------------------------------------------------------ command


def _write_key_files(prefix: Path, private_pem: bytes, public_pem: bytes, public_ext: str) -> None:
    write_atomic(prefix.with_name(prefix.name + ".key"), private_pem, mode=0o600, replace=False)
    write_atomic(prefix.with_name(prefix.name + public_ext), public_pem, mode=0o644, replace=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.crypto.seal",
        description="Sealed-payload keys and test vectors (docs/sealed-payload.md).",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-vectors", type=Path, metavar="DIR", help="write test vectors")
    group.add_argument("--check-vectors", type=Path, metavar="DIR", help="check test vectors")
    group.add_argument(
        "--genkey",
        choices=["x25519", "mlkem768-x25519", "ed25519", "ecdsa-p256", "cms-rsa"],
        help="generate a key pair: PREFIX.key (0600) and PREFIX.pub (PREFIX.pem for cms-rsa)",
    )
    parser.add_argument("--out", type=Path, metavar="PREFIX", help="output prefix for --genkey")
    parser.add_argument("--cn", default="sealed-payload recipient", help="CN for cms-rsa")
    args = parser.parse_args(argv)
    try:
        if args.write_vectors is not None:
            for path in generate_vectors(args.write_vectors):
                print(path)
        elif args.check_vectors is not None:
            paths = sorted(Path(args.check_vectors).glob("*.json"))
            if not paths:
                print(f"no vector files in {args.check_vectors}", file=sys.stderr)
                return 1
            for path in paths:
                print(f"{path}: {check_vector_file(path)} cases ok")
        else:
            if args.out is None:
                parser.error("--genkey needs --out PREFIX")
            kind = args.genkey
            if kind in (KEM_X25519, KEM_MLKEM768_X25519):
                private_pem, public_pem = generate_recipient_key(kind)
                _write_key_files(args.out, private_pem, public_pem, ".pub")
            elif kind == "cms-rsa":
                key_pem, cert_pem = generate_cms_recipient(args.cn)
                _write_key_files(args.out, key_pem, cert_pem, ".pem")
            else:
                alg: SigAlg = SIG_ED25519 if kind == "ed25519" else SIG_ECDSA_P256
                pem = generate_signing_key(alg)
                public = _signing_key_from_pem(pem, not_after=None, now=None, where="new key")
                _write_key_files(args.out, pem, public.public_pem(), ".pub")
    except (GatewayError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
