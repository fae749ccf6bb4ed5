"""Every SQL statement of the PostgreSQL spool (schema ``gateway``), each a coroutine
of a connection, and the one translation of the driver's errors into the spool's.

The tables mirror the SQLite index (:mod:`gateway.spool.queries`): ``records`` has the
same columns plus the lease of the node delivering a record (``claimed_by``,
``lease_until``, epoch seconds of that node's clock); ``record_chunks`` holds each
record's ciphertext as 256 KiB ``bytea`` rows; ``access_pending`` the access log entries
each node has not exported yet, numbered per node.

State changes are built from the state table (:data:`gateway.spool.records.TRANSITIONS`),
as in SQLite: an UPDATE only matches a record in a state allowed to move to the new one.
Statements that lock several rows lock them in id order, so two nodes never deadlock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from gateway.pgutil import unavailable
from gateway.spool.records import (
    RECORD_COLUMNS,
    DuplicateIdempotencyKey,
    State,
    sources_of,
)

Conn = psycopg.AsyncConnection[Any]
Connect = Callable[[], AbstractAsyncContextManager[Conn]]
"""A connection of the spool's pool, its errors translated (:func:`connection`)."""

CHUNK_SIZE = 256 * 1024
"""Bytes of ciphertext per ``record_chunks`` row."""

IDEMPOTENCY_INDEX = "records_idempotency"

DDL = """
CREATE TABLE IF NOT EXISTS gateway.records (
    id text PRIMARY KEY,
    channel text NOT NULL,
    destination text NOT NULL,
    device_id text NOT NULL,
    user_id text NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'delivered', 'held', 'erased')),
    received_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    delivered_at double precision,
    held_at double precision,
    erased_at double precision,
    erase_reason text,
    content_type text NOT NULL,
    plaintext_size bigint NOT NULL,
    ciphertext_size bigint NOT NULL,
    ciphertext_sha256 text NOT NULL,
    body_sha256 text NOT NULL,
    content_sha256 text NOT NULL,
    field_names text NOT NULL,
    wrapped_key bytea,
    key_epoch text,
    idempotency_key text,
    upstream_receipt text,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    claimed_by text,
    lease_until double precision
);
CREATE TABLE IF NOT EXISTS gateway.record_chunks (
    record_id text NOT NULL,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (record_id, seq)
);
CREATE TABLE IF NOT EXISTS gateway.access_pending (
    node text NOT NULL,
    seq bigint NOT NULL,
    body text NOT NULL,
    PRIMARY KEY (node, seq)
);
DO $$
BEGIN
    -- Checked first: CREATE INDEX IF NOT EXISTS and ALTER TABLE lock the table even
    -- when there is nothing to do, and other nodes are writing to it.
    IF to_regclass('gateway.records_idempotency') IS NULL THEN
        CREATE UNIQUE INDEX records_idempotency ON gateway.records
            (device_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    END IF;
    IF to_regclass('gateway.records_queue') IS NULL THEN
        CREATE INDEX records_queue ON gateway.records (state, destination, received_at);
    END IF;
    IF to_regclass('gateway.records_expiry') IS NULL THEN
        CREATE INDEX records_expiry ON gateway.records (expires_at) WHERE erased_at IS NULL;
    END IF;
    IF to_regclass('gateway.records_epoch') IS NULL THEN
        CREATE INDEX records_epoch ON gateway.records (key_epoch)
            WHERE wrapped_key IS NOT NULL;
    END IF;
    IF to_regclass('gateway.records_live') IS NULL THEN
        CREATE INDEX records_live ON gateway.records (state) INCLUDE (ciphertext_size)
            WHERE erased_at IS NULL;
    END IF;
    IF to_regclass('gateway.records_undelivered') IS NULL THEN
        CREATE INDEX records_undelivered ON gateway.records (received_at, id)
            WHERE state IN ('queued', 'held') AND erased_at IS NULL;
    END IF;
    IF to_regclass('gateway.records_claims') IS NULL THEN
        CREATE INDEX records_claims ON gateway.records (claimed_by)
            WHERE claimed_by IS NOT NULL;
    END IF;
    -- Ciphertext does not compress: stored out of line as it is, never tried.
    IF (SELECT attstorage FROM pg_attribute WHERE attname = 'data'
            AND attrelid = 'gateway.record_chunks'::regclass) <> 'e' THEN
        ALTER TABLE gateway.record_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
    END IF;
END
$$;
"""

