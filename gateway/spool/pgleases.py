"""A node's claims on queued records of the shared spool: leases in the records' rows.

A relay worker claims a record before delivering it: the row gets ``claimed_by`` (the
node's id) and ``lease_until`` (the node's clock plus ``lease_seconds``), taken with
``SELECT ... FOR UPDATE SKIP LOCKED`` so two nodes never both win. While the node
holds it, :meth:`Leases.renew` (every third of the lease) pushes ``lease_until`` on;
a node that dies stops renewing, and once its lease has run out another node claims
the record (counted in ``taken_over``) and delivers it again, under the same
``Idempotency-Key``. A node whose renewal finds a record claimed by another (its own
lease had lapsed) drops it and counts it in ``lost``.

Leases compare the clocks of different nodes: every node must be NTP-synchronised, as
it already must be for retention deadlines; a skew well under the lease is harmless.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.errors import SpoolError
from gateway.ops.logs import get_logger
from gateway.spool import pgqueries
from gateway.spool.pgqueries import Connect

log = get_logger("gateway.spool")


class Leases:
    """This node's claims, in memory and as leases in the database."""

    def __init__(
        self,
        connect: Connect,
        node: str,
        *,
        clock: Callable[[], float],
        lease_seconds: float,
    ) -> None:
        self._connect = connect
        self.node = node
        self._clock = clock
        self.lease_seconds = lease_seconds
        self._claims: set[str] = set()
        self.renewed = 0
        """Leases extended by :meth:`renew`, over all renewals."""
        self.lost = 0
        """Claims found taken by another node (this node's lease had lapsed)."""
        self.taken_over = 0
        """Claims of records whose lapsed lease belonged to another node."""

    def __len__(self) -> int:
        return len(self._claims)

    def holds(self, record_id: str) -> bool:
        return record_id in self._claims

    def forget(self, *record_ids: str) -> None:
        """Drop claims locally (their rows' claims were cleared by a state change)."""
        self._claims.difference_update(record_ids)

    async def claim(self, record_id: str) -> bool:
        """Lease a queued record to this node; False if it is not queued or another
        node (or another worker of this one) holds it."""
        if record_id in self._claims:
            return False
        now = self._clock()
        async with self._connect() as conn:
            claimed, before = await pgqueries.claim(
                conn, record_id, self.node, now, now + self.lease_seconds
            )
        if not claimed or record_id in self._claims:  # another local worker won meanwhile
            return False
        self._claims.add(record_id)
        if before is not None and before != self.node:
            self.taken_over += 1
        return True

    async def release(self, record_id: str) -> None:
        """Give up this node's claim; a failure to clear it in the database is only
        logged: the lease runs out on its own (the claim is dropped here at once)."""
        self._claims.discard(record_id)
        try:
            async with self._connect() as conn:
                await pgqueries.release(conn, [record_id], self.node)
        except SpoolError as exc:
            log.warning("claim_release_failed", submission_id=record_id, error=type(exc).__name__)

    async def release_all(self) -> int:
        """Clear every claim of this node, this run's and a previous run's."""
        self._claims.clear()
        async with self._connect() as conn:
            return await pgqueries.release_all(conn, self.node)

    async def renew(self) -> list[str]:
        """Extend the lease of every record this node holds; returns the ids found
        claimed by another node meanwhile (lost). Those no longer claimed by anybody
        (delivered, erased by a sweeper) are dropped too, without being counted."""
        held = sorted(self._claims)
        if not held:
            return []
        async with self._connect() as conn:
            kept, taken = await pgqueries.renew(
                conn, held, self.node, self._clock() + self.lease_seconds
            )
        # Released or moved here meanwhile: no longer held, neither lost nor dropped.
        gone = [rid for rid in held if rid not in kept and rid in self._claims]
        lost = sorted(rid for rid in gone if rid in taken)
        self._claims.difference_update(gone)
        self.renewed += len(kept)
        self.lost += len(lost)
        for record_id in lost:
            log.warning("lease_lost", submission_id=record_id)
        return lost

    async def keep_renewed(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        """:meth:`renew` every third of the lease, for ever (the spool owns the task)."""
        while True:
            await sleep(self.lease_seconds / 3)
            try:
                await self.renew()
            except SpoolError as exc:  # the database is away: try again next time
                log.warning("lease_renewal_failed", error=type(exc).__name__)
