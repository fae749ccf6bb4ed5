"""Watching the shared spool's database: whether it answers (``/readyz`` and
``gateway_db_up``), the spool's counters refreshed from it (every node's records, not
only this one's), and the snapshot the database metrics are read from.

A node whose database does not answer says so in ``/readyz`` (``"database": "down"``,
503) so a load balancer's health check takes it out; its device listeners still
answer, each submission with 503 and Retry-After, never a 202 it could not commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.errors import SpoolError
from gateway.ops.dbmetrics import DatabaseSnapshot
from gateway.ops.logs import get_logger

log = get_logger("gateway.database")

INTERVAL = 2.0
"""Seconds between two checks of the database (and refreshes of the spool counters)."""


class DatabaseWatch:
    """Checks the database every :data:`INTERVAL` seconds (a supervised task)."""

    def __init__(
        self,
        spool: Any,
        readiness: MutableMapping[str, str],
        *,
        listener_connected: Callable[[], bool] | None = None,
        keep_name: Callable[[], Awaitable[bool]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._spool = spool
        self.keep_name = keep_name  # the node's name lock, taken again after a restart
        self._readiness = readiness
        self._listener_connected = listener_connected
        self._sleep = sleep
        self.up = True
        readiness["database"] = "up"

    async def check_once(self) -> bool:
        """Ask the database once; update readiness, log a change; True when it answered."""
        try:
            await self._spool.check()
            await self._spool.refresh_stats()
        except (SpoolError, OSError) as exc:
            if self.up:
                log.error("database_unavailable", error=type(exc).__name__, reason=str(exc))
            self.up = False
        else:
            if not self.up:
                log.info("database_available")
            self.up = True
            # Raises NodeNameTaken when another process took this node's name: an
            # Unrecoverable error, so the daemon stops at once (no two nodes share one).
            if self.keep_name is not None and await self.keep_name():
                log.warning("node_name_taken_again", reason="the database session had ended")
        self._readiness["database"] = "up" if self.up else "down"
        return self.up

    async def run(self) -> None:
        while True:
            await self.check_once()
            await self._sleep(INTERVAL)

    def snapshot(self) -> DatabaseSnapshot:
        spool = self._spool
        connected = self._listener_connected
        return DatabaseSnapshot(
            up=self.up,
            pool=spool.pool_stats(),
            claims_held=spool.delivering,
            lease_renewals=spool.leases_renewed,
            leases_lost=spool.leases_lost,
            claims_taken_over=spool.claims_taken_over,
            commit_batches=spool.commit_batches,
            committed_records=spool.committed_records,
            registry_listener_connected=None if connected is None else connected(),
        )
