"""The one catalogue of problem types: each refusal of the domain, and the few errors of
HTTP itself, answered as ``application/problem+json`` (RFC 9457).

The core raises facts (:class:`gateway.errors.Refusal` and its kinds); this is the only
place that knows their HTTP status, their stable ``type`` and their title. A device
sees the type ``https://gateway.invalid/problems/<slug>``; logs and metrics count the
slug as the outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from gateway import errors as e

PROBLEM_BASE = "https://gateway.invalid/problems/"
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True)
class ProblemType:
    """How one kind of refusal is answered."""

    status: int
    slug: str
    title: str

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.slug


CATALOGUE: Mapping[type[e.Refusal], ProblemType] = {
    e.Malformed: ProblemType(400, "malformed", "Malformed request"),
    e.Unauthenticated: ProblemType(401, "unauthorized", "Staff credential required"),
    e.NoClientCertificate: ProblemType(403, "device-unknown", "Device not recognised"),
    e.DeviceUnknown: ProblemType(403, "device-unknown", "Device not recognised"),
    e.DeviceRevoked: ProblemType(403, "device-revoked", "Device revoked"),
    e.DeviceNotAllowed: ProblemType(
        403, "device-not-allowed", "Device not allowed on this channel"
    ),
    e.SourceNetworkNotAllowed: ProblemType(
        403, "source-network-not-allowed", "Source network not allowed"
    ),
    e.WindowClosed: ProblemType(403, "channel-inactive", "Channel not active"),
    e.UserNotAllowedOnChannel: ProblemType(
        403, "user-not-allowed-on-channel", "Staff user not named for this channel"
    ),
    e.UnknownChannel: ProblemType(404, "unknown-channel", "Unknown channel"),
    e.UnknownSubmission: ProblemType(404, "unknown-submission", "Unknown submission"),
    e.BodyTimeout: ProblemType(408, "body-timeout", "Request body stalled"),
    e.IdempotencyConflict: ProblemType(409, "idempotency-conflict", "Idempotency-Key reused"),
    e.TooLarge: ProblemType(413, "too-large", "Request too large"),
    e.TooManyParts: ProblemType(413, "too-many-parts", "Too many parts"),
    e.UnsupportedMediaType: ProblemType(415, "unsupported-media-type", "Unsupported media type"),
    e.ExpectationFailed: ProblemType(417, "expectation-failed", "Expectation failed"),
    e.InvalidFields: ProblemType(422, "invalid-fields", "Invalid fields"),
    e.MalwareDetected: ProblemType(422, "malware-detected", "Malware detected"),
    e.LockedOut: ProblemType(429, "locked-out", "Too many failed attempts"),
    e.ShuttingDown: ProblemType(503, "shutting-down", "Gateway is shutting down"),
    e.SignInBusy: ProblemType(503, "sign-in-busy", "Too many sign-ins at once"),
    e.SpoolUnavailable: ProblemType(503, "spool-unavailable", "Spool unavailable"),
    e.PhotoCheckUnavailable: ProblemType(503, "photo-check-unavailable", "Photo check unavailable"),
    e.ScannerUnavailable: ProblemType(503, "scanner-unavailable", "Virus scanner unavailable"),
    e.SpoolFull: ProblemType(507, "spool-full", "Spool full"),
    e.DiskLow: ProblemType(507, "disk-low", "Disk space low"),
}
"""One entry per kind of refusal."""

NOT_FOUND = ProblemType(404, "not-found", "Not Found")
METHOD_NOT_ALLOWED = ProblemType(405, "method-not-allowed", "Method Not Allowed")
INTERNAL_ERROR = ProblemType(500, "internal-error", "Internal error")
"""Errors of HTTP itself (a path or method the API does not have, or a bug)."""


def problem_of(refusal: e.Refusal) -> ProblemType:
    """The problem type a refusal is answered with."""
    return CATALOGUE[type(refusal)]


@dataclass(frozen=True)
class Answered:
    """A refusal as the device is answered: status, type and title from the catalogue,
    detail and Retry-After from the refusal (what tests and the demo look at)."""

    status: int
    slug: str
    title: str
    detail: str
    retry_after: int | None


def answered(refusal: e.Refusal) -> Answered:
    problem = problem_of(refusal)
    return Answered(
        problem.status, problem.slug, problem.title, refusal.detail, refusal.retry_after
    )


def document(
    problem: ProblemType,
    detail: str = "",
    *,
    instance: str | None = None,
    violations: tuple[e.Violation, ...] = (),
) -> dict[str, object]:
    """The RFC 9457 body: type, title, status, and detail, instance, violations if any."""
    doc: dict[str, object] = {"type": problem.uri, "title": problem.title, "status": problem.status}
    if detail:
        doc["detail"] = detail
    if instance:
        doc["instance"] = instance
    if violations:
        doc["violations"] = [v.as_dict() for v in violations]
    return doc


def problem_response(
    problem: ProblemType,
    detail: str = "",
    *,
    instance: str | None = None,
    retry_after: int | None = None,
    violations: tuple[e.Violation, ...] = (),
) -> web.Response:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if problem.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="gateway", charset="UTF-8"'
    body = document(problem, detail, instance=instance, violations=violations)
    return web.json_response(
        body, status=problem.status, content_type=PROBLEM_JSON, headers=headers
    )


def refusal_response(refusal: e.Refusal, instance: str | None = None) -> web.Response:
    """The answer to a refusal, from the catalogue."""
    return problem_response(
        problem_of(refusal),
        refusal.detail,
        instance=instance,
        retry_after=refusal.retry_after,
        violations=refusal.violations,
    )
