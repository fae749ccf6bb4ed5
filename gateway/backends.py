"""Which backend keeps the gateway's state, from ``[spool] backend``: the one place
that builds the spool, the epoch keystore, the erasure ledger and the audit log for
the local (SQLite and files) or the shared (PostgreSQL) backend.

Everything else sees interfaces (:class:`gateway.spool.backend.SpoolBackend`, the
hash chain's :class:`~gateway.ops.pgchain.ChainLog`), so the relay, the sweeper, the
ingress and the command line are the same code whichever backend is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg

from gateway.config import GatewayConfig
from gateway.crypto.pgkeystore import PgKeyStore
from gateway.errors import SpoolError, Unrecoverable
from gateway.ops.audit import AuditLog
from gateway.ops.pgchain import ChainLog
from gateway.pgutil import CONNECT_TIMEOUT, KEYS_SCHEMA, unavailable
from gateway.preflight import database_dsn
from gateway.retention.ledger import erasure_ledger
from gateway.retention.shared_ledger import SharedLedger
from gateway.spool.backend import SpoolBackend
from gateway.spool.pgstore import PgSpool
from gateway.spool.store import Spool


def node_name(config: GatewayConfig) -> str:
    """This node's name in claims: ``[spool] node_id``, else the host name."""
    if config.spool.node_id:
        return config.spool.node_id
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].lstrip("-._")
    return name or "gateway"


def build_spool(
    config: GatewayConfig, master: bytes, *, clock: Callable[[], float] = time.time
) -> SpoolBackend:
    """The configured spool, not yet opened."""
    spool = config.spool
    dsn = database_dsn(config)
    if dsn is None:
        return Spool(spool.directory, master, clock=clock, keystore=config.keystore_directory)
    return PgSpool(
        spool.directory,
        master,
        dsn=dsn,
        node_id=node_name(config),
        keys=PgKeyStore(dsn, master),
        clock=clock,
        lease_seconds=spool.lease_seconds,
        pool_size=spool.pool_size,
    )


def build_ledger(config: GatewayConfig, *, clock: Callable[[], float] = time.time) -> ChainLog:
    """The sweeper's erasure ledger: a file beside the spool, or (the shared backend) a
    chain table in PostgreSQL with the lock of every node's sweeper."""
    dsn = database_dsn(config)
    if dsn is None:
        return erasure_ledger(config.spool.directory, clock=clock)
    return SharedLedger(dsn, clock=clock)


def keystore_location(config: GatewayConfig) -> str:
    """Where the epoch keystore is, for messages and the certificate: its directory, or
    ``postgresql:gateway_keys`` (as :attr:`PgKeyStore.location`; never the DSN)."""
    if config.spool.backend == "postgresql":
        return f"postgresql:{KEYS_SCHEMA}"
    return str(config.keystore_directory)


def build_audit(
    config: GatewayConfig,
    *,
    via: str,
    actor: str | None = None,
    clock: Callable[[], float] | None = None,
) -> AuditLog:
    """The audit log: a file, or a chain table in PostgreSQL shared by every node."""
    return AuditLog(config.audit_log, via=via, actor=actor, clock=clock, dsn=database_dsn(config))


KEEP_TIMEOUT = 5.0
"""Seconds :meth:`NodeName.keep` gives the database to answer."""
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
END_OWN = """
SELECT pg_terminate_backend(l.pid) FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.pid = %(pid)s AND l.objsubid = 1
  AND l.classid::bigint = ((hashtextextended(%(key)s, 0) >> 32) & 4294967295)
  AND l.objid::bigint = (hashtextextended(%(key)s, 0) & 4294967295)
"""
"""End this node's previous session if (and only if) it still holds the name's lock."""


class NodeNameTaken(SpoolError, Unrecoverable):
    """Another running process holds this node's ``node_id``."""


class NodeName:
    """This node's name, held for as long as the node runs: a session advisory lock on
    it, so a second process started with the same ``node_id`` (a configuration copied
    from another node) is refused instead of releasing the first one's claims.

    A restart of the database ends the session and its lock: :meth:`keep` (the database
    watch calls it every check) takes the name again, or raises NodeNameTaken if a
    process with the same ``node_id`` took it meanwhile."""

    def __init__(self, dsn: str, node: str, *, timeout: float = KEEP_TIMEOUT) -> None:
        self._dsn = dsn
        self.node = node
        self._timeout = timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._pid: int | None = None  # the server process of the session holding the name

    async def hold(self) -> list[str]:
        """Take the name; returns warnings about the database's durability settings.
        Raises NodeNameTaken when another running node has the name, StorageUnavailable
        when the database cannot be asked."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
        except psycopg.Error as exc:
            raise unavailable(exc) from None
        try:
            if not await self._lock(conn):
                raise NodeNameTaken(
                    f"another gateway node runs with node_id {self.node!r}: give each node "
                    "its own [spool] node_id"
                )
            warnings = await durability_warnings(conn)
        except psycopg.Error as exc:
            await conn.close()
            raise unavailable(exc) from None
        except BaseException:
            await conn.close()
            raise
        self._conn, self._pid = conn, conn.info.backend_pid
        return warnings

    async def _lock(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Take the name's lock on ``conn``. A lock still held by this node's previous
        session (the server kept it after the client lost it) is ended first."""
        key = NODE_LOCK + self.node
        taken = await (await conn.execute(TRY_LOCK, (key,))).fetchone()
        if (taken and taken[0]) or self._pid is None:
            return bool(taken and taken[0])
        ended = await (await conn.execute(END_OWN, {"pid": self._pid, "key": key})).fetchone()
        if not (ended and ended[0]):
            return False  # held by another process
        for _ in range(20):  # the ended session lets go of its locks as it exits
            taken = await (await conn.execute(TRY_LOCK, (key,))).fetchone()
            if taken and taken[0]:
                return True
            await asyncio.sleep(0.05)
        return False

    async def keep(self) -> bool:
        """Hold the name still; True when it had to be taken again (the session was
        gone). A database that does not answer (within the timeout) is left for the
        next call; another process holding the name raises NodeNameTaken."""
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.execute("SELECT 1")
                return False
            except (psycopg.Error, TimeoutError):
                pass  # the session ended (the server restarted), or cannot be reached
        await self.release()
        try:
            async with asyncio.timeout(self._timeout):
                await self.hold()
        except NodeNameTaken:
            raise
        except (SpoolError, TimeoutError):  # unavailable: the watch reports the database
            return False
        return True

    async def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


NODE_LOCK = "gateway-node:"


async def durability_warnings(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """What the server's settings mean for "no acknowledged submission lost"."""
    settings = {}
    for name in ("synchronous_commit", "synchronous_standby_names", "fsync"):
        cursor = await conn.execute(f"SHOW {name}")
        row = await cursor.fetchone()
        settings[name] = str(row[0]) if row else ""
    warnings = []
    if settings["fsync"] == "off":
        warnings.append("fsync is off: a crash of the database server can lose any 202")
    if settings["synchronous_commit"] in ("off", "local"):
        warnings.append(
            f"synchronous_commit is {settings['synchronous_commit']}: a crash or failover of "
            "the database server can lose the last acknowledged submissions"
        )
    elif not settings["synchronous_standby_names"]:
        warnings.append(
            "no synchronous standby (synchronous_standby_names is empty): a failover to "
            "an asynchronous standby can lose the last acknowledged submissions"
        )
    return warnings
