"""Every SQL statement of the spool index, each a function of a connection.

Rows are read by column name. State changes are built from the state table
(:data:`gateway.spool.records.TRANSITIONS`): an UPDATE only ever matches a record in
a state the table allows to move to the new one, so no statement can make an illegal
transition, whatever its caller believes the record's state to be.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.spool.records import (
    DUE_COLUMNS,
    RECORD_COLUMNS,
    Due,
    DuplicateIdempotencyKey,
    NewRecord,
    Record,
    State,
    check_transition,
    queued_row,
    sources_of,
)

SCHEMA_VERSION = 2
"""Bumped whenever SCHEMA changes; an index of another version is refused, not guessed at
(version 1, before key epochs, is upgraded: :func:`upgrade_from_v1`)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    destination TEXT NOT NULL,
    device_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    state TEXT NOT NULL,
    received_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    delivered_at REAL,
    held_at REAL,
    erased_at REAL,
    erase_reason TEXT,
    content_type TEXT NOT NULL,
    plaintext_size INTEGER NOT NULL,
    ciphertext_size INTEGER NOT NULL,
    ciphertext_sha256 TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    field_names TEXT NOT NULL,
    wrapped_key BLOB,
    key_epoch TEXT,
    idempotency_key TEXT,
    upstream_receipt TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS records_idempotency
    ON records (device_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_queue ON records (state, destination, received_at);
CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_at) WHERE erased_at IS NULL;
CREATE INDEX IF NOT EXISTS records_epoch ON records (key_epoch) WHERE wrapped_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS access_pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL
);
"""
# access_pending (added without a version bump: an older gateway ignores it) holds access
# log entries until the exporter has them in the day's file; seq is the entry's number
# in the access log's chain.

_RECORD = ", ".join(RECORD_COLUMNS)
_DUE = ", ".join(DUE_COLUMNS)

# What each transition writes besides the state (the new state's own columns).
SET_DELIVERED = "delivered_at=?, upstream_receipt=?, attempts=attempts+1, last_error=NULL"
SET_HELD = "held_at=?, last_error=?, attempts=attempts+1"
SET_REQUEUED = "held_at=NULL"
SET_FOUND_MISSING = "held_at=?, last_error=?"  # at start-up: no attempt was made


def _named(cursor: sqlite3.Cursor, row: Sequence[Any]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _all(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    return [_named(cursor, row) for row in cursor.fetchall()]


def _one(cursor: sqlite3.Cursor) -> dict[str, Any] | None:
    row = cursor.fetchone()
    return None if row is None else _named(cursor, row)


def _marks(values: Iterable[object]) -> str:
    return ",".join("?" for _ in values)


# ------------------------------------------------------------------------- writing


def insert_record(
    conn: sqlite3.Connection,
    record_id: str,
    meta: NewRecord,
    *,
    plaintext_size: int,
    ciphertext_size: int,
    ciphertext_sha256: str,
    wrapped_key: bytes,
    key_epoch: str,
) -> None:
    """The new record's row, queued; DuplicateIdempotencyKey if its key is taken."""
    row = queued_row(
        record_id,
        meta,
        plaintext_size=plaintext_size,
        ciphertext_size=ciphertext_size,
        ciphertext_sha256=ciphertext_sha256,
        wrapped_key=wrapped_key,
        key_epoch=key_epoch,
    )
    sql = f"INSERT INTO records ({', '.join(row)}) VALUES ({_marks(row)})"  # noqa: S608
    try:
        conn.execute(sql, tuple(row.values()))
    except sqlite3.IntegrityError:
        raise DuplicateIdempotencyKey("idempotency key already used") from None


def move(
    conn: sqlite3.Connection, record_id: str, to: State, assignments: str, params: Sequence[Any]
) -> int:
    """Move one live record to ``to`` if the state table allows it from its state now;
    returns how many rows changed (0 or 1)."""
    sources = sorted(sources_of(to))
    sql = (
        f"UPDATE records SET state=?, {assignments} WHERE id=? "  # noqa: S608 - constants
        f"AND wrapped_key IS NOT NULL AND state IN ({_marks(sources)})"
    )
    return conn.execute(sql, (to.value, *params, record_id, *sources)).rowcount


def note_attempt(conn: sqlite3.Connection, record_id: str, reason: str) -> None:
    conn.execute(
        "UPDATE records SET attempts=attempts+1, last_error=? WHERE id=?", (reason, record_id)
    )


