"""The shared spool's read-only questions about all its records, every node's: the
retention sweeper's (due, overdue and expiring records, key epochs, erasure facts; the
semantics of :mod:`gateway.spool.queries`) and the counters' (per state, bytes, the
oldest undelivered), their SQL and :class:`PgRetentionView`, a part of
:class:`gateway.spool.pgstore.PgSpool`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from psycopg.rows import dict_row

from gateway.spool.pgqueries import Conn
from gateway.spool.records import DUE_COLUMNS, Due

_DUE = ", ".join(DUE_COLUMNS)


async def all_rows(conn: Conn, query: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


# ---------------------------------------------------------------------- counters


async def live_count(conn: Conn) -> int:
    cur = await conn.execute("SELECT count(*) FROM gateway.records WHERE wrapped_key IS NOT NULL")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def counts_and_bytes(conn: Conn) -> tuple[dict[str, int], int]:
    """Live records per state (every node's), and the bytes of their ciphertext."""
    cur = await conn.execute(
        "SELECT state, count(*), COALESCE(sum(ciphertext_size), 0) FROM gateway.records "
        "WHERE erased_at IS NULL GROUP BY state"
    )
    rows = await cur.fetchall()
    return {r[0]: int(r[1]) for r in rows}, sum(int(r[2]) for r in rows)


async def oldest_undelivered(conn: Conn, limit: int) -> list[tuple[str, float]]:
    """(id, received_at) of the ``limit`` oldest queued or held records."""
    cur = await conn.execute(
        "SELECT id, received_at FROM gateway.records WHERE state IN ('queued', 'held') "
        "AND erased_at IS NULL ORDER BY received_at, id LIMIT %s",
        (limit,),
    )
    return [(r[0], float(r[1])) for r in await cur.fetchall()]


# ------------------------------------------------------------- key epochs


async def live_epochs(conn: Conn) -> dict[str | None, int]:
    """How many live records each key epoch wraps."""
    cur = await conn.execute(
        "SELECT key_epoch, count(*) FROM gateway.records WHERE wrapped_key IS NOT NULL "
        "GROUP BY key_epoch"
    )
    return {row[0]: int(row[1]) for row in await cur.fetchall()}


def _dues(rows: list[dict[str, Any]]) -> list[Due]:
    return [Due.from_columns(row) for row in rows]


async def in_epoch(conn: Conn, epoch: str) -> list[Due]:
    """The erasure facts of the live records of one key epoch."""
    return _dues(
        await all_rows(
            conn,
            f"SELECT {_DUE} FROM gateway.records "  # noqa: S608 - constant columns
            "WHERE key_epoch=%s AND wrapped_key IS NOT NULL ORDER BY id",
            (epoch,),
        )
    )


# ---------------------------------------------------------------- retention


async def due(conn: Conn, now: float, limit: int) -> list[Due]:
    """Every delivered copy still present, then those whose retention ended by ``now``."""
    delivered = await all_rows(
        conn,
        f"SELECT {_DUE} FROM gateway.records WHERE state='delivered' "  # noqa: S608
        "AND erased_at IS NULL ORDER BY received_at LIMIT %s",
        (limit,),
    )
    expired = await all_rows(
        conn,
        f"SELECT {_DUE} FROM gateway.records WHERE erased_at IS NULL "  # noqa: S608
        "AND expires_at <= %s AND state <> 'delivered' ORDER BY expires_at LIMIT %s",
        (now, limit - len(delivered)),
    )
    return _dues(delivered + expired)


async def expiring_undelivered(conn: Conn, deadline: float) -> dict[str, int]:
    """Per channel, the undelivered records whose deadline falls at or before ``deadline``."""
    cur = await conn.execute(
        "SELECT channel, count(*) FROM gateway.records WHERE erased_at IS NULL "
        "AND state IN ('queued', 'held') AND expires_at <= %s GROUP BY channel",
        (deadline,),
    )
    return {row[0]: int(row[1]) for row in await cur.fetchall()}


async def overdue(conn: Conn, now: float, delivered_before: float) -> int:
    """Live copies past their deadline: retention ended, or delivered before
    ``delivered_before`` (a delivered copy's deadline is its delivery)."""
    cur = await conn.execute(
        "SELECT count(*) FROM gateway.records WHERE erased_at IS NULL "
        "AND wrapped_key IS NOT NULL "
        "AND (expires_at <= %s OR (state='delivered' AND delivered_at <= %s))",
        (now, delivered_before),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def describe(conn: Conn, record_ids: Sequence[str]) -> list[Due]:
    """The erasure facts of those of these records that are still live, in order."""
    rows = await all_rows(
        conn,
        f"SELECT {_DUE} FROM gateway.records "  # noqa: S608 - constant columns
        "WHERE id = ANY(%s) AND erased_at IS NULL",
        (list(record_ids),),
    )
    found = {row["id"]: row for row in rows}
    return [Due.from_columns(found[rid]) for rid in record_ids if rid in found]


# ------------------------------------------------------------------- the mixin


class PgRetentionView:
    """The spool's read-only questions for erasure (a part of :class:`PgSpool`)."""

    def _connection(self) -> AbstractAsyncContextManager[Conn]:
        raise NotImplementedError

    async def due(self, now: float, limit: int = 1000) -> list[Due]:
        """Records to erase now: every delivered copy still present (no delivered copy is
        kept), then those whose retention ends at or before ``now``, earliest first."""
        async with self._connection() as conn:
            return await due(conn, now, limit)

    async def expiring_undelivered(self, now: float, within: float) -> dict[str, int]:
        """Per channel, the undelivered records whose deadline falls before now + within."""
        async with self._connection() as conn:
            return await expiring_undelivered(conn, now + within)

    async def overdue(self, now: float, delivered_grace: float) -> int:
        """Live copies past their deadline (a delivered one ``delivered_grace`` after its
        delivery): what a sweep should have erased."""
        async with self._connection() as conn:
            return await overdue(conn, now, now - delivered_grace)

    async def live_epochs(self) -> dict[str | None, int]:
        """How many live records each key epoch wraps."""
        async with self._connection() as conn:
            return await live_epochs(conn)

    async def in_epoch(self, epoch: str) -> list[Due]:
        """The live records of one key epoch (erased with it when it is destroyed)."""
        async with self._connection() as conn:
            return await in_epoch(conn, epoch)

    async def describe(self, record_id: str) -> Due | None:
        """The erasure facts of one live record (an operator's erasure)."""
        found = await self.describe_many([record_id])
        return found[0] if found else None

    async def describe_many(self, record_ids: Sequence[str]) -> list[Due]:
        """The erasure facts of those of these records that are still live, in order."""
        wanted = list(dict.fromkeys(record_ids))
        async with self._connection() as conn:
            return await describe(conn, wanted)
