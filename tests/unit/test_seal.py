"""Sealed payloads (issue 5): HPKE / CMS encryption to the recipient, signed by the gateway.

The recipient side is checked twice: with :func:`open_sealed`, and with ``spec_open``
below, a from-the-spec implementation (docs/sealed-payload.md section 6) that uses only
cryptography's primitives, so the document and the code cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from gateway.channels.policy import ChannelPolicy
from gateway.config import load_config
from gateway.crypto.sealed import keygen
from gateway.crypto.sealed.errors import SealKeyError, SealOpenError
from gateway.crypto.sealed.format import MEDIA_TYPE
from gateway.crypto.sealed.generate import (
    generate_cms_recipient,
    generate_recipient_key,
    generate_signing_key,
)
from gateway.crypto.sealed.keyformat import HYBRID_PRIVATE_LABEL, _hybrid_from_seed, _pem
from gateway.crypto.sealed.keys import (
    Recipient,
    SigningKey,
    VerifyKey,
    load_recipient,
    load_signing_key,
)
from gateway.crypto.sealed.open import Opened, open_sealed
from gateway.crypto.sealed.seal import Sealed, Sealer
from gateway.crypto.sealed.upstream_keys import (
    RecipientPrivateKey,
    load_recipient_private_key,
    load_verify_key,
    recipient_private_key_from_pem,
)
from gateway.crypto.sealed.vectors import VectorMismatch, check_vector_file, generate_vectors
from gateway.errors import GatewayError
from gateway.ingress.intake import MultipartIntake

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "test-vectors"
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"
SUITES = ("hpke-x25519", "hpke-mlkem768-x25519", "cms")
SIGNERS = ("ed25519", "ecdsa-p256-sha256")
PLANTED = "PLANTED-983205673214-秘密"
BOUNDARY = "test-boundary-0c4f"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
BIND = {
    "channel": "online-application",
    "submission_id": "019e6a4c12347a5d3c2b1e0f9a8b7c6d",
    "destination": "jlis-online-application",  # a destination's recipient_id
}
NOW = datetime.now(UTC)
FAR = NOW + timedelta(days=365)


def payload(photo: bytes = b"\xff\xd8\xff\xe0 bare\nLF and\r\nCRLF \x00\xff\xd9") -> bytes:
    """A canonical multipart body carrying the planted value (and binary bytes)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n'
        f"{PLANTED}\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="face_photo"; '
        f'filename="f.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    ).encode()
    return head + photo + f"\r\n--{BOUNDARY}--\r\n".encode()


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def pkcs8(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def spki_pem(key: Any) -> bytes:
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_cert(
    key: Any,
    *,
    not_before: datetime,
    not_after: datetime,
    key_usage: x509.KeyUsage | None = None,
) -> bytes:
    signer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test recipient")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Party:
    """One suite's recipient: what the gateway holds and what the recipient holds."""

    name: str
    recipient: Recipient
    private: RecipientPrivateKey
    private_pem: bytes
    public_pem: bytes  # public key, or certificate for CMS


@dataclass(frozen=True)
class Keys:
    dir: Path
    rsa: rsa.RSAPrivateKey
    parties: dict[str, Party]
    signers: dict[str, SigningKey]
    signer_files: dict[str, Path]

    def trusted(self) -> list[VerifyKey]:
        return [s.verify_key for s in self.signers.values()]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey) -> Keys:
    d = tmp_path_factory.mktemp("seal-keys")
    parties = {}
    for name in SUITES:
        if name == "cms":
            private_pem, public_pem = generate_cms_recipient("test", key=rsa_key)
            pub_path = write(d / "cms.pem", public_pem, 0o644)
            recipient = load_recipient(pub_path, suite="cms")
            priv_path = write(d / "cms.key", private_pem)
            private = load_recipient_private_key(priv_path, certificate=pub_path)
        else:
            kem = name.removeprefix("hpke-")
            private_pem, public_pem = generate_recipient_key(kem)  # type: ignore[arg-type]
            pub_path = write(d / f"{name}.pub", public_pem, 0o644)
            recipient = load_recipient(pub_path, suite="hpke", kem=kem, not_after=FAR)  # type: ignore[arg-type]
            private = load_recipient_private_key(write(d / f"{name}.key", private_pem))
        assert recipient.key_id == private.key_id
        parties[name] = Party(name, recipient, private, private_pem, public_pem)
    signers, files = {}, {}
    for alg in SIGNERS:
        files[alg] = write(d / f"{alg}.key", generate_signing_key(alg))  # type: ignore[arg-type]
        signers[alg] = load_signing_key(files[alg])
    return Keys(d, rsa_key, parties, signers, files)


def seal_with(
    keys: Keys, suite: str, alg: str = "ed25519", plaintext: bytes | None = None
) -> Sealed:
    sealer = Sealer(keys.parties[suite].recipient, keys.signers[alg])
    return sealer.seal(
        payload() if plaintext is None else plaintext,
        content_type=CONTENT_TYPE,
        created=NOW,
        **BIND,
    )


def open_with(keys: Keys, suite: str, data: bytes, **expected: str) -> Opened:
    return open_sealed(
        data,
        recipient_key=keys.parties[suite].private,
        trusted_signers=keys.trusted(),
        **{**BIND, **expected},
    )


# ------------------------------------------------- an implementation written from the spec


