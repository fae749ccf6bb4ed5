"""The errors of sealed payloads and the reasons an open is refused.

Every failure to open raises :class:`SealOpenError` whose ``reason`` is one of the
``REASON_*`` constants and whose message never carries plaintext or key material;
a key file that cannot be used raises :class:`SealKeyError` naming the file and the rule.
"""

from __future__ import annotations

from typing import Final

from gateway.errors import GatewayError

__all__ = ["REASONS", "SealError", "SealKeyError", "SealOpenError"]

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
    """Base of the errors of the sealed-payload package."""


class SealKeyError(SealError):
    """A recipient key, certificate or signing key cannot be used.

    The message names the file and the rule broken, never key material.
    """


class SealOpenError(SealError):
    """A sealed payload was refused. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"sealed payload refused: {reason}" + (f" ({detail})" if detail else ""))
