"""A spooled record's facts and the one table of its states (pure: no I/O).

States (Postfix's queues, as values of one column): a record is ``queued`` until it is
``delivered`` or ``held`` for an operator; a held record may be ``queued`` again; any
live record may be ``erased`` (its data key destroyed), and nothing follows erasure.
``delivering`` is not stored: it is a queued record a relay worker has claimed, shown
as such by the status API and forgotten by a restart, which puts it back in the queue.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gateway.errors import SpoolError


class State(StrEnum):
    """A record's stored state."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    HELD = "held"
    ERASED = "erased"


DELIVERING = "delivering"
"""The state the status API shows for a queued record under delivery (never stored)."""

TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.DELIVERED, State.HELD, State.ERASED}),
    State.HELD: frozenset({State.QUEUED, State.ERASED}),
    State.DELIVERED: frozenset({State.ERASED}),
    State.ERASED: frozenset(),
}
"""Which state may follow which: every state change of the spool is checked against it."""

LIVE = frozenset(s for s, follows in TRANSITIONS.items() if State.ERASED in follows)
"""States whose record still has its data (and so may be erased)."""


class IllegalTransition(SpoolError):
    """A state change the table does not allow (a bug, never bad input)."""


def check_transition(old: str, new: State) -> None:
    """Raise :class:`IllegalTransition` unless ``new`` may follow ``old``."""
    if new not in TRANSITIONS.get(State(old), frozenset()):
        raise IllegalTransition(f"a record cannot go from {old} to {new}")


def sources_of(new: State) -> frozenset[State]:
    """The states a record may be in to move to ``new``."""
    return frozenset(old for old, follows in TRANSITIONS.items() if new in follows)


def new_submission_id(clock: Callable[[], float] = time.time) -> str:
    """32 hex digits: milliseconds since the epoch, then 80 random bits (sortable, unguessable)."""
    return f"{int(clock() * 1000):012x}{secrets.token_hex(10)}"


def is_submission_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


RECORD_COLUMNS = (
    "id",
    "channel",
    "destination",
    "device_id",
    "user_id",
    "state",
    "received_at",
    "expires_at",
    "delivered_at",
    "held_at",
    "erased_at",
    "content_type",
    "plaintext_size",
    "ciphertext_size",
    "ciphertext_sha256",
    "body_sha256",
    "content_sha256",
    "field_names",
    "idempotency_key",
    "upstream_receipt",
    "attempts",
    "last_error",
)
"""The index columns a :class:`Record` is read from, by name."""


@dataclass(frozen=True)
class Record:
    """A spooled submission's metadata: no field values, no key."""

    id: str
    channel: str
    destination: str
    device_id: str
    user_id: str
    state: str
    received_at: float
    expires_at: float
    delivered_at: float | None
    held_at: float | None
    erased_at: float | None
    content_type: str
    plaintext_size: int
    ciphertext_size: int
    ciphertext_sha256: str
    body_sha256: str
    content_sha256: str
    field_names: tuple[str, ...]
    idempotency_key: str | None  # the keyed hash of Spool.idempotency_token, never the key
    upstream_receipt: str | None
    attempts: int
    last_error: str | None

    @classmethod
    def from_columns(cls, row: Mapping[str, Any]) -> Record:
        """A record from an index row, read by column name."""
        values = {name: row[name] for name in RECORD_COLUMNS}
        values["field_names"] = tuple(json.loads(values["field_names"]))
        return cls(**values)

    @classmethod
    def queued(
        cls,
        record_id: str,
        meta: NewRecord,
        *,
        plaintext_size: int,
        ciphertext_size: int,
        ciphertext_sha256: str,
    ) -> Record:
        """The record just committed from ``meta``: queued, never tried."""
        return cls(
            id=record_id, channel=meta.channel, destination=meta.destination,
            device_id=meta.device_id, user_id=meta.user_id, state=State.QUEUED,
            received_at=meta.received_at, expires_at=meta.expires_at, delivered_at=None,
            held_at=None, erased_at=None, content_type=meta.content_type,
            plaintext_size=plaintext_size, ciphertext_size=ciphertext_size,
            ciphertext_sha256=ciphertext_sha256, body_sha256=meta.body_sha256,
            content_sha256=meta.content_sha256, field_names=meta.field_names,
            idempotency_key=meta.idempotency_key, upstream_receipt=None, attempts=0,
            last_error=None,
        )  # fmt: skip


@dataclass(frozen=True)
class NewRecord:
    """What ingress knows about a submission when it commits it."""

    channel: str
    destination: str
    device_id: str
    user_id: str
    received_at: float
    expires_at: float
    content_type: str
    body_sha256: str
    content_sha256: str
    field_names: tuple[str, ...]
    idempotency_key: str | None


def queued_row(
    record_id: str,
    meta: NewRecord,
    *,
    plaintext_size: int,
    ciphertext_size: int,
    ciphertext_sha256: str,
    wrapped_key: bytes,
    key_epoch: str,
) -> dict[str, Any]:
    """A new record's row, queued, by column name (every backend inserts this)."""
    return {
        "id": record_id,
        "channel": meta.channel,
        "destination": meta.destination,
        "device_id": meta.device_id,
        "user_id": meta.user_id,
        "state": State.QUEUED.value,
        "received_at": meta.received_at,
        "expires_at": meta.expires_at,
        "content_type": meta.content_type,
        "plaintext_size": plaintext_size,
        "ciphertext_size": ciphertext_size,
        "ciphertext_sha256": ciphertext_sha256,
        "body_sha256": meta.body_sha256,
        "content_sha256": meta.content_sha256,
        "field_names": json.dumps(list(meta.field_names)),
        "wrapped_key": wrapped_key,
        "key_epoch": key_epoch,
        "idempotency_key": meta.idempotency_key,
    }


class DuplicateIdempotencyKey(SpoolError):
    """Another record of this device already holds the Idempotency-Key."""


DUE_COLUMNS = (
    "id", "channel", "state", "received_at", "delivered_at", "ciphertext_sha256", "key_epoch",
)  # fmt: skip


@dataclass(frozen=True)
class Due:
    """A live record's facts for the erasure ledger: no personal data."""

    submission_id: str
    channel: str
    state: str
    received_at: float
    delivered_at: float | None
    ciphertext_sha256: str
    key_epoch: str | None = None
    """The Japan day whose epoch key wraps the record's data key (None: from before)."""

    @classmethod
    def from_columns(cls, row: Mapping[str, Any]) -> Due:
        return cls(*(row[name] for name in DUE_COLUMNS))


@dataclass(frozen=True)
class Erased:
    """What the erasure ledger records of one erased record: no personal data."""

    submission_id: str
    channel: str
    received_at: float
    delivered_at: float | None
    erased_at: float
    reason: str
    state_before: str
    ciphertext_sha256: str


@dataclass(frozen=True)
class RecoveryReport:
    records: int
    requeued: int
    orphans_removed: int
    missing_files: int
    keys_migrated: int = 0
    """Data keys wrapped again by their epoch's key (a spool from before key epochs)."""
    unreadable: int = 0
    """Queued records held because their key epoch is gone (a restored backup)."""