def spec_open(
    data: bytes,
    *,
    private_pem: bytes,
    certificate_pem: bytes | None,
    trusted: dict[str, bytes],
    expected: dict[str, str],
) -> tuple[bytes, dict[str, Any]]:
    """docs/sealed-payload.md section 6, step by step, on cryptography's primitives only."""
    assert data[:8] == b"JPGWSEAL"
    assert data[8] == 1
    kid = data[9:41].hex()
    (hlen,) = struct.unpack(">I", data[41:45])
    header_raw = data[45 : 45 + hlen]
    (slen,) = struct.unpack(">H", data[45 + hlen : 47 + hlen])
    sig = data[47 + hlen : 47 + hlen + slen]
    (blen,) = struct.unpack(">Q", data[47 + hlen + slen : 55 + hlen + slen])
    body = data[55 + hlen + slen :]
    assert len(body) == blen
    signer = serialization.load_pem_public_key(trusted[kid])
    signed = data[: 45 + hlen]
    if isinstance(signer, ed25519.Ed25519PublicKey):
        signer.verify(sig, signed)
        alg = "ed25519"
    else:
        assert isinstance(signer, ec.EllipticCurvePublicKey)
        signer.verify(sig, signed, ec.ECDSA(hashes.SHA256()))
        alg = "ecdsa-p256-sha256"
    header = json.loads(header_raw)
    assert header_raw == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert header["version"] == 1
    assert header["sig_alg"] == alg
    for name, value in expected.items():
        assert header[name] == value
    assert hashlib.sha256(body).hexdigest() == header["body_sha256"]
    if header["suite"] == "cms":
        assert certificate_pem is not None
        cert = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_pem_private_key(private_pem, None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return pkcs7.pkcs7_decrypt_der(body, cert, key, []), header

    def lp(text: str) -> bytes:
        return struct.pack(">H", len(text)) + text.encode("ascii")

    bound = b"".join(
        lp(header[n]) for n in ("channel", "submission_id", "destination", "content_type")
    )
    info = b"jp-gateway-sealed-payload-v1" + hashlib.sha256(bound + lp(kid)).digest()
    enc = base64.urlsafe_b64decode(header["enc"] + "=" * (-len(header["enc"]) % 4))
    assert (header["kdf_id"], header["aead_id"]) == (1, 2)
    private: Any
    if header["kem_id"] == 0x0020:
        private = serialization.load_pem_private_key(private_pem, None)
        kem = hpke.KEM.X25519
    else:
        assert header["kem_id"] == 0x647A
        seed = base64.b64decode(b"".join(private_pem.strip().splitlines()[1:-1]))
        wide = hashlib.shake_256(seed).digest(96)
        private = hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(wide[:64]),
            x25519.X25519PrivateKey.from_private_bytes(wide[64:]),
        )
        kem = hpke.KEM.MLKEM768_X25519
    suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    return suite.decrypt(enc + body, private, info), header


