"""The test vectors in docs/test-vectors: writing them and checking them as a recipient.

Keys are derived from fixed labels (the RSA key excepted), so only the randomized parts
(HPKE ephemeral keys, ECDSA, CMS) change between runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.crypto.sealed.errors import (
    REASON_BINDING_CHANNEL,
    REASON_BINDING_DESTINATION,
    REASON_BINDING_SUBMISSION,
    REASON_DECRYPT,
    REASON_UNTRUSTED_SIGNER,
    SealError,
    SealOpenError,
)
from gateway.crypto.sealed.format import (
    _HEADER_OFFSET,
    DEFAULT_MAX_SIZE,
    KEM_MLKEM768_X25519,
    KEM_X25519,
    MAGIC,
    MEDIA_TYPE,
    SIG_ECDSA_P256,
    SIG_ED25519,
    SealedHeader,
    _signed_part,
    _split_frame,
    binding,
    hpke_info,
)
from gateway.crypto.sealed.generate import _recipient_pems, generate_cms_recipient
from gateway.crypto.sealed.keyformat import _pkcs8_pem
from gateway.crypto.sealed.keys import SigningKey, _recipient_from_pem, _signing_key_from_pem
from gateway.crypto.sealed.open import open_sealed
from gateway.crypto.sealed.seal import Sealer
from gateway.crypto.sealed.upstream_keys import (
    recipient_private_key_from_pem,
    verify_key_from_pem,
)

__all__ = ["VECTOR_FORMAT", "VectorMismatch", "check_vector_file", "generate_vectors"]

VECTOR_FORMAT = 1
_VECTOR_CREATED = datetime(2026, 5, 26, 0, 0, 0, tzinfo=UTC)
_VECTOR_SUITES = ("hpke-x25519", "hpke-mlkem768-x25519", "cms")
_VECTOR_BINDINGS = {  # suite: (channel, recipient_id), paired as in conf/gateway.toml
    "hpke-x25519": ("online-application", "jlis-online-application"),
    "hpke-mlkem768-x25519": ("express-issuance", "jlis-express"),
    "cms": ("overseas-application", "jlis-overseas"),
}
_VECTOR_BOUNDARY = "gw-7e1f0c4d9a2b3c5d6e7f8091a2b3c4d5"  # the gateway's form: gw- + 32 hex
_COMMON_FIELDS = {
    "application_id": "12345678901234567890123",
    "wants_e_certificate": "true",
    "wants_braille": "false",
}
_VECTOR_FIELDS: dict[str, dict[str, str]] = {  # synthetic values; text already in NFC
    "online-application": _COMMON_FIELDS,
    "express-issuance": {
        **_COMMON_FIELDS,
        "pin_signature_cert": "ABC12345",
        "pin_user_cert": "1234",
        "pin_resident_registry": "5678",
        "pin_card_info_input": "9012",
    },
    "overseas-application": {
        "application_id": _COMMON_FIELDS["application_id"],
        "name": "番号\u3000花子",
        "name_kana": "バンゴウ\u3000ハナコ",
        "birth_date": "1990-04-01",
        "sex": "2",
        "registered_domicile": "東京都新宿区架空町一丁目1番地",
    },
}
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"jp-gateway sealed-payload test vector: " + label.encode()).digest()


def _vector_plaintext(channel: str) -> tuple[bytes, str, dict[str, object]]:
    """A synthetic canonical payload of ``channel``, shaped exactly as the gateway writes
    one (docs/sealed-payload.md section 4.3): no real person's data. Returns the bytes,
    their content type and what a recipient parses out of them."""
    b = _VECTOR_BOUNDARY
    fields = _VECTOR_FIELDS[channel]
    text = "".join(
        f'--{b}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    )
    photo = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\n\r\n\x00\x80\xff" + bytes(range(256)) + b"\xff\xd9"
    file_head = (
        f'--{b}\r\nContent-Disposition: form-data; name="face_photo"; '
        'filename="face_photo.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    )
    body = (text + file_head).encode("utf-8") + photo + f"\r\n--{b}--\r\n".encode("ascii")
    parsed: dict[str, object] = {
        "fields": dict(fields),
        "files": {
            "face_photo": {
                "filename": "face_photo.jpg",
                "content_type": "image/jpeg",
                "size": len(photo),
                "sha256": hashlib.sha256(photo).hexdigest(),
            }
        },
    }
    return body, f"multipart/form-data; boundary={b}", parsed


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
    other: tuple[str, str],
) -> list[dict[str, object]]:
    """Payloads that must be refused; ``other`` is another (channel, recipient id)."""
    other_channel, other_recipient = other
    frame = _split_frame(sealed, DEFAULT_MAX_SIZE)
    header_start = _HEADER_OFFSET
    sig_start = header_start + len(frame.header) + 2
    body_start = len(sealed) - len(frame.body)
    cases: list[tuple[str, bytes, dict[str, str], str]] = [
        ("flipped byte in the signer key id", _flip(sealed, len(MAGIC) + 3), expected,
         REASON_UNTRUSTED_SIGNER),
        ("flipped byte in the header", _flip(sealed, header_start + 10), expected, "signature"),
        ("header edited to claim another channel, signature kept",
         _edit_header(sealed, replace(header, channel=other_channel)),
         {**expected, "channel": other_channel}, "signature"),
        ("flipped byte in the signature", _flip(sealed, sig_start + 5), expected, "signature"),
        ("flipped byte in the body", _flip(sealed, body_start + 40), expected, "body digest"),
        ("flipped last byte of the body", _flip(sealed, len(sealed) - 1), expected, "body digest"),
        ("format version 2", sealed[: len(MAGIC)] + b"\x02" + sealed[len(MAGIC) + 1 :],
         expected, "unsupported version"),
        ("truncated by one byte", sealed[:-1], expected, "malformed"),
        ("one byte appended", sealed + b"\x00", expected, "malformed"),
        ("recipient expects another channel", sealed,
         {**expected, "channel": other_channel}, REASON_BINDING_CHANNEL),
        ("recipient expects another submission id", sealed,
         {**expected, "submission_id": "0" * 32}, REASON_BINDING_SUBMISSION),
        ("recipient expects another recipient id (destination)", sealed,
         {**expected, "destination": other_recipient}, REASON_BINDING_DESTINATION),
        ("header edited to another channel and re-signed by an untrusted key",
         _resign(sealed, replace(header, channel=other_channel), untrusted),
         {**expected, "channel": other_channel}, REASON_UNTRUSTED_SIGNER),
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
        other_signer = next(s for s in signers.values() if s.key_id != frame.signer_kid)
        cases.append(
            (
                "ciphertext re-signed by another trusted signer (info binds the signer)",
                _resign(sealed, header, other_signer),
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
    written = []
    for index, suite_name in enumerate(_VECTOR_SUITES):
        channel, recipient_id = _VECTOR_BINDINGS[suite_name]
        other = _VECTOR_BINDINGS[_VECTOR_SUITES[(index + 1) % len(_VECTOR_SUITES)]]
        plaintext, content_type, parsed = _vector_plaintext(channel)
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
                "channel": channel,
                "submission_id": f"019e6a4c0000{n:04x}7a5d3c2b1e0f9a8b",
                "destination": recipient_id,  # the destination's agreed recipient_id
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
                "plaintext_parsed": parsed,
                "sealed_b64": base64.b64encode(sealed.data).decode("ascii"),
            }
            if suite == "hpke":
                case["hpke_info_hex"] = hpke_info(
                    content_type=content_type, signer_kid=signer.key_id, **expected
                ).hex()
            cases.append(case)
            if alg == SIG_ED25519:
                invalid = _invalid_cases(
                    sealed.data, sealed.header, expected, signers, untrusted, other
                )
        doc = {
            "vector_format": VECTOR_FORMAT,
            "media_type": MEDIA_TYPE,
            "suite": suite_name,
            "generated_by": "python -m gateway.crypto.sealed.keygen --write-vectors DIR",
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
