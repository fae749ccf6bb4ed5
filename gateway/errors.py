"""The gateway's one small exception hierarchy.

Ingress errors carry the HTTP status and the stable problem ``type`` they map to, so the
boundary maps them once (RFC 9457 problem details). No exception text ever carries a
field value: messages name fields and rules only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBLEM_BASE = "https://gateway.invalid/problems/"


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


class SpoolError(GatewayError):
    """The spool cannot store or read a record (never raised for bad input)."""


class RecordCorrupt(SpoolError):
    """A stored record failed authentication or is truncated."""


@dataclass(eq=False)
class ProblemError(GatewayError):
    """An error answered to a device as ``application/problem+json``."""

    status: int
    slug: str
    title: str
    detail: str = ""
    violations: tuple[Violation, ...] = field(default_factory=tuple)
    retry_after: int | None = None

    def __post_init__(self) -> None:
        Exception.__init__(self, f"{self.status} {self.slug}")

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.slug

    def body(self, instance: str | None = None) -> dict[str, object]:
        doc: dict[str, object] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        if self.violations:
            doc["violations"] = [v.as_dict() for v in self.violations]
        return doc


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