def spec_open_party(keys: Keys, suite: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
    party = keys.parties[suite]
    return spec_open(
        data,
        private_pem=party.private_pem,
        certificate_pem=party.public_pem if suite == "cms" else None,
        trusted={s.key_id: s.public_pem() for s in keys.signers.values()},
        expected=BIND,
    )


_PART_NAME = rb'Content-Disposition: form-data; name="([a-z][a-z0-9_]{0,63})"'
_FILE_PART = _PART_NAME + rb'; filename="([a-z_]+\.[a-z]+)"\r\nContent-Type: ([a-z]+/[a-z-]+)'
_FIXED_FILES = {b"face_photo.jpg": b"image/jpeg", b"batch_file.bin": b"application/octet-stream"}


def spec_parse_plaintext(plaintext: bytes, content_type: str) -> dict[str, Any]:
    """docs/sealed-payload.md section 4.3, the canonical payload's exact shape, strictly."""
    match = re.fullmatch(r"multipart/form-data; boundary=(gw-[0-9a-f]{32})", content_type)
    assert match is not None, content_type
    delimiter = b"--" + match.group(1).encode()
    assert plaintext.startswith(delimiter + b"\r\n")
    assert plaintext.endswith(b"\r\n" + delimiter + b"--\r\n")
    inner = plaintext[len(delimiter) + 2 : -(len(delimiter) + 6)]
    fields: dict[str, str] = {}
    files: dict[str, dict[str, Any]] = {}
    for part in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, blank, value = part.partition(b"\r\n\r\n")
        assert blank
        if text := re.fullmatch(_PART_NAME, head):
            name = text.group(1).decode("ascii")
            decoded = value.decode("utf-8")  # strict: UTF-8, no charset parameter
            assert decoded == unicodedata.normalize("NFC", decoded) == decoded.strip()
            assert decoded and not any(unicodedata.category(c) == "Cc" for c in decoded)
            assert name not in fields and name not in files
            fields[name] = decoded
            continue
        file = re.fullmatch(_FILE_PART, head)
        assert file is not None, head
        name, filename, media = (g.decode("ascii") for g in file.groups())
        assert _FIXED_FILES[filename.encode()] == media.encode()
        assert name not in fields and name not in files
        files[name] = {
            "filename": filename,
            "content_type": media,
            "size": len(value),
            "sha256": hashlib.sha256(value).hexdigest(),
        }
    return {"fields": fields, "files": files}


def frame(kid: str, header: bytes, sig: bytes, body: bytes) -> bytes:
    """Assemble a payload by hand (section 4)."""
    head = b"JPGWSEAL\x01" + bytes.fromhex(kid) + struct.pack(">I", len(header)) + header
    return head + struct.pack(">H", len(sig)) + sig + struct.pack(">Q", len(body)) + body


def split(data: bytes) -> tuple[str, bytes, bytes, bytes]:
    (hlen,) = struct.unpack(">I", data[41:45])
    (slen,) = struct.unpack(">H", data[45 + hlen : 47 + hlen])
    return (
        data[9:41].hex(),
        data[45 : 45 + hlen],
        data[47 + hlen : 47 + hlen + slen],
        data[55 + hlen + slen :],
    )


def resign(data: bytes, signer: SigningKey, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """Edit the header (``edit`` may return raw bytes) and sign it with ``signer``."""
    _, header, _, body = split(data)
    doc = json.loads(header)
    result = edit(doc)
    raw = (
        result
        if isinstance(result, bytes)
        else json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    )
    unsigned = frame(signer.key_id, raw, b"x", body)
    signed = unsigned[: 45 + len(raw)]
    return frame(signer.key_id, raw, signer.sign(signed), body)


# -------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("alg", SIGNERS)
@pytest.mark.parametrize("suite", SUITES)
def test_round_trip(keys: Keys, suite: str, alg: str) -> None:
    """Every suite with every signer opens to the exact bytes, by the code and by the spec."""
    sealed = seal_with(keys, suite, alg)
    assert sealed.media_type == MEDIA_TYPE == "application/vnd.jp-gateway.sealed-payload.v1"
    assert sealed.data == b"".join(sealed.parts)
    assert sealed.size == len(sealed.data)
    assert PLANTED.encode() not in sealed.data
    opened = open_with(keys, suite, sealed.data)
    assert opened.plaintext == payload()
    assert opened.content_type == CONTENT_TYPE
    assert opened.signer_kid == keys.signers[alg].key_id
    assert opened.header == sealed.header
    assert opened.header.created == NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert opened.header.sig_alg == alg
    assert opened.header.recipient_kid == keys.parties[suite].recipient.key_id
    plaintext, header = spec_open_party(keys, suite, sealed.data)
    assert plaintext == payload()
    assert header["suite"] == ("cms" if suite == "cms" else "hpke")
    if suite != "cms":
        assert header["kem_id"] == {"hpke-x25519": 0x20, "hpke-mlkem768-x25519": 0x647A}[suite]
        assert len(base64.urlsafe_b64decode(header["enc"] + "==")) == (
            32 if suite == "hpke-x25519" else 1120
        )
    assert PLANTED not in repr(opened)


@pytest.mark.parametrize("suite", SUITES)
def test_large_payload_and_epoch_created(keys: Keys, suite: str) -> None:
    """A 7 MB photo payload from a memoryview round-trips; epoch seconds are accepted."""
    body = payload(bytes(range(256)) * (7_000_000 // 256))
    sealer = Sealer(keys.parties[suite].recipient, keys.signers["ed25519"])
    sealed = sealer.seal(
        memoryview(body), content_type=CONTENT_TYPE, created=1_780_000_000.9, **BIND
    )
    assert sealed.header.created == "2026-05-28T20:26:40Z"
    assert open_with(keys, suite, sealed.data).plaintext == body


def test_open_accepts_a_memoryview_and_empty_plaintext(keys: Keys) -> None:
    sealed = seal_with(keys, "hpke-x25519", plaintext=b"")
    assert open_with(keys, "hpke-x25519", memoryview(sealed.data)).plaintext == b""  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ tampering


def _region(data: bytes, offset: int) -> str:
    (hlen,) = struct.unpack(">I", data[41:45])
    (slen,) = struct.unpack(">H", data[45 + hlen : 47 + hlen])
    bounds = [
        (8, "magic"),
        (9, "version"),
        (41, "signer_kid"),
        (45, "header_len"),
        (45 + hlen, "header"),
        (47 + hlen, "sig_len"),
        (47 + hlen + slen, "signature"),
        (55 + hlen + slen, "body_len"),
    ]
    for end, name in bounds:
        if offset < end:
            return name
    return "body"


EXPECTED_REASON = {
    "magic": {"malformed"},
    "version": {"unsupported version"},
    "signer_kid": {"untrusted signer"},
    "header_len": {"malformed", "too large"},
    "header": {"signature"},
    "sig_len": {"malformed"},
    "signature": {"signature"},
    "body_len": {"malformed"},
    "body": {"body digest"},
}


@pytest.mark.parametrize("alg", SIGNERS)
@pytest.mark.parametrize("suite", SUITES)
def test_a_flipped_bit_in_any_byte_is_refused_without_revealing_the_payload(
    keys: Keys, suite: str, alg: str
) -> None:
    """Flip one bit of every byte in turn (header, enc, signature, body, lengths)."""
    data = seal_with(keys, suite, alg).data
    seen: set[str] = set()
    for offset in range(len(data)):
        tampered = bytearray(data)
        tampered[offset] ^= 0x01
        with pytest.raises(SealOpenError) as info:
            open_with(keys, suite, bytes(tampered))
        region = _region(data, offset)
        seen.add(region)
        exc = info.value
        assert exc.reason in EXPECTED_REASON[region], (offset, region, exc.reason)
        assert exc.__cause__ is None
        for text in (str(exc), repr(exc)):
            assert PLANTED not in text
            assert "application_id" not in text
    assert seen == set(EXPECTED_REASON)


@pytest.mark.parametrize("suite", SUITES)
def test_truncation_and_extension_are_refused(keys: Keys, suite: str) -> None:
    data = seal_with(keys, suite).data
    for bad in (data[:-1], data + b"\x00", data[:44], b"", b"JPGWSEAL", b"x" * 100):
        with pytest.raises(SealOpenError) as info:
            open_with(keys, suite, bad)
        assert info.value.reason == "malformed"
    with pytest.raises(SealOpenError) as info:
        open_sealed(
            data,
            recipient_key=keys.parties[suite].private,
            trusted_signers=keys.trusted(),
            max_size=len(data) - 1,
            **BIND,
        )
    assert info.value.reason == "too large"


@pytest.mark.parametrize(
    ("expected", "reason"),
    [
        ({"channel": "express-issuance"}, "binding mismatch: channel"),
        ({"submission_id": "0" * 32}, "binding mismatch: submission_id"),
        ({"destination": "jlis-express"}, "binding mismatch: destination"),
    ],
    ids=["channel", "submission_id", "destination"],
)
@pytest.mark.parametrize("suite", SUITES)
def test_binding_mismatch(keys: Keys, suite: str, expected: dict[str, str], reason: str) -> None:
    """A payload replayed on another channel, id or recipient name is refused."""
    data = seal_with(keys, suite).data
    with pytest.raises(SealOpenError) as info:
        open_with(keys, suite, data, **expected)
    assert info.value.reason == reason


@pytest.mark.parametrize("suite", SUITES)
def test_wrong_recipient_key(keys: Keys, suite: str) -> None:
    """Another recipient's key (same or other suite) does not open the payload."""
    data = seal_with(keys, suite).data
    others = [generate_recipient_key("x25519"), generate_recipient_key("mlkem768-x25519")]
    keys_to_try = [recipient_private_key_from_pem(p) for p, _ in others]
    keys_to_try += [p.private for n, p in keys.parties.items() if n != suite]
    for key in keys_to_try:
        with pytest.raises(SealOpenError) as info:
            open_sealed(data, recipient_key=key, trusted_signers=keys.trusted(), **BIND)
        assert info.value.reason == "wrong recipient"
    if suite != "cms":  # and the cryptography agrees, kid check or not
        _, header, _, body = split(data)
        doc = json.loads(header)
        enc = base64.urlsafe_b64decode(doc["enc"] + "==")
        kem = hpke.KEM.X25519 if suite == "hpke-x25519" else hpke.KEM.MLKEM768_X25519
        other = keys_to_try[0 if suite == "hpke-x25519" else 1].hpke_key
        assert other is not None
        with pytest.raises(InvalidTag):
            hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM).decrypt(
                enc + body, other, b"any info"
            )


@pytest.mark.parametrize("suite", SUITES)
def test_header_edited_to_another_channel(keys: Keys, suite: str) -> None:
    """Edited header: kept signature fails; re-signed by a stranger is an untrusted signer."""
    data = seal_with(keys, suite).data
    kid, header, sig, body = split(data)
    doc = json.loads(header)
    doc["channel"] = "express-issuance"
    forged = frame(kid, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), sig, body)
    with pytest.raises(SealOpenError) as info:
        open_with(keys, suite, forged, channel="express-issuance")
    assert info.value.reason == "signature"

    stranger_path = write(keys.dir / f"stranger-{suite}.key", generate_signing_key("ed25519"))
    stranger = load_signing_key(stranger_path)
    resigned = resign(data, stranger, lambda d: d.update(channel="express-issuance"))
    with pytest.raises(SealOpenError) as info:
        open_with(keys, suite, resigned, channel="express-issuance")
    assert info.value.reason == "untrusted signer"
    # ...and a recipient that (wrongly) trusted the stranger still gets no plaintext
    # for HPKE: info binds channel and signer.
    if suite != "cms":
        with pytest.raises(SealOpenError) as info:
            open_sealed(
                resigned,
                recipient_key=keys.parties[suite].private,
                trusted_signers=[stranger.verify_key],
                **{**BIND, "channel": "express-issuance"},
            )
        assert info.value.reason == "decrypt"


@pytest.mark.parametrize("suite", SUITES)
def test_ciphertext_resigned_by_another_trusted_signer(keys: Keys, suite: str) -> None:
    """HPKE binds the signer in info; CMS cannot (documented in section 7 of the spec)."""
    data = seal_with(keys, suite, "ed25519").data
    other = keys.signers["ecdsa-p256-sha256"]
    resigned = resign(data, other, lambda d: d.update(sig_alg=other.alg))
    if suite == "cms":
        assert open_with(keys, suite, resigned).plaintext == payload()
    else:
        with pytest.raises(SealOpenError) as info:
            open_with(keys, suite, resigned)
        assert info.value.reason == "decrypt"


def _dup_channel(d: dict[str, Any]) -> bytes:
    raw = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return ('{"channel":"online-application",' + raw[1:]).encode()


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: d.update(version=2), "unsupported version"),
        (lambda d: d.update(suite="jwe"), "unsupported suite"),
        (lambda d: d.update(kem_id=0x0010), "unsupported suite"),
        (lambda d: d.update(aead_id=3), "unsupported suite"),
        (lambda d: d.update(extra="x"), "malformed"),
        (lambda d: d.pop("created"), "malformed"),
        (lambda d: d.update(created="2026-05-26 00:00:00"), "malformed"),
        (lambda d: d.update(sig_alg="ecdsa-p256-sha256"), "malformed"),
        (lambda d: d.update(version=1.0), "malformed"),
        (lambda d: d.update(channel="online application"), "malformed"),
        (lambda d: d.update(enc=d["enc"] + "="), "malformed"),
        (lambda d: d.update(enc=d["enc"][:-4]), "malformed"),
        (lambda d: d.update(recipient_kid=d["recipient_kid"].upper()), "malformed"),
        (lambda d: json.dumps(d, sort_keys=True).encode(), "malformed"),
        (
            lambda d: json.dumps(dict(reversed(d.items())), separators=(",", ":")).encode(),
            "malformed",
        ),
        (_dup_channel, "malformed"),
        (lambda d: b"[1,2]", "malformed"),
        (lambda d: b"\xff{}", "malformed"),
    ],
    ids=[
        "version-2",
        "unknown-suite",
        "unknown-kem",
        "unknown-aead",
        "unknown-member",
        "missing-member",
        "bad-created",
        "sig-alg-not-the-key",
        "float-version",
        "space-in-channel",
        "padded-enc",
        "short-enc",
        "uppercase-hex",
        "whitespace",
        "unsorted",
        "duplicate-member",
        "not-an-object",
        "not-ascii",
    ],
)
def test_signed_but_invalid_headers(
    keys: Keys, edit: Callable[[dict[str, Any]], Any], reason: str
) -> None:
    """Headers that verify (signed by a trusted key) but break the format are refused."""
    data = seal_with(keys, "hpke-x25519").data
    resigned = resign(data, keys.signers["ed25519"], edit)
    with pytest.raises(SealOpenError) as info:
        open_with(keys, "hpke-x25519", resigned)
    assert info.value.reason == reason


