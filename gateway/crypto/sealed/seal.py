"""Sealing: encrypt a canonical payload to its recipient (HPKE or CMS) and sign it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.crypto.sealed.format import (
    AEAD_AES_256_GCM,
    KDF_HKDF_SHA256,
    KEM_IDS,
    MEDIA_TYPE,
    Buffer,
    SealedHeader,
    SuiteKind,
    _format_created,
    _signed_part,
    hpke_info,
)
from gateway.crypto.sealed.keyformat import _HPKE_KEMS, _hpke_suite
from gateway.crypto.sealed.keys import Recipient, SigningKey

__all__ = ["Sealed", "Sealer"]


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

        ``destination`` is the recipient id agreed with the recipient (the destination's
        ``recipient_id``, never its name in the configuration); ``content_type`` is the
        canonical payload's own type (with its boundary); ``created`` an aware datetime or
        epoch seconds. ValueError for a bad argument.
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