_RECORD = ", ".join(f"r.{c}" for c in RECORD_COLUMNS)
_LIVE_STATE = "r.claimed_by, r.lease_until"

# What each transition writes besides the state (the new state's own columns).
SET_DELIVERED = "delivered_at=%s, upstream_receipt=%s, attempts=attempts+1, last_error=NULL"
SET_HELD = "held_at=%s, last_error=%s, attempts=attempts+1"
SET_REQUEUED = "held_at=NULL"

INSERT_COLUMNS = (
    "id", "channel", "destination", "device_id", "user_id", "state", "received_at",
    "expires_at", "content_type", "plaintext_size", "ciphertext_size", "ciphertext_sha256",
    "body_sha256", "content_sha256", "field_names", "wrapped_key", "key_epoch",
    "idempotency_key",
)  # fmt: skip
INSERT_RECORD = (
    f"INSERT INTO gateway.records ({', '.join(INSERT_COLUMNS)}) "  # noqa: S608 - constants
    f"VALUES ({', '.join(f'%({c})s' for c in INSERT_COLUMNS)})"
)
INSERT_ACCESS = "INSERT INTO gateway.access_pending (node, seq, body) VALUES (%s, %s, %s)"
COPY_CHUNKS = "COPY gateway.record_chunks (record_id, seq, data) FROM STDIN (FORMAT BINARY)"
CHUNK_TYPES = ("text", "int4", "bytea")


# ----------------------------------------------------------------------- errors


def spool_error(error: BaseException) -> BaseException:
    """The spool's error for a driver error, its message free of values and of the DSN:
    DuplicateIdempotencyKey for the idempotency index, StorageUnavailable when the
    server cannot be reached (:func:`gateway.pgutil.unavailable`), else a SpoolError
    naming the error's class; never the driver's own exception or text."""
    if (
        isinstance(error, psycopg.errors.UniqueViolation)
        and error.diag.constraint_name == IDEMPOTENCY_INDEX
    ):
        return DuplicateIdempotencyKey("idempotency key already used")
    return unavailable(error)


@asynccontextmanager
async def connection(
    pool: AsyncConnectionPool[Conn], wait: float | None = None
) -> AsyncIterator[Conn]:
    """A connection of ``pool`` for a block whose driver errors leave it translated
    (:func:`spool_error`), the driver's own text left behind."""
    try:
        async with pool.connection(wait) as conn:
            yield conn
    except psycopg.Error as exc:
        raise spool_error(exc) from None


# ------------------------------------------------------------------------ writing


async def move(
    conn: Conn, record_id: str, to: State, assignments: str, params: Sequence[Any], node: str
) -> bool:
    """Move one live record to ``to`` if the state table allows it from its state now,
    clearing any claim; otherwise only this node's claim is cleared. True if moved."""
    sources = sorted(s.value for s in sources_of(to))
    cur = await conn.execute(
        f"UPDATE gateway.records SET state=%s, {assignments}, "  # noqa: S608 - constants
        "claimed_by=NULL, lease_until=NULL "
        "WHERE id=%s AND wrapped_key IS NOT NULL AND state = ANY(%s)",
        (to.value, *params, record_id, sources),
    )
    if cur.rowcount:
        return True
    await release(conn, [record_id], node)
    return False


async def note_attempt(conn: Conn, record_id: str, reason: str) -> None:
    await conn.execute(
        "UPDATE gateway.records SET attempts=attempts+1, last_error=%s WHERE id=%s",
        (reason, record_id),
    )