def test_unsupported_format_version(keys: Keys) -> None:
    data = bytearray(seal_with(keys, "hpke-x25519").data)
    data[8] = 2
    with pytest.raises(SealOpenError, match="unsupported version"):
        open_with(keys, "hpke-x25519", bytes(data))


# -------------------------------------------------------------------------- key loading


def _refused(call: Callable[[], object], *needles: str) -> str:
    with pytest.raises(SealKeyError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, GatewayError)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _no_key_material(message: str, *pems: bytes) -> None:
    for pem in pems:
        for line in pem.decode().splitlines():
            if line and not line.startswith("-----"):
                assert line[:16] not in message


def test_hpke_recipient_files_are_validated(keys: Keys, tmp_path: Path) -> None:
    x_priv, x_pub = generate_recipient_key("x25519")
    h_priv, h_pub = generate_recipient_key("mlkem768-x25519")
    ed_pub = spki_pem(ed25519.Ed25519PrivateKey.generate().public_key())
    cert = keys.parties["cms"].public_pem
    cases: list[tuple[str, bytes, str, dict[str, Any], tuple[str, ...]]] = [
        ("x-private", x_priv, "x25519", {"not_after": FAR}, ("holds a private key",)),
        ("h-private", h_priv, "mlkem768-x25519", {"not_after": FAR}, ("holds a private key",)),
        ("ed25519", ed_pub, "x25519", {"not_after": FAR}, ("an Ed25519 key", "X25519")),
        ("cert", cert, "x25519", {"not_after": FAR}, ("exactly one X25519 public key",)),
        ("hybrid-as-x", h_pub, "x25519", {"not_after": FAR}, ("exactly one X25519",)),
        ("x-as-hybrid", x_pub, "mlkem768-x25519", {"not_after": FAR}, ("1216 bytes",)),
        ("no-expiry", x_pub, "x25519", {}, ("not_after", "no expiry")),
        ("expired", x_pub, "x25519", {"not_after": NOW - timedelta(seconds=1)}, ("expired on",)),
        ("expired-date", h_pub, "mlkem768-x25519",
         {"not_after": (NOW - timedelta(days=2)).date()}, ("expired on",)),
        ("garbage", b"not a key\n", "x25519", {"not_after": FAR}, ("X25519",)),
        ("bad-kem", x_pub, "x448", {"not_after": FAR}, ('kem must be "x25519"',)),
    ]  # fmt: skip
    short = h_pub.replace(h_pub.splitlines()[1], h_pub.splitlines()[1][:-4])
    cases.append(("hybrid-short", short, "mlkem768-x25519", {"not_after": FAR}, ("1216",)))
    for name, data, kem, kwargs, needles in cases:
        path = write(tmp_path / f"{name}.pem", data, 0o644)
        message = _refused(
            lambda p=path, k=kem, kw=kwargs: load_recipient(p, suite="hpke", kem=k, **kw),
            str(path),
            *needles,
        )
        _no_key_material(message, data)
    missing = tmp_path / "missing.pub"
    _refused(
        lambda: load_recipient(missing, suite="hpke", not_after=FAR), str(missing), "not exist"
    )
    _refused(
        lambda: load_recipient(
            write(tmp_path / "ok.pub", x_pub),
            suite="none",  # type: ignore[arg-type]
            not_after=FAR,
        ),
        "payload_encryption",
    )