def erase_rows(
    conn: sqlite3.Connection, record_ids: Sequence[str], *, reason: str, at: float
) -> list[dict[str, Any]]:
    """Destroy the data key of each live record (state erased); returns what each was."""
    erased = []
    for record_id in record_ids:
        row = _one(
            conn.execute(
                "SELECT id, channel, state, received_at, delivered_at, ciphertext_size, "
                "ciphertext_sha256 FROM records WHERE id=? AND wrapped_key IS NOT NULL",
                (record_id,),
            )
        )
        if row is None:
            continue
        check_transition(row["state"], State.ERASED)
        conn.execute(
            "UPDATE records SET wrapped_key=NULL, state=?, erased_at=?, erase_reason=? WHERE id=?",
            (State.ERASED.value, at, reason, record_id),
        )
        erased.append(row)
    return erased


# ------------------------------------------------------------------------- reading


def live_ids(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT id FROM records WHERE wrapped_key IS NOT NULL")}


def counts_and_bytes(conn: sqlite3.Connection) -> tuple[dict[str, int], int]:
    """Live records per state, and the bytes of their ciphertext."""
    counts = conn.execute(
        "SELECT state, COUNT(*) FROM records WHERE erased_at IS NULL GROUP BY state"
    ).fetchall()
    total = conn.execute(
        "SELECT COALESCE(SUM(ciphertext_size), 0) FROM records WHERE erased_at IS NULL"
    ).fetchone()[0]
    return dict(counts), int(total)


def undelivered(conn: sqlite3.Connection) -> list[tuple[str, float]]:
    """(id, received_at) of every queued or held record, oldest first."""
    return conn.execute(
        "SELECT id, received_at FROM records WHERE state IN (?, ?) "
        "AND erased_at IS NULL ORDER BY received_at, id",
        (State.QUEUED.value, State.HELD.value),
    ).fetchall()


def record(conn: sqlite3.Connection, record_id: str) -> Record | None:
    row = _one(conn.execute(f"SELECT {_RECORD} FROM records WHERE id=?", (record_id,)))  # noqa: S608
    return None if row is None else Record.from_columns(row)


def idempotent(conn: sqlite3.Connection, device_id: str, key: str) -> Record | None:
    row = _one(
        conn.execute(
            f"SELECT {_RECORD} FROM records WHERE device_id=? AND idempotency_key=?",  # noqa: S608
            (device_id, key),
        )
    )
    return None if row is None else Record.from_columns(row)


def queued_ids(conn: sqlite3.Connection, destination: str) -> list[str]:
    """Queued records of ``destination``, oldest first."""
    rows = conn.execute(
        "SELECT id FROM records WHERE state=? AND destination=? ORDER BY received_at, id",
        (State.QUEUED.value, destination),
    )
    return [r[0] for r in rows]


def wrapped_key(conn: sqlite3.Connection, record_id: str) -> tuple[bytes, str | None] | None:
    """A live record's wrapped data key and its key epoch (None: erased or unknown)."""
    row = conn.execute(
        "SELECT wrapped_key, key_epoch FROM records WHERE id=?", (record_id,)
    ).fetchone()
    return (bytes(row[0]), row[1]) if row and row[0] is not None else None


# --------------------------------------------------------------------- key epochs


def upgrade_from_v1(conn: sqlite3.Connection) -> None:
    """A version 1 index (keys wrapped by the master key) gets its ``key_epoch`` column;
    :func:`legacy_keys` then finds the rows whose key the spool wraps again."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
    if "key_epoch" not in columns:
        conn.execute("ALTER TABLE records ADD COLUMN key_epoch TEXT")


def legacy_keys(conn: sqlite3.Connection, limit: int) -> list[tuple[str, float, bytes]]:
    """(id, expires_at, wrapped key) of live records whose key the master key wraps."""
    rows = conn.execute(
        "SELECT id, expires_at, wrapped_key FROM records "
        "WHERE key_epoch IS NULL AND wrapped_key IS NOT NULL LIMIT ?",
        (limit,),
    ).fetchall()
    return [(r[0], r[1], bytes(r[2])) for r in rows]


def set_epoch_keys(conn: sqlite3.Connection, rows: Sequence[tuple[str, str, bytes]]) -> None:
    """Store each (id, epoch, key wrapped by that epoch's key) of live records."""
    conn.executemany(
        "UPDATE records SET wrapped_key=?, key_epoch=? WHERE id=? AND wrapped_key IS NOT NULL",
        [(wrapped, epoch, record_id) for record_id, epoch, wrapped in rows],
    )


def live_epochs(conn: sqlite3.Connection) -> dict[str | None, int]:
    """How many live records each key epoch wraps."""
    rows = conn.execute(
        "SELECT key_epoch, COUNT(*) FROM records WHERE wrapped_key IS NOT NULL GROUP BY key_epoch"
    ).fetchall()
    return dict(rows)


def in_epoch(conn: sqlite3.Connection, epoch: str) -> list[Due]:
    """The erasure facts of the live records of one key epoch."""
    rows = conn.execute(
        f"SELECT {_DUE} FROM records WHERE key_epoch=? AND wrapped_key IS NOT NULL",  # noqa: S608
        (epoch,),
    )
    return [Due.from_columns(row) for row in _all(rows)]


def due(conn: sqlite3.Connection, now: float, limit: int) -> list[Due]:
    """Every delivered copy still present, then those whose retention ended by ``now``."""
    delivered = _all(
        conn.execute(
            f"SELECT {_DUE} FROM records WHERE state=? "  # noqa: S608 - constant columns
            "AND erased_at IS NULL ORDER BY received_at LIMIT ?",
            (State.DELIVERED.value, limit),
        )
    )
    expired = _all(
        conn.execute(
            f"SELECT {_DUE} FROM records WHERE erased_at IS NULL "  # noqa: S608
            "AND expires_at <= ? AND state != ? ORDER BY expires_at LIMIT ?",
            (now, State.DELIVERED.value, limit - len(delivered)),
        )
    )
    return [Due.from_columns(row) for row in delivered + expired]


def expiring_undelivered(conn: sqlite3.Connection, deadline: float) -> dict[str, int]:
    """Per channel, the undelivered records whose deadline falls at or before ``deadline``."""
    rows = conn.execute(
        "SELECT channel, COUNT(*) FROM records WHERE erased_at IS NULL "
        "AND state IN (?, ?) AND expires_at <= ? GROUP BY channel",
        (State.QUEUED.value, State.HELD.value, deadline),
    ).fetchall()
    return dict(rows)


def overdue(conn: sqlite3.Connection, now: float, delivered_before: float) -> int:
    """Live copies past their deadline: retention ended, or delivered before
    ``delivered_before`` (a delivered copy's deadline is its delivery)."""
    row = conn.execute(
        "SELECT COUNT(*) FROM records WHERE erased_at IS NULL AND wrapped_key IS NOT NULL "
        "AND (expires_at <= ? OR (state=? AND delivered_at <= ?))",
        (now, State.DELIVERED.value, delivered_before),
    ).fetchone()
    return int(row[0])


def describe(conn: sqlite3.Connection, record_ids: Sequence[str]) -> list[Due]:
    """The erasure facts of those of these records that are still live, in order."""
    found = []
    for record_id in record_ids:
        row = _one(
            conn.execute(
                f"SELECT {_DUE} FROM records WHERE id=? AND erased_at IS NULL",  # noqa: S608
                (record_id,),
            )
        )
        if row is not None:
            found.append(Due.from_columns(row))
    return found


def select_records(
    conn: sqlite3.Connection,
    *,
    states: Sequence[str] = (),
    channel: str | None = None,
    record_id: str | None = None,
    limit: int = 100,
) -> list[Record]:
    """Records' metadata, newest first, filtered (for the operators' listing)."""
    where, params = ["1=1"], []
    if states:
        where.append(f"state IN ({_marks(states)})")
        params += list(states)
    if channel is not None:
        where.append("channel=?")
        params.append(channel)
    if record_id is not None:
        where.append("id=?")
        params.append(record_id)
    sql = (
        f"SELECT {_RECORD} FROM records WHERE {' AND '.join(where)} "  # noqa: S608 - constant parts
        "ORDER BY received_at DESC LIMIT ?"
    )
    return [Record.from_columns(row) for row in _all(conn.execute(sql, (*params, limit)))]


# ------------------------------------------------------------------ access log


def insert_access(conn: sqlite3.Connection, body: str) -> int:
    """An access log entry, numbered; committed with whatever else its group holds."""
    cursor = conn.execute("INSERT INTO access_pending (body) VALUES (?)", (body,))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def pending_access(conn: sqlite3.Connection, limit: int) -> list[tuple[int, str]]:
    rows = conn.execute(
        "SELECT seq, body FROM access_pending ORDER BY seq LIMIT ?", (limit,)
    ).fetchall()
    return [(int(seq), str(body)) for seq, body in rows]


def forget_access(conn: sqlite3.Connection, through: int) -> None:
    conn.execute("DELETE FROM access_pending WHERE seq <= ?", (through,))


def number_access_after(conn: sqlite3.Connection, seq: int) -> None:
    """Entries from now on are numbered after ``seq`` (the access log's head), whatever
    this index numbered before (a new spool beside an existing access log)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'access_pending'").fetchone()
    if row is None:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('access_pending', ?)", (seq,))
    elif int(row[0]) < seq:
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'access_pending'", (seq,))
