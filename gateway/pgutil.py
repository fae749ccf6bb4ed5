"""What every PostgreSQL-backed part shares: connecting, creating its tables once
whatever the number of nodes, and turning the driver's errors into the spool's.

The driver is psycopg 3 (with psycopg-pool): one library with both a synchronous API
(the command line, the keystore and the hash chains, which run on threads) and an
asyncio one (the spool and the registries' LISTEN/NOTIFY), binary parameters for
bytea, and a pool that replaces broken connections by itself after a server restart.
Nothing here logs a DSN: it carries the database password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from gateway.errors import SpoolError, StorageFailed, StorageUnavailable

SCHEMA = "gateway"
"""The schema of the spool, the registries and the hash chains."""
KEYS_SCHEMA = "gateway_keys"
"""The epoch keystore's own schema, so a backup policy can leave it out (pg_dump -N)."""

DDL_LOCK = 0x6761_7465_7761_7901
"""The advisory lock every node takes to create or upgrade tables: one at a time."""

CONNECT_TIMEOUT = 5


def unavailable(error: BaseException) -> BaseException:
    """The spool's error for a driver error: StorageUnavailable when the server cannot
    be reached or went away (the device gets 503 and tries again), StorageFailed for
    a refused write (a full disk on the server, say), SpoolError for any other error of
    the driver (a row refused by a constraint among them); a non-driver error as it is.

    The message names the error's class and SQLSTATE, never the driver's text, which
    may quote the statement's parameters ("Key (...)=(...)", "Failing row contains")."""
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        return StorageUnavailable(
            f"the spool database is unavailable ({type(error).__name__}"
            f"{_sqlstate(error)}); try again later"
        )
    if isinstance(error, psycopg.errors.DiskFull | psycopg.errors.InsufficientResources):
        return StorageFailed(f"the spool database refused the write ({_sqlstate(error)[2:]})")
    if isinstance(error, psycopg.errors.IntegrityError):
        return SpoolError(
            f"the spool database refused the row ({type(error).__name__}{_sqlstate(error)})"
        )
    if isinstance(error, psycopg.Error):
        return SpoolError(f"the spool database failed ({type(error).__name__}{_sqlstate(error)})")
    return error


def _sqlstate(error: BaseException) -> str:
    state = getattr(error, "sqlstate", None)
    return f", SQLSTATE {state}" if state else ""


def connect(dsn: str, *, autocommit: bool = False, **options: Any) -> psycopg.Connection[Any]:
    """A synchronous connection (command line, threads), or StorageUnavailable."""
    try:
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="gateway",
            **options,
        )
    except psycopg.Error as exc:
        raise unavailable(exc) from None


@contextmanager
def translated() -> Iterator[None]:
    """Run a block with the driver's errors turned into the spool's (:func:`unavailable`)."""
    try:
        yield
    except psycopg.Error as exc:
        raise unavailable(exc) from None


def ensure_schema(conn: psycopg.Connection[Any], ddl: str) -> None:
    """Run idempotent DDL (CREATE ... IF NOT EXISTS) under :data:`DDL_LOCK`, in its own
    transaction: nodes starting together create each table once."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {KEYS_SCHEMA}")
        conn.execute(ddl)


async def ensure_schema_async(conn: psycopg.AsyncConnection[Any], ddl: str) -> None:
    """:func:`ensure_schema` on an asyncio connection."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {KEYS_SCHEMA}")
        await conn.execute(ddl)