def test_configured_expiry_dates_mean_end_of_day_in_japan(tmp_path: Path) -> None:
    _, pub = generate_recipient_key("x25519")
    path = write(tmp_path / "r.pub", pub, 0o644)
    day = date(2027, 3, 31)
    r = load_recipient(path, suite="hpke", not_after=day, now=datetime(2027, 3, 31, 14, tzinfo=UTC))
    assert r.not_after == datetime(2027, 3, 31, 14, 59, 59, tzinfo=UTC)  # 23:59:59 JST
    assert r.suite_name == "hpke-x25519"
    _refused(
        lambda: load_recipient(
            path, suite="hpke", not_after=day, now=datetime(2027, 3, 31, 15, tzinfo=UTC)
        ),
        "expired on 2027-03-31T14:59:59+00:00",
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        load_recipient(path, suite="hpke", not_after=datetime(2030, 1, 1))


def test_cms_recipient_certificates_are_validated(keys: Keys, tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    past, future = NOW - timedelta(days=10), NOW + timedelta(days=10)
    cases: list[tuple[str, bytes, tuple[str, ...]]] = [
        ("rsa2048", generate_cms_recipient("t", key=small)[1], ("2048 bits", "at least 3072")),
        ("ec", make_cert(ec_key, not_before=past, not_after=future), ("EC key", "RSA")),
        ("expired", generate_cms_recipient("t", key=keys.rsa, now=past, days=5)[1],
         ("expired on",)),
        ("not-yet", generate_cms_recipient("t", key=keys.rsa, now=future)[1],
         ("not valid until",)),
        ("no-keyencipherment", make_cert(keys.rsa, not_before=past, not_after=future,
                                         key_usage=key_usage(key_encipherment=False)),
         ("keyEncipherment",)),
        ("public-key", spki_pem(keys.rsa.public_key()), ("exactly one", "certificate")),
        ("private-key", pkcs8(keys.rsa), ("holds a private key",)),
        ("two-certs", keys.parties["cms"].public_pem * 2, ("exactly one",)),
    ]  # fmt: skip
    for name, data, needles in cases:
        path = write(tmp_path / f"{name}.pem", data, 0o644)
        message = _refused(lambda p=path: load_recipient(p, suite="cms"), str(path), *needles)
        _no_key_material(message, pkcs8(keys.rsa))
    # No keyUsage at all is fine; a configured not_after can only shorten the validity.
    plain = write(
        tmp_path / "plain.pem", make_cert(keys.rsa, not_before=past, not_after=future), 0o644
    )
    soon = NOW + timedelta(days=1)
    assert load_recipient(plain, suite="cms", not_after=soon).not_after == soon
    later = load_recipient(plain, suite="cms", not_after=NOW + timedelta(days=100)).not_after
    assert later == future.replace(microsecond=0)


def test_signing_keys_are_validated(keys: Keys, tmp_path: Path) -> None:
    p384 = pkcs8(ec.generate_private_key(ec.SECP384R1()))
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    good = generate_signing_key("ed25519")
    cases: list[tuple[str, bytes, int, tuple[str, ...]]] = [
        ("rsa", pkcs8(keys.rsa), 0o600, ("RSA-3072", "Ed25519 or ECDSA P-256")),
        ("p384", p384, 0o600, ("secp384r1", "ECDSA P-256 (secp256r1)")),
        ("x25519", pkcs8(x25519.X25519PrivateKey.generate()), 0o600, ("X25519", "Ed25519")),
        ("world", good, 0o644, ("0644", "group or others")),
        ("group", good, 0o640, ("0640",)),
        ("encrypted", encrypted, 0o600, ("encrypted",)),
        ("public", spki_pem(ed25519.Ed25519PrivateKey.generate().public_key()), 0o600,
         ("exactly one PEM private key",)),
        ("garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", 0o600,
         ("not a readable",)),
    ]  # fmt: skip
    for name, data, mode, needles in cases:
        path = write(tmp_path / f"{name}.key", data, mode)
        message = _refused(lambda p=path: load_signing_key(p), str(path), *needles)
        _no_key_material(message, data)
    path = write(tmp_path / "ok.key", good)
    _refused(
        lambda: load_signing_key(path, not_after=NOW - timedelta(days=1)), "expired on", str(path)
    )
    key = load_signing_key(path, not_after=NOW + timedelta(days=30))
    assert key.not_after == NOW + timedelta(days=30)
    assert "PRIVATE" not in repr(key)
    _refused(lambda: load_signing_key(tmp_path / "nope.key"), "does not exist")


def test_verify_and_recipient_private_keys(keys: Keys, tmp_path: Path) -> None:
    signer = keys.signers["ecdsa-p256-sha256"]
    pub = write(tmp_path / "signer.pub", signer.public_pem(), 0o644)
    assert load_verify_key(pub) == signer.verify_key
    bad = write(tmp_path / "rsa.pub", spki_pem(keys.rsa.public_key()), 0o644)
    _refused(lambda: load_verify_key(bad), "RSA", str(bad))
    cms = keys.parties["cms"]
    loose = write(tmp_path / "cms.key", cms.private_pem, 0o644)
    _refused(lambda: load_recipient_private_key(loose), "0644")
    tight = write(tmp_path / "cms-tight.key", cms.private_pem)
    _refused(lambda: load_recipient_private_key(tight), "needs its certificate")
    other_cert = write(
        tmp_path / "other.pem", generate_cms_recipient("o", key=_small_rsa())[1], 0o644
    )
    _refused(lambda: load_recipient_private_key(tight, certificate=other_cert), "does not match")
    ed = write(tmp_path / "ed.key", generate_signing_key("ed25519"))
    _refused(lambda: load_recipient_private_key(ed), "Ed25519")


def _small_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ---------------------------------------------------------------------- arguments, misc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"channel": ""}, "channel"),
        ({"channel": "online application"}, "channel"),
        ({"submission_id": "ａ"}, "submission_id"),
        ({"destination": "x" * 256}, "destination"),
        ({"content_type": " multipart/form-data"}, "content_type"),
        ({"content_type": "multipart/form-data\r\nX: y"}, "content_type"),
        ({"created": datetime(2026, 5, 26)}, "timezone-aware"),
    ],
)
def test_seal_arguments_are_checked(keys: Keys, change: dict[str, Any], message: str) -> None:
    sealer = Sealer(keys.parties["hpke-x25519"].recipient, keys.signers["ed25519"])
    args: dict[str, Any] = {**BIND, "content_type": CONTENT_TYPE, "created": NOW, **change}
    with pytest.raises(ValueError, match=message) as info:
        sealer.seal(payload(), **args)
    assert PLANTED not in str(info.value)


