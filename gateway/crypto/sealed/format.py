"""The v1 wire format of sealed payloads: constants, binding, header and frame (pure).

TLS protects one hop; a sealed payload protects the canonical payload (the exact
``multipart/form-data`` body the gateway would otherwise send) end to end, through a
contractor's relay to J-LIS. The wire format is specified for recipients in
``docs/sealed-payload.md``; in short::

    "JPGWSEAL" | 0x01 | signer_kid (32) | header_len u32 | header
               | sig_len u16 | signature | body_len u64 | body

* ``signer_kid``: SHA-256 of the signing key's SubjectPublicKeyInfo, so a recipient
  picks the key and verifies the signature before it parses anything else.
* ``header``: canonical JSON (sorted keys, no whitespace, ASCII) naming the suite, the
  recipient key id, the binding (channel, submission id, and as ``destination`` the
  recipient id agreed with the recipient), the inner content type, the creation time,
  the HPKE encapsulated key and the SHA-256 of ``body``.
* ``signature``: Ed25519 or ECDSA P-256/SHA-256 by the gateway over every byte before
  ``sig_len``. It covers the body through ``body_sha256``.
* ``body``: the RFC 9180 HPKE ciphertext (base mode, single shot, empty aad, ``info``
  bound to the binding), or a DER RFC 5652 EnvelopedData for an RSA certificate.

Pure: bytes in, bytes or values out; no keys, no files, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

from gateway.crypto.sealed.errors import (
    REASON_MALFORMED,
    REASON_SUITE,
    REASON_TOO_LARGE,
    REASON_VERSION,
    SealOpenError,
)

__all__ = [
    "AEAD_AES_256_GCM",
    "DEFAULT_MAX_SIZE",
    "KDF_HKDF_SHA256",
    "KEM_IDS",
    "MAGIC",
    "MEDIA_TYPE",
    "VERSION",
    "SealedHeader",
    "binding",
    "hpke_info",
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
Buffer: TypeAlias = bytes | bytearray | memoryview

KEM_X25519: Final = "x25519"
KEM_MLKEM768_X25519: Final = "mlkem768-x25519"
KEM_IDS: Final[dict[str, int]] = {KEM_X25519: 0x0020, KEM_MLKEM768_X25519: 0x647A}
"""RFC 9180 / IANA HPKE KEM ids: DHKEM(X25519, HKDF-SHA256) and MLKEM768-X25519 (X-Wing)."""
KDF_HKDF_SHA256: Final = 0x0001
AEAD_AES_256_GCM: Final = 0x0002
SIG_ED25519: Final = "ed25519"
SIG_ECDSA_P256: Final = "ecdsa-p256-sha256"

_KEM_BY_ID = {v: k for k, v in KEM_IDS.items()}


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


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(UTC)


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
