"""Following the registries in PostgreSQL from the daemon: every node hears a revocation
within moments of its commit, and keeps its last good snapshots while the database is away.

:class:`PgRegistryFollower` owns one connection of its own (autocommit) that runs
``LISTEN gateway_registry``; each notification makes it read the registries whose version
differs from the one it holds and hand each to ``on_change(name, body, version)``. A
notification sent while the connection was down is lost, so after every (re)connect it
reads both registries again and delivers whatever changed; a quiet connection is also
checked every ``poll_interval`` seconds, which finds a dead one. A lost connection is
retried after a backoff (injected sleep) that doubles up to ``max_backoff``.

:class:`RegistryFeed` is the ``on_change`` to give it: the newest document of each
registry. :class:`FollowedRegistries` is the daemon's view over the feed, of the same
shape as :class:`~gateway.identity.watcher.RegistryWatcher` (``devices``, ``users``,
``refresh()``): ``refresh()`` parses a registry again when the feed has another version,
and a document this node cannot use (a staff user named for a channel this node's
configuration lacks) leaves the last good snapshot in place and is reported.

Logs name registries, versions and error classes; never a document or the DSN.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gateway.identity.pgregistry import (
    CHANNEL,
    DDL,
    NOTIFY_SQL,
    REGISTRIES,
    SEED_SQL,
    Seed,
    digest,
    source,
    validate,
)
from gateway.identity.registry import (
    DeviceRegistry,
    RegistryError,
    UserRegistry,
    parse_devices,
    parse_users,
)
from gateway.ops.logs import get_logger
from gateway.pgutil import CONNECT_TIMEOUT, ensure_schema_async, unavailable

Sleep = Callable[[float], Awaitable[object]]
OnChange = Callable[[str, str, int], None]

log = get_logger("gateway.registry")

KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
"""A connection whose peer vanished without a word is found within about 30 s; values
the DSN sets itself win."""

CATCH_UP_SQL = """
SELECT r.name, r.version, r.body
FROM gateway.registries AS r
JOIN unnest(%s::text[], %s::bigint[]) AS held(name, version)
  ON r.name = held.name AND r.version <> held.version