def test_xwing_private_key_format_matches_the_published_test_vector() -> None:
    """The MLKEM768-X25519 key files use the X-Wing seed (draft-connolly-cfrg-xwing-kem)."""
    seed = bytes.fromhex("7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26")
    pem = _pem(HYBRID_PRIVATE_LABEL, seed)
    key = recipient_private_key_from_pem(pem)
    _, public = _hybrid_from_seed(seed)
    assert public.hex().startswith("e2236b35a8c24b39b10aa1323a96a919a2ced88400633a7b07131713")
    assert public.hex().endswith("2d9abac8cd049040ef6534")
    assert key.key_id == hashlib.sha256(public).hexdigest()


# draft-connolly-cfrg-xwing-kem-06, appendix C, the first vector (the same in -05 to -10).
XWING_SEED = "7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26"
XWING_ESEED_X = "35b8cc873c23dc62b8d260169afa2f75ab916a58d974918835d25e6a435085b2"  # eseed[32:]
XWING_CT = (
    "b83aa828d4d62b9a83ceffe1d3d3bb1ef31264643c070c5798927e41fb07914a273f8f96e7826cd5"
    "375a283d7da885304c5de0516a0f0654243dc5b97f8bfeb831f68251219aabdd723bc6512041acba"
    "ef8af44265524942b902e68ffd23221cda70b1b55d776a92d1143ea3a0c475f63ee6890157c7116d"
    "ae3f62bf72f60acd2bb8cc31ce2ba0de364f52b8ed38c79d719715963a5dd3842d8e8b43ab704e47"
    "59b5327bf027c63c8fa857c4908d5a8a7b88ac7f2be394d93c3706ddd4e698cc6ce370101f4d0213"
    "254238b4a2e8821b6e414a1cf20f6c1244b699046f5a01caa0a1a55516300b40d2048c77cc73afba"
    "79afeea9d2c0118bdf2adb8870dc328c5516cc45b1a2058141039e2c90a110a9e16b318dfb53bd49"
    "a126d6b73f215787517b8917cc01cabd107d06859854ee8b4f9861c226d3764c87339ab16c3667d2"
    "f49384e55456dd40414b70a6af841585f4c90c68725d57704ee8ee7ce6e2f9be582dbee985e038ff"
    "c346ebfb4e22158b6c84374a9ab4a44e1f91de5aac5197f89bc5e5442f51f9a5937b102ba3beaebf"
    "6e1c58380a4a5fedce4a4e5026f88f528f59ffd2db41752b3a3d90efabe463899b7d40870c530c88"
    "41e8712b733668ed033adbfafb2d49d37a44d4064e5863eb0af0a08d47b3cc888373bc05f7a33b84"
    "1bc2587c57eb69554e8a3767b7506917b6b70498727f16eac1a36ec8d8cfaf751549f2277db277e8"
    "a55a9a5106b23a0206b4721fa9b3048552c5bd5b594d6e247f38c18c591aea7f56249c72ce7b117a"
    "fcc3a8621582f9cf71787e183dee09367976e98409ad9217a497df888042384d7707a6b78f5f7fb8"
    "409e3b535175373461b776002d799cbad62860be70573ecbe13b246e0da7e93a52168e0fb6a9756b"
    "895ef7f0147a0dc81bfa644b088a9228160c0f9acf1379a2941cd28c06ebc80e44e17aa2f8177010"
    "afd78a97ce0868d1629ebb294c5151812c583daeb88685220f4da9118112e07041fcc24d5564a99f"
    "dbde28869fe0722387d7a9a4d16e1cc8555917e09944aa5ebaaaec2cf62693afad42a3f518fce67d"
    "273cc6c9fb5472b380e8573ec7de06a3ba2fd5f931d725b493026cb0acbd3fe62d00e4c790d965d7"
    "a03a3c0b4222ba8c2a9a16e2ac658f572ae0e746eafc4feba023576f08942278a041fb82a70a595d"
    "5bacbf297ce2029898a71e5c3b0d1c6228b485b1ade509b35fbca7eca97b2132e7cb6bc465375146"
    "b7dceac969308ac0c2ac89e7863eb8943015b24314cafb9c7c0e85fe543d56658c213632599efabf"
    "c1ec49dd8c88547bb2cc40c9d38cbd3099b4547840560531d0188cd1e9c23a0ebee0a03d5577d66b"
    "1d2bcb4baaf21cc7fef1e03806ca96299df0dfbc56e1b2b43e4fc20c37f834c4af62127e7dae86c3"
    "c25a2f696ac8b589dec71d595bfbe94b5ed4bc07d800b330796fda89edb77be0294136139354eb8c"
    "d37591578f9c600dd9be8ec6219fdd507adf3397ed4d68707b8d13b24ce4cd8fb22851bfe9d63240"
    "7f31ed6f7cb1600de56f17576740ce2a32fc5145030145cfb97e63e0e41d354274a079d3e6fb2e15"
)
XWING_SS = "d2df0522128f09dd8e2c92b1e905c793d8f57a54c3da25861f10bf4ca613e384"
XWING_LABEL = b"\\.//^\\"


