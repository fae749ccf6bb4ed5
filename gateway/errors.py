"""The gateway's one small exception hierarchy.

Refusals are facts of the domain (a revoked device, a closed window, a full spool);
the ingress maps each kind to its HTTP status and stable problem ``type`` in one
catalogue (RFC 9457 problem details). No exception text ever carries a field value:
messages name fields and rules only.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

EXIT_CONFIG = 78
"""sysexits.h EX_CONFIG: the configuration, or a file or secret it names, is unusable
(gatewayd and gatewayctl; systemd's RestartPreventExitStatus=78)."""


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True)
class Violation:
    """One broken rule on one field. ``message`` never contains the field's value."""

    field: str
    rule: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "rule": self.rule, "message": self.message}


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration file, located by file and dotted key."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class ConfigError(GatewayError):
    """The configuration cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class SecretFileError(GatewayError):
    """A secret file is missing, unreadable, or readable by others."""


class Unrecoverable(GatewayError):
    """Raised by a supervised task when restarting it cannot help: its supervisor gives
    up at once and the daemon stops (systemd's restart then says why)."""


class SpoolError(GatewayError):
    """The spool cannot store or read a record (never raised for bad input)."""


class RecordCorrupt(SpoolError):
    """A stored record failed authentication or is truncated."""


class KeystoreError(SpoolError):
    """The epoch keystore cannot be opened or used (wrong master key, locked, damaged)."""


class KeyEpochGone(SpoolError):
    """A record's key epoch was destroyed (or is missing): the record is unreadable."""

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        super().__init__(f"unreadable: key epoch {epoch} destroyed")


class StorageFailed(SpoolError):
    """A write to the gateway's state failed (EIO, a failing disk): nothing was stored."""


class StorageUnavailable(StorageFailed):
    """The spool's database could not be reached or dropped the connection (PostgreSQL
    down, restarting, or failing over): nothing new was stored; try again later."""


class StorageFull(StorageFailed):
    """A write to the gateway's state failed because its filesystem is full (ENOSPC,
    EDQUOT, SQLITE_FULL): nothing was stored; it will work again once space returns."""


def is_disk_full(error: BaseException) -> bool:
    """True for a write refused because the filesystem is full."""
    if isinstance(error, StorageFull):
        return True
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class Refusal(GatewayError):
    """A request the gateway refuses, as a fact of the domain, never as HTTP: the
    ingress's problem catalogue (:mod:`gateway.ingress.problems`) says how each kind is
    answered. ``detail`` names fields and rules, never a value; the exception's own
    text is only its kind, so a log of it cannot carry a detail either."""

    detail: str = ""

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after: int | None = None,
        violations: tuple[Violation, ...] = (),
    ) -> None:
        super().__init__(type(self).__name__)
        self.detail = type(self).detail if detail is None else detail
        self.retry_after = retry_after
        self.violations = violations


class NoClientCertificate(Refusal):
    detail = "a device client certificate is required"


class DeviceUnknown(Refusal):
    detail = "this device certificate is not registered"


class DeviceRevoked(Refusal):
    detail = "this device has been disabled (端末無効化)"


class DeviceNotAllowed(Refusal):
    detail = "this device may not post on this channel"


class SourceNetworkNotAllowed(Refusal):
    detail = "this channel does not accept submissions from this network"


class WindowClosed(Refusal):
    """Outside the channel's active window (the detail says which end)."""


class UnknownChannel(Refusal):
    detail = "no channel by that name"


class UserNotAllowedOnChannel(Refusal):
    detail = "this staff user is not named to handle this channel"


class Unauthenticated(Refusal):
    detail = "unknown staff user ID or wrong password"


class LockedOut(Refusal):
    detail = "this staff user is locked out after repeated failures; try again later"


class SignInBusy(Refusal):
    detail = "too many password checks are under way; try again shortly"


class TooManyParts(Refusal):
    """More multipart parts than the channel takes (the detail says how many)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this channel takes at most {limit} parts")


class TooLarge(Refusal):
    """Over the channel's size limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this channel takes at most {limit} bytes")


class UnsupportedMediaType(Refusal):
    detail = "submissions are multipart/form-data"


class Malformed(Refusal):
    detail = "the request could not be parsed"


class BodyTimeout(Refusal):
    """The body stalled (the detail says for how long)."""


class IdempotencyConflict(Refusal):
    detail = "this Idempotency-Key was used for a different body"


class InvalidFields(Refusal):
    detail = "one or more fields break the channel's rules"


class SpoolFull(Refusal):
    detail = "the gateway's spool is at its quota; retry later"


class DiskLow(Refusal):
    detail = "the gateway's disk is nearly full; retry later"


class ShuttingDown(Refusal):
    detail = "retry on another node or later"


class SpoolUnavailable(Refusal):
    detail = "the gateway cannot store submissions right now"


class PhotoCheckUnavailable(Refusal):
    detail = "the photo could not be checked right now; retry"


class ScannerUnavailable(Refusal):
    """The virus scanner gave no verdict (gone, an error, too slow): refused, never let
    through unscanned. ``reason`` is for the log; the device gets the fixed detail."""

    detail = "the virus scanner could not check the file right now; retry later"

    def __init__(self, retry_after: int, reason: str) -> None:
        super().__init__(retry_after=retry_after)
        self.reason = reason


class MalwareDetected(Refusal):
    """The scanner found a signature in a file part (the detail names both)."""

    def __init__(self, part: str, signature: str) -> None:
        super().__init__(f"{part}: malware detected ({signature}); the submission was discarded")
        self.part = part
        self.signature = signature


class UnknownSubmission(Refusal):
    detail = "no submission by that id for this device"


class ExpectationFailed(Refusal):
    detail = "only Expect: 100-continue is understood"


class RelayError(GatewayError):
    """An upstream attempt failed; ``retryable`` says whether tenacity should try again."""

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        local: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.local = local
        """The fault is the record's, not the upstream's: no circuit-breaker failure."""
