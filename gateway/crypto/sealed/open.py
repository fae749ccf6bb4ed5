"""Opening a sealed payload as its recipient: verify, check the binding, then decrypt.

Every failure raises :class:`SealOpenError` whose ``reason`` is one of the ``REASON_*``
constants of :mod:`gateway.crypto.sealed.errors`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.crypto.sealed.errors import (
    REASON_BINDING_CHANNEL,
    REASON_BINDING_DESTINATION,
    REASON_BINDING_SUBMISSION,
    REASON_BODY_DIGEST,
    REASON_DECRYPT,
    REASON_MALFORMED,
    REASON_SIGNATURE,
    REASON_SUITE,
    REASON_UNTRUSTED_SIGNER,
    REASON_WRONG_RECIPIENT,
    SealOpenError,
)
from gateway.crypto.sealed.format import (
    _KEM_BY_ID,
    AEAD_AES_256_GCM,
    DEFAULT_MAX_SIZE,
    KDF_HKDF_SHA256,
    Buffer,
    SealedHeader,
    _parse_header,
    _split_frame,
    hpke_info,
)
from gateway.crypto.sealed.keyformat import _HPKE_KEMS, _hpke_suite
from gateway.crypto.sealed.keys import VerifyKey
from gateway.crypto.sealed.upstream_keys import RecipientPrivateKey

__all__ = ["Opened", "open_sealed"]


@dataclass(frozen=True)
class Opened:
    """A verified and decrypted payload."""

    plaintext: bytes = field(repr=False, compare=False)  # never in a test's failure diff
    content_type: str
    header: SealedHeader
    signer_kid: str


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
    (the ``Gateway-Channel`` and ``Idempotency-Key`` request headers and the recipient id
    it agreed with the gateway).
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