def xwing_decapsulate(seed: bytes, ct: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """draft-06 section 5.5 by hand, up to the combiner: (ss_M, ss_X, ct_X, pk_X)."""
    expanded = hashlib.shake_256(seed).digest(96)
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    ss_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]).decapsulate(ct[:1088])
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct[1088:]))
    return ss_m, ss_x, ct[1088:], sk_x.public_key().public_bytes_raw()


def _hpke_labeled(suite_id: bytes) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    """RFC 9180 LabeledExtract and LabeledExpand over HKDF-SHA256."""

    def extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return hmac.new(salt, b"HPKE-v1" + suite_id + label + ikm, hashlib.sha256).digest()

    def expand(prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
        full = length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info
        out, block, counter = b"", b"", 1
        while len(out) < length:
            block = hmac.new(prk, block + full + bytes([counter]), hashlib.sha256).digest()
            out, counter = out + block, counter + 1
        return out[:length]

    return extract, expand


def test_mlkem768_x25519_is_the_xwing_of_draft_06() -> None:
    """docs/sealed-payload.md section 3, by hand. The draft's first vector decapsulates to
    its shared secret with the combiner's label last (-05 and later; -00 to -04 put it
    first). What cryptography seals opens with that combiner and the plain RFC 9180 key
    schedule (and not with the label first): the suite is the X-Wing of draft -06."""
    assert XWING_LABEL.hex() == "5c2e2f2f5e5c"
    seed, ct = bytes.fromhex(XWING_SEED), bytes.fromhex(XWING_CT)
    ss_m, ss_x, ct_x, pk_x = xwing_decapsulate(seed, ct)
    assert (
        ct_x
        == x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(XWING_ESEED_X))
        .public_key()
        .public_bytes_raw()
    )
    assert hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).hexdigest() == XWING_SS

    private, public = _hybrid_from_seed(seed)
    assert public[1184:] == pk_x  # pk = pk_M | pk_X
    info = b"jp-gateway-sealed-payload-v1" + bytes(32)
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    sealed = suite.encrypt(b"x-wing", private.public_key(), info)
    enc, ct = sealed[:1120], sealed[1120:]
    ss_m, ss_x, ct_x, pk_x = xwing_decapsulate(seed, enc)
    extract, expand = _hpke_labeled(b"HPKE" + bytes.fromhex("647a00010002"))
    context = b"\x00" + extract(b"", b"psk_id_hash", b"") + extract(b"", b"info_hash", info)

    def open_with(shared: bytes) -> bytes:
        secret = extract(shared, b"secret", b"")
        key = expand(secret, b"key", context, 32)
        nonce = expand(secret, b"base_nonce", context, 12)
        return AESGCM(key).decrypt(nonce, ct, b"")

    label_last = hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()
    assert open_with(label_last) == b"x-wing"
    with pytest.raises(InvalidTag):
        open_with(hashlib.sha3_256(XWING_LABEL + ss_m + ss_x + ct_x + pk_x).digest())


def test_genkey_command_writes_usable_files(tmp_path: Path) -> None:
    for kind in ("x25519", "mlkem768-x25519", "ed25519", "ecdsa-p256", "cms-rsa"):
        prefix = tmp_path / kind
        assert keygen.main(["--genkey", kind, "--out", str(prefix)]) == 0
        private = prefix.with_name(kind + ".key")
        public = prefix.with_name(kind + (".pem" if kind == "cms-rsa" else ".pub"))
        assert private.stat().st_mode & 0o777 == 0o600
        if kind in ("ed25519", "ecdsa-p256"):
            assert load_signing_key(private).key_id == load_verify_key(public).key_id
        elif kind == "cms-rsa":
            r = load_recipient(public, suite="cms")
            assert r.key_id == load_recipient_private_key(private, certificate=public).key_id
        else:
            r = load_recipient(public, suite="hpke", kem=kind, not_after=FAR)  # type: ignore[arg-type]
            assert r.key_id == load_recipient_private_key(private).key_id
        assert keygen.main(["--genkey", kind, "--out", str(prefix)]) == 1  # never overwrites


# ---------------------------------------------------------------------------- vectors