async def erase(
    conn: Conn, record_ids: Sequence[str], *, reason: str, at: float
) -> list[dict[str, Any]]:
    """Destroy the data key of each live record (state erased, claim cleared) and
    delete its ciphertext, in one statement; returns what each record was. Rows are
    locked in id order; a row another node erased meanwhile is no longer live (the
    lock's wait ends with the row read again), so each record is erased once."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "WITH target AS ("
            " SELECT id, channel, state, received_at, delivered_at, ciphertext_size,"
            " ciphertext_sha256 FROM gateway.records"
            " WHERE id = ANY(%(ids)s) AND wrapped_key IS NOT NULL ORDER BY id FOR UPDATE"
            "), erased AS ("
            " UPDATE gateway.records r SET wrapped_key=NULL, state='erased',"
            " erased_at=%(at)s, erase_reason=%(reason)s, claimed_by=NULL, lease_until=NULL"
            " FROM target WHERE r.id = target.id RETURNING target.*"
            "), chunks AS ("
            " DELETE FROM gateway.record_chunks c USING erased WHERE c.record_id = erased.id"
            ") SELECT * FROM erased",
            {"ids": list(record_ids), "at": at, "reason": reason},
        )
        return await cur.fetchall()


# ------------------------------------------------------------------------ claims


async def claim(
    conn: Conn, record_id: str, node: str, now: float, until: float
) -> tuple[bool, str | None]:
    """Lease a queued record to ``node`` unless another node's lease on it is live
    (or another node is claiming it right now: SKIP LOCKED); returns whether it was
    claimed and by whom it was claimed before (an expired lease's node)."""
    cur = await conn.execute(
        "WITH target AS ("
        " SELECT id, claimed_by FROM gateway.records"
        " WHERE id=%(id)s AND state='queued' AND wrapped_key IS NOT NULL"
        " AND (claimed_by IS NULL OR claimed_by=%(node)s OR lease_until < %(now)s)"
        " FOR UPDATE SKIP LOCKED"
        ") UPDATE gateway.records r SET claimed_by=%(node)s, lease_until=%(until)s"
        " FROM target WHERE r.id = target.id RETURNING target.claimed_by",
        {"id": record_id, "node": node, "now": now, "until": until},
    )
    row = await cur.fetchone()
    return (False, None) if row is None else (True, row[0])


async def release(conn: Conn, record_ids: Sequence[str], node: str) -> int:
    """Clear ``node``'s claims on these records; returns how many it held."""
    cur = await conn.execute(
        "UPDATE gateway.records SET claimed_by=NULL, lease_until=NULL "
        "WHERE id = ANY(%s) AND claimed_by=%s",
        (list(record_ids), node),
    )
    return cur.rowcount


async def release_all(conn: Conn, node: str) -> int:
    """Clear every claim of ``node`` (its restart forgets what it was delivering)."""
    cur = await conn.execute(
        "WITH mine AS (SELECT id FROM gateway.records WHERE claimed_by=%(node)s"
        " ORDER BY id FOR UPDATE)"
        " UPDATE gateway.records r SET claimed_by=NULL, lease_until=NULL"
        " FROM mine WHERE r.id = mine.id AND r.claimed_by=%(node)s",
        {"node": node},
    )
    return cur.rowcount


async def renew(
    conn: Conn, record_ids: Sequence[str], node: str, until: float
) -> tuple[set[str], set[str]]:
    """Extend ``node``'s leases on these queued records; returns those still its own,
    and those another node has claimed meanwhile (the others were released, moved or
    erased: no longer anybody's)."""
    cur = await conn.execute(
        "WITH mine AS (SELECT id FROM gateway.records WHERE id = ANY(%(ids)s)"
        " AND claimed_by=%(node)s AND state='queued' ORDER BY id FOR UPDATE),"
        " renewed AS (UPDATE gateway.records r SET lease_until=%(until)s"
        " FROM mine WHERE r.id = mine.id AND r.claimed_by=%(node)s RETURNING r.id)"
        " SELECT id, true FROM renewed UNION ALL"
        " SELECT id, false FROM gateway.records WHERE id = ANY(%(ids)s)"
        " AND claimed_by <> %(node)s AND id NOT IN (SELECT id FROM renewed)",
        {"ids": list(record_ids), "node": node, "until": until},
    )
    rows = await cur.fetchall()
    return {r[0] for r in rows if r[1]}, {r[0] for r in rows if not r[1]}


# ------------------------------------------------------------------------ reading


async def _one(conn: Conn, query: str, params: Sequence[Any]) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchone()


async def record(conn: Conn, record_id: str) -> dict[str, Any] | None:
    """A record's columns (:data:`RECORD_COLUMNS`) and its claim, or None."""
    return await _one(
        conn,
        f"SELECT {_RECORD}, {_LIVE_STATE} FROM gateway.records r WHERE id=%s",  # noqa: S608
        (record_id,),
    )


async def idempotent(conn: Conn, device_id: str, key: str) -> dict[str, Any] | None:
    return await _one(
        conn,
        f"SELECT {_RECORD}, {_LIVE_STATE} FROM gateway.records r "  # noqa: S608 - constants
        "WHERE device_id=%s AND idempotency_key=%s",
        (device_id, key),
    )


async def queued_ids(conn: Conn, destination: str, node: str, now: float) -> list[str]:
    """Queued records of ``destination`` no other node holds a live lease on, oldest first."""
    cur = await conn.execute(
        "SELECT id FROM gateway.records WHERE state='queued' AND destination=%s "
        "AND (claimed_by IS NULL OR claimed_by=%s OR lease_until < %s) "
        "ORDER BY received_at, id",
        (destination, node, now),
    )
    return [row[0] for row in await cur.fetchall()]


async def wrapped_key(conn: Conn, record_id: str) -> tuple[bytes, str | None, int] | None:
    """A live record's wrapped data key, key epoch and ciphertext size (None: erased
    or unknown)."""
    cur = await conn.execute(
        "SELECT wrapped_key, key_epoch, ciphertext_size FROM gateway.records "
        "WHERE id=%s AND wrapped_key IS NOT NULL",
        (record_id,),
    )
    row = await cur.fetchone()
    return None if row is None else (bytes(row[0]), row[1], int(row[2]))


CHUNKS = "SELECT data FROM gateway.record_chunks WHERE record_id=%s ORDER BY seq"


# ------------------------------------------------------------------ key epochs


async def queued_epochs(conn: Conn) -> list[str]:
    """The key epochs of the live queued records."""
    cur = await conn.execute(
        "SELECT DISTINCT key_epoch FROM gateway.records WHERE state='queued' "
        "AND wrapped_key IS NOT NULL AND key_epoch IS NOT NULL ORDER BY key_epoch"
    )
    return [row[0] for row in await cur.fetchall()]


async def hold_epoch(conn: Conn, epoch: str, at: float, reason: str) -> int:
    """Hold every queued record of a key epoch whose key is gone; returns how many."""
    cur = await conn.execute(
        "WITH target AS (SELECT id FROM gateway.records WHERE key_epoch=%(epoch)s"
        " AND state='queued' AND wrapped_key IS NOT NULL ORDER BY id FOR UPDATE)"
        " UPDATE gateway.records r SET state='held', held_at=%(at)s, last_error=%(reason)s,"
        " claimed_by=NULL, lease_until=NULL FROM target"
        " WHERE r.id = target.id AND r.state='queued'",
        {"epoch": epoch, "at": at, "reason": reason},
    )
    return cur.rowcount


# ------------------------------------------------------------------ access log


async def last_access_seq(conn: Conn, node: str) -> int:
    """The highest number of ``node``'s entries still pending (0: none)."""
    cur = await conn.execute(
        "SELECT COALESCE(max(seq), 0) FROM gateway.access_pending WHERE node=%s", (node,)
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def pending_access(conn: Conn, node: str, limit: int) -> list[tuple[int, str]]:
    cur = await conn.execute(
        "SELECT seq, body FROM gateway.access_pending WHERE node=%s ORDER BY seq LIMIT %s",
        (node, limit),
    )
    return [(int(seq), str(body)) for seq, body in await cur.fetchall()]


async def forget_access(conn: Conn, node: str, through: int) -> None:
    await conn.execute(
        "DELETE FROM gateway.access_pending WHERE node=%s AND seq <= %s", (node, through)
    )
