"""Sealed payloads (issue 5): HPKE / CMS encryption to the recipient, signed by the gateway.

The recipient side is checked twice: with :func:`open_sealed`, and with ``spec_open``
below, a from-the-spec implementation (docs/sealed-payload.md section 6) that uses only
cryptography's primitives, so the document and the code cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
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
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

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

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "test-vectors"
SUITES = ("hpke-x25519", "hpke-mlkem768-x25519", "cms")
SIGNERS = ("ed25519", "ecdsa-p256-sha256")
PLANTED = "PLANTED-983205673214-秘密"
BOUNDARY = "test-boundary-0c4f"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
BIND = {
    "channel": "online-application",
    "submission_id": "019e6a4c12347a5d3c2b1e0f9a8b7c6d",
    "destination": "dnp-relay",
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