def _check_vectors_with_spec(path: Path) -> int:
    doc = json.loads(path.read_text())
    rec = doc["recipient"]
    trusted = {s["key_id"]: s["public_key_pem"].encode() for s in doc["signers"]}
    for case in doc["cases"]:
        plaintext, header = spec_open(
            base64.b64decode(case["sealed_b64"]),
            private_pem=rec["private_key_pem"].encode(),
            certificate_pem=rec.get("certificate_pem", "").encode() or None,
            trusted=trusted,
            expected=case["expected"],
        )
        assert plaintext == base64.b64decode(case["plaintext_b64"])
        assert json.dumps(header, sort_keys=True, separators=(",", ":")) == case["header_json"]
        assert spec_parse_plaintext(plaintext, header["content_type"]) == case["plaintext_parsed"]
    return len(doc["cases"])


def test_generated_vectors_open(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """Vectors are generated on every run, then opened by the code and by the spec."""
    paths = generate_vectors(tmp_path, rsa_key=rsa_key)
    assert sorted(p.name for p in paths) == sorted(f"{s}.json" for s in SUITES)
    for path in paths:
        doc = json.loads(path.read_text())
        assert {c["error"] for c in doc["invalid"]} >= {
            "signature",
            "body digest",
            "untrusted signer",
            "malformed",
            "unsupported version",
            "binding mismatch: channel",
        }
        assert check_vector_file(path) == len(doc["cases"]) + len(doc["invalid"])
        assert _check_vectors_with_spec(path) == 2


def test_committed_vectors_still_open() -> None:
    """docs/test-vectors must open with today's code: the format cannot drift silently."""
    paths = sorted(VECTORS.glob("*.json"))
    assert sorted(p.name for p in paths) == sorted(f"{s}.json" for s in SUITES)
    for path in paths:
        assert check_vector_file(path) >= 2
        assert _check_vectors_with_spec(path) == 2


class _Pending:
    """Where MultipartIntake writes the record's plaintext: memory, for this test."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writer = type("Writer", (), {"plaintext_size": 0})()

    def write(self, chunk: bytes | memoryview) -> None:
        self.data += chunk
        self.writer.plaintext_size = len(self.data)


def test_the_gateway_writes_the_plaintext_the_document_describes() -> None:
    """What a device posts becomes the canonical payload of section 4.3: the device's
    part order, fixed file name and type, boolean spelled out, text trimmed and NFC, an
    unlisted part gone, the gateway's own boundary."""
    config = load_config(SHIPPED_CONFIG)
    channel = "overseas-application"
    policy = ChannelPolicy.from_config(channel, config.channels[channel])
    device = b"----device-boundary-7MA4YWxk"
    photo = b"\xff\xd8\xff\xe0JFIF\r\n--" + device[:-1] + b"X\r\n" + bytes(range(256)) + b"\xff\xd9"
    name = "番号\u3000ガ子"
    sent = [
        (b'name="face_photo"; filename="IMG_0001.JPG"\r\nContent-Type: image/jpg', photo),
        (b'name="name"', (" " + unicodedata.normalize("NFD", name) + " ").encode()),
        (b'name="nickname"', "ノ".encode()),
        (b'name="wants_braille"', b"0"),
        (b'name="birth_date"', b"1990-04-01"),
        (b'name="application_id"', b"12345678901234567890123"),
    ]
    body = b"".join(
        b"--" + device + b"\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + value
        + b"\r\n"
        for head, value in sent
    ) + b"--" + device + b"--\r\n"  # fmt: skip
    pending = _Pending()
    intake = MultipartIntake(policy, pending, device)  # type: ignore[arg-type]
    intake.feed(body)
    assert not intake.finish().violations
    plaintext = bytes(pending.data)
    assert spec_parse_plaintext(plaintext, intake.content_type) == {
        "fields": {
            "name": name,
            "wants_braille": "false",
            "birth_date": "1990-04-01",
            "application_id": "12345678901234567890123",
        },
        "files": {
            "face_photo": {
                "filename": "face_photo.jpg",
                "content_type": "image/jpeg",
                "size": len(photo),
                "sha256": hashlib.sha256(photo).hexdigest(),
            }
        },
    }
    names = re.findall(rb'name="([a-z_]+)"', plaintext)
    assert names == [b"face_photo", b"name", b"wants_braille", b"birth_date", b"application_id"]


def test_committed_vectors_bind_the_shipped_recipient_ids() -> None:
    """Each vector binds the channel and recipient_id conf/gateway.toml pairs with its suite."""
    config = load_config(SHIPPED_CONFIG)
    shipped = {}
    for channel_name, channel in config.channels.items():
        dest = config.destinations[channel.destination]
        if dest.payload_encryption != "none":
            suite = "cms" if dest.payload_encryption == "cms" else f"hpke-{dest.payload_kem}"
            shipped[suite] = (channel_name, dest.recipient_id)
    assert sorted(shipped) == sorted(SUITES)
    for suite, (channel_name, recipient_id) in shipped.items():
        doc = json.loads((VECTORS / f"{suite}.json").read_text())
        for case in doc["cases"]:
            assert case["expected"]["channel"] == channel_name
            assert case["expected"]["destination"] == recipient_id
            assert json.loads(case["header_json"])["destination"] == recipient_id


def test_a_drifted_vector_is_detected(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    (path,) = [p for p in generate_vectors(tmp_path, rsa_key=rsa_key) if p.stem == "hpke-x25519"]
    doc = json.loads(path.read_text())
    bound = doc["cases"][0]["binding_hex"]
    doc["cases"][0]["binding_hex"] = bound[:-2] + ("11" if bound[-2:] == "00" else "00")
    doc["invalid"][0]["error"] = "decrypt"
    path.write_text(json.dumps(doc))
    with pytest.raises(VectorMismatch, match="binding differs"):
        check_vector_file(path)
    doc["cases"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(VectorMismatch, match="expected 'decrypt'"):
        check_vector_file(path)
    assert keygen.main(["--check-vectors", str(tmp_path)]) == 1
    assert keygen.main(["--check-vectors", str(tmp_path / "empty")]) == 1