ORDER BY r.name
"""


class PgRegistryFollower:
    """Hands every new version of the registries to ``on_change``; see the module
    docstring. ``seeds`` (this node's configured files) fill registries nobody has
    written yet, at :meth:`start` only."""

    def __init__(
        self,
        dsn: str,
        on_change: OnChange,
        *,
        seeds: Sequence[Seed] = (),
        sleep: Sleep = asyncio.sleep,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        poll_interval: float = 10.0,
        query_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._seeds = tuple(seeds)
        self._sleep = sleep
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._poll_interval = poll_interval
        self._query_timeout = query_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        """True while the LISTEN connection is up and has caught up (for /readyz)."""
        self.last_version: dict[str, int] = dict.fromkeys(REGISTRIES, 0)
        """The version of each registry last handed to ``on_change``."""
        self.reconnects = 0
        """Connections made again after one was lost (for a metric)."""
        self.last_error: str | None = None
        """The class of the error that last cost the connection."""

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, create the table, seed what is missing, LISTEN, and deliver both
        registries before returning; then follow in a task of its own until
        :meth:`close`. StorageUnavailable if the database cannot be reached, and
        RegistryError if a seed is unusable: nothing is left running either way."""
        if self._task is not None:
            raise RuntimeError("the registry follower is already started")
        try:
            conn = await self._connect()
        except psycopg.Error as exc:
            raise unavailable(exc) from None
        self._conn = conn
        try:
            await ensure_schema_async(conn, DDL)
            for seed in self._seeds:
                await self._seed(conn, seed)
            await self._listen(conn)
        except BaseException as exc:
            self._conn = None
            await conn.close()
            if isinstance(exc, psycopg.Error):
                raise unavailable(exc) from None
            raise
        self._task = asyncio.create_task(self._follow(), name="registry-follower")

    async def close(self) -> None:
        """Stop following and close the connection; safe to call more than once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        given = conninfo_to_dict(self._dsn)
        extra = {k: v for k, v in KEEPALIVES.items() if k not in given}
        return await psycopg.AsyncConnection.connect(
            make_conninfo(self._dsn, **extra),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="gateway-registry",
        )

    async def _drop(self) -> None:
        self.connected = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _seed(self, conn: psycopg.AsyncConnection[Any], seed: Seed) -> None:
        validate(seed.name, seed.body, seed.where)  # a broken file is never seeded
        async with conn.transaction():
            cursor = await conn.execute(
                SEED_SQL,
                {
                    "name": seed.name,
                    "body": seed.body,
                    "digest": digest(seed.body),
                    "actor": "seed",
                },
            )
            if await cursor.fetchone() is not None:
                await conn.execute(NOTIFY_SQL, (CHANNEL, f"{seed.name}:1"))
                log.info("registry_seeded", reason=seed.name, version=1)

    # ------------------------------------------------------------ following

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """LISTEN first, then read: a change committed in between is delivered by one
        or the other, never by neither."""
        await conn.execute(f"LISTEN {CHANNEL}")
        await self._catch_up(conn)
        self.connected = True

    async def _catch_up(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Deliver every registry whose version in the table is not the one we hold: a
        newer one, or an older one after the database was restored from a backup (the
        table is the registry, whatever its version)."""
        names = list(REGISTRIES)
        held = [self.last_version[name] for name in names]
        async with asyncio.timeout(self._query_timeout):
            cursor = await conn.execute(CATCH_UP_SQL, (names, held))
            rows = await cursor.fetchall()
        for name, version, body in rows:
            self._deliver(str(name), str(body), int(version))

    def _deliver(self, name: str, body: str, version: int) -> None:
        if version < self.last_version[name]:
            log.warning("registry_version_went_back", reason=name, version=version)
        try:
            self._on_change(name, body, version)
        except Exception as exc:
            # Not marked as delivered: the next notification or poll tries it again.
            log.error(
                "registry_change_failed", reason=name, version=version, error=type(exc).__name__
            )
            return
        self.last_version[name] = version
        log.info("registry_changed", reason=name, version=version)

    async def _follow(self) -> None:
        """Wait for notifications (or the poll interval) and catch up; on any failure,
        drop the connection, wait, connect again and catch up, for ever."""
        backoff = self._initial_backoff
        while True:
            try:
                conn = self._conn
                if conn is None:
                    conn = self._conn = await self._connect()
                    await self._listen(conn)
                    self.reconnects += 1
                    log.info("registry_follower_reconnected", count=self.reconnects)
                backoff = self._initial_backoff
                while True:
                    async for _notify in conn.notifies(timeout=self._poll_interval, stop_after=1):
                        pass  # which registry it names does not matter: both are compared
                    await self._catch_up(conn)
            except Exception as exc:  # a dead follower would let revoked devices in
                self.last_error = type(exc).__name__
                await self._drop()
                log.warning("registry_follower_lost", error=self.last_error, retry_in=backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)


class RegistryFeed:
    """The newest document of each registry: the ``on_change`` to give the follower."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[str, int]] = {}

    def __call__(self, name: str, body: str, version: int) -> None:
        self.latest[name] = (body, version)

    def version(self, name: str) -> int:
        return self.latest[name][1] if name in self.latest else 0


class FollowedRegistries:
    """The daemon's snapshots of registries kept in PostgreSQL, with the shape of
    :class:`~gateway.identity.watcher.RegistryWatcher`: ``devices``, ``users`` and
    ``refresh()``, which costs two comparisons unless the feed has another version.

    Built from what the feed holds now; RegistryError if that cannot be used, as a
    broken file stops the watcher (the daemon does not start, a reload is refused).
    Later a document this node cannot use keeps the last good snapshot and is reported
    through ``on_error`` once per version; each registry on its own, so a users
    document that cannot be used never holds back a device revocation.
    """

    def __init__(
        self,
        feed: RegistryFeed,
        *,
        on_error: Callable[[str], None] | None = None,
        validate_users: Callable[[UserRegistry], list[str]] | None = None,
    ) -> None:
        self._feed = feed
        self._on_error = on_error
        self._validate_users = validate_users
        self._seen: dict[str, int] = dict.fromkeys(REGISTRIES, -1)
        self.versions: dict[str, int] = dict.fromkeys(REGISTRIES, 0)
        """The version each snapshot was read from (0: the registry was never written)."""
        self.devices = DeviceRegistry()
        self.users = UserRegistry()
        problems = self._read(force=True)
        if problems:
            raise RegistryError("; ".join(problems))

    def refresh(self, *, force: bool = False) -> list[str]:
        """Parse a registry again if the feed has another version (or ``force``);
        returns why one could not be used (its last good snapshot is kept)."""
        problems = self._read(force=force)
        for problem in problems:
            if self._on_error:
                self._on_error(problem)
        return problems

    def _read(self, *, force: bool) -> list[str]:
        problems: list[str] = []
        for name in REGISTRIES:
            body, version = self._feed.latest.get(name, (None, 0))
            if version == self._seen[name] and not force:
                continue
            self._seen[name] = version
            try:
                if name == "devices":
                    self.devices = parse_devices(body, source(name))
                else:
                    users = parse_users(body, source(name))
                    invalid = self._validate_users(users) if self._validate_users else []
                    if invalid:
                        raise RegistryError("; ".join(invalid))
                    self.users = users
                self.versions[name] = version
            except RegistryError as exc:
                problems.append(str(exc))
        return problems
