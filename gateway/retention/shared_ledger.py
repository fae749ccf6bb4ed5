"""The erasure ledger of the shared backend: the PostgreSQL chain ``ledger``
(:class:`~gateway.ops.pgchain.PgChainLog`) plus the lock every node's sweeper holds from
an erasure's ledger entry to the erasure itself (or to a key epoch's destruction), so
that of several nodes sweeping the same records one records and erases each, once
(:class:`gateway.retention.sweeper.Exclusive`).

The lock is a transaction-level advisory lock taken on a connection of its own and
ended by a rollback: it is released at the end of the block, by a node that dies (its
session ends) and by the server going away, and it works through a pooler in
transaction mode. It serialises the nodes' erasures, which the ledger's head row
already serialised (each erasure is one append).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg

from gateway import pgutil
from gateway.ops.pgchain import PgChainLog
from gateway.retention.ledger import LEDGER_CHAIN

ERASURE_LOCK = 0x6761_7465_7761_7903
"""The advisory lock (transaction level) a sweeper holds from a ledger entry to the
erasure or the key destruction it records: one node at a time."""
LOCK_WAIT = 60.0
"""Seconds a node waits for the lock (``lock_timeout``): a node that holds it longer (a
frozen process whose connection stays open) makes the others' erasures fail as
unavailable, retried by the next sweep, rather than wait for ever."""


def _finish(slot: list[psycopg.AsyncConnection[Any] | None]) -> None:
    conn, slot[0] = slot[0], None
    if conn is not None and not conn.closed:
        conn.pgconn.finish()  # no event loop needed: the socket is closed, the lock gone


class SharedLedger(PgChainLog):
    """The erasure ledger of the shared backend (chain ``ledger``) with
    :meth:`exclusive`, the lock of every node's sweeper
    (:class:`gateway.retention.sweeper.Exclusive`)."""

    def __init__(
        self, dsn: str, *, clock: Callable[[], float] = time.time, lock_wait: float = LOCK_WAIT
    ) -> None:
        super().__init__(dsn, LEDGER_CHAIN, clock=clock)
        self._lock_dsn = dsn
        self._take = (  # one round trip: constants only, so the simple query protocol
            f"SET LOCAL lock_timeout = {max(1, round(lock_wait * 1000))}; "
            f"SELECT pg_advisory_xact_lock({ERASURE_LOCK})"
        )
        self._turn = asyncio.Lock()
        self._holder: list[psycopg.AsyncConnection[Any] | None] = [None]
        self._finisher = weakref.finalize(self, _finish, self._holder)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the lock for the block, waiting while another node holds it. An outage
        is StorageUnavailable before the block (nothing done); a connection lost during
        the block takes the lock with it, and the next block connects again."""
        async with self._turn:
            conn = await self._acquire()
            try:
                yield
            finally:
                await self._release(conn)

    async def _acquire(self) -> psycopg.AsyncConnection[Any]:
        """The lock's connection, holding the lock: the one kept, else (none yet, or one
        the server dropped while it was idle) a new one."""
        conn = self._holder[0]
        try:
            if conn is not None and not conn.closed and not conn.broken:
                try:
                    await conn.execute(self._take)
                    return conn
                except psycopg.errors.LockNotAvailable:
                    raise
                except psycopg.OperationalError:  # gone while idle (a server restart)
                    await self._drop()
            conn = await psycopg.AsyncConnection.connect(
                self._lock_dsn, connect_timeout=pgutil.CONNECT_TIMEOUT, application_name="gateway"
            )
            self._holder[0] = conn
            await conn.execute(self._take)
            return conn
        except psycopg.Error as exc:
            await self._drop()
            raise pgutil.unavailable(exc) from None
        except BaseException:  # cancelled while waiting (psycopg cancels the wait)
            await self._drop()
            raise

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """End the lock's transaction (it held the lock and nothing else); if that fails,
        or is cancelled, the lock goes with the connection."""
        released = False
        try:
            await conn.rollback()
            released = True
        except psycopg.Error:
            pass
        finally:
            if not released:
                await self._drop()

    async def _drop(self) -> None:
        conn, self._holder[0] = self._holder[0], None
        if conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        """Close the lock's connection and the chain's (a later use opens them again)."""
        async with self._turn:
            await self._drop()
        await asyncio.to_thread(self.close)
