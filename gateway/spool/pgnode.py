"""What one node of the shared spool holds besides its rows: its connection pool to the
database, the lock of its staging directory, its share of the epoch keystore, and the
counters its metrics read (:class:`NodeCounters`).

The pool (psycopg_pool) lends a connection within ``timeout`` seconds or fails, so an
outage of the database is a quick StorageUnavailable (503 to the device), not a hang.
Each connection is checked before it is lent; the first found broken (the server
restarted) has every idle one checked at once, and connections given up on during an
outage are retried on demand, so requests succeed again as soon as the server is back,
without the spool being reopened.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
from psycopg_pool import AsyncConnectionPool

from gateway.errors import SpoolError, StorageUnavailable
from gateway.pgutil import CONNECT_TIMEOUT, ensure_schema_async
from gateway.spool import pgqueries
from gateway.spool.pgcommit import GroupCommit
from gateway.spool.pgleases import Leases
from gateway.spool.pgqueries import Conn

CHECK_TIMEOUT = 2.0
"""Seconds :meth:`Database.check` gives the database to answer (``/readyz``)."""
MIN_CONNECTIONS = 2


class Database:
    """The node's connection pool to the shared spool's database."""

    def __init__(self, dsn: str, *, size: int, timeout: float, name: str = "gateway") -> None:
        self._dsn = dsn
        self._name = name
        self._size = max(size, MIN_CONNECTIONS)
        self._timeout = timeout
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._checking: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the DSN: it carries the password
        return f"Database(size={self._size})"

    async def open(self, ddl: str) -> None:
        """Connect (at least two connections, within the timeout) and create the tables."""
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self._dsn,
            min_size=MIN_CONNECTIONS,
            max_size=self._size,
            open=False,
            timeout=self._timeout,
            # Short, so a connection given up on during an outage is made again on
            # demand (not after the pool's long backoff) once the server is back.
            reconnect_timeout=self._timeout,
            check=self._check_connection,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT,
                # Which node holds a connection (pg_stat_activity, pg_locks): no secret.
                "application_name": f"gateway-spool {self._name}"[:63],
            },
        )
        try:
            await pool.open(wait=True, timeout=self._timeout)
            async with pool.connection() as conn:
                await ensure_schema_async(conn, ddl)
        except psycopg.Error as exc:
            await pool.close()
            raise pgqueries.spool_error(exc) from None
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if self._checking is not None:
            self._checking.cancel()
            await asyncio.gather(self._checking, return_exceptions=True)
        if pool is not None:
            await pool.close()

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    @property
    def pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise SpoolError("the spool is not open")
        return self._pool

    def connection(self, wait: float | None = None) -> contextlib.AbstractAsyncContextManager[Conn]:
        """A connection (within ``wait`` seconds, else the pool's timeout) whose driver
        errors leave the block translated."""
        return pgqueries.connection(self.pool, wait)

    def stats(self) -> dict[str, int]:
        """The pool's counters and gauges (psycopg_pool's names), {} when closed."""
        return {} if self._pool is None else dict(self._pool.get_stats())

    async def check(self) -> None:
        """Raise StorageUnavailable unless the database answers within 2 s."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT), self.connection(CHECK_TIMEOUT) as conn:
                await conn.execute("SELECT 1")
        except TimeoutError:
            raise StorageUnavailable("the spool database did not answer in time") from None

    async def _check_connection(self, conn: Conn) -> None:
        """The pool's check of each connection it lends (see the module's docstring)."""
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            pool = self._pool
            if pool is not None and (self._checking is None or self._checking.done()):
                self._checking = asyncio.create_task(pool.check(), name="spool-pool-check")
            raise


class NodeCounters:
    """What a node of the shared spool counts, for its metrics (a part of PgSpool)."""

    _db: Database
    _commits: GroupCommit | None
    _leases: Leases

    def pool_stats(self) -> dict[str, int]:
        """The connection pool's counters and gauges (psycopg_pool's names)."""
        return self._db.stats()

    @property
    def commit_batches(self) -> int:
        """Transactions the group commit ran (each for one or more operations)."""
        return 0 if self._commits is None else self._commits.batches

    @property
    def committed_records(self) -> int:
        """Records the group commit committed (over :attr:`commit_batches`)."""
        return 0 if self._commits is None else self._commits.records

    @property
    def largest_commit_batch(self) -> int:
        """The most operations one commit held so far."""
        return 0 if self._commits is None else self._commits.largest_batch

    @property
    def leases_renewed(self) -> int:
        return self._leases.renewed

    @property
    def leases_lost(self) -> int:
        return self._leases.lost

    @property
    def claims_taken_over(self) -> int:
        return self._leases.taken_over

    async def check(self) -> None:
        """Raise StorageUnavailable unless the database answers within 2 s (readiness)."""
        await self._db.check()


_KEY_USERS: dict[int, int] = {}
"""How many open spools of this process share each keystore object."""


async def open_keys(keys: object) -> None:
    """Open the keystore (on a thread), unless another spool of this process has."""
    users = _KEY_USERS.get(id(keys), 0)
    opener = getattr(keys, "open", None)
    if users == 0 and callable(opener):
        await asyncio.to_thread(opener)
    _KEY_USERS[id(keys)] = users + 1


def close_keys(keys: object) -> None:
    """Close the keystore once the last spool of this process using it closes."""
    users = _KEY_USERS.pop(id(keys), 1) - 1
    closer = getattr(keys, "close", None)
    if users:
        _KEY_USERS[id(keys)] = users
    elif callable(closer):
        closer()
