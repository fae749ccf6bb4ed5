"""What the retention sweeper asks the spool: due, overdue and expiring records, the
erasure facts of live ones, and the records of each key epoch (no personal data)."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.spool import queries
from gateway.spool.index import IndexThread
from gateway.spool.records import Due


class RetentionView:
    """The spool's read-only questions for erasure (a part of :class:`Spool`)."""

    _index: IndexThread

    async def due(self, now: float, limit: int = 1000) -> list[Due]:
        """Records to erase now: every delivered copy still present (no delivered copy is
        kept), then those whose retention ends at or before ``now``, earliest first."""
        return await self._index.run(lambda c: queries.due(c, now, limit))

    async def expiring_undelivered(self, now: float, within: float) -> dict[str, int]:
        """Per channel, the undelivered records whose deadline falls before now + within."""
        return await self._index.run(lambda c: queries.expiring_undelivered(c, now + within))

    async def overdue(self, now: float, delivered_grace: float) -> int:
        """Live copies past their deadline (a delivered one ``delivered_grace`` after its
        delivery): what a sweep should have erased."""
        return await self._index.run(lambda c: queries.overdue(c, now, now - delivered_grace))

    async def live_epochs(self) -> dict[str | None, int]:
        """How many live records each key epoch wraps."""
        return await self._index.run(queries.live_epochs)

    async def in_epoch(self, epoch: str) -> list[Due]:
        """The live records of one key epoch (erased with it when it is destroyed)."""
        return await self._index.run(lambda c: queries.in_epoch(c, epoch))

    async def describe(self, record_id: str) -> Due | None:
        """The erasure facts of one live record (an operator's erasure)."""
        found = await self.describe_many([record_id])
        return found[0] if found else None

    async def describe_many(self, record_ids: Sequence[str]) -> list[Due]:
        """The erasure facts of those of these records that are still live, in order."""
        wanted = list(dict.fromkeys(record_ids))
        return await self._index.run(lambda c: queries.describe(c, wanted))
