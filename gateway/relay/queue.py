"""A destination's queue of records to deliver, each waiting at most once.

Locally every record reaches the queue once (at start-up or when accepted). With a
shared spool (PostgreSQL, several nodes) the relay also looks in the database now and
then for queued records no live lease covers: those a dead node had claimed, and those
another node accepted and has not taken. :func:`rescan` offers them to the queues;
an id already waiting is not added twice, and a record some node claims meanwhile is
skipped by the worker whose claim fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from gateway.spool.records import Record

Item = str | Record


def item_id(item: Item) -> str:
    return item.id if isinstance(item, Record) else item


class UniqueQueue(asyncio.Queue[Item]):
    """An asyncio queue that ignores an id already waiting in it."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: set[str] = set()

    def _put(self, item: Item) -> None:
        self._waiting.add(item_id(item))
        super()._put(item)

    def _get(self) -> Item:
        item: Item = super()._get()
        self._waiting.discard(item_id(item))
        return item

    def offer(self, item: Item) -> bool:
        """Add ``item`` unless its id is already waiting; True when added."""
        if item_id(item) in self._waiting:
            return False
        self.put_nowait(item)
        return True


class QueuedIds(Protocol):
    async def queued_ids(self, destination: str) -> list[str]: ...


async def rescan(spool: QueuedIds, queues: Mapping[str, UniqueQueue]) -> int:
    """Offer every queued record of the shared spool to its destination's queue;
    returns how many were not waiting already."""
    added = 0
    for name, queue in list(queues.items()):
        for record_id in await spool.queued_ids(name):
            added += queue.offer(record_id)
    return added


async def rescan_loop(
    spool: QueuedIds,
    queues: Callable[[], Mapping[str, UniqueQueue]],
    *,
    interval: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_found: Callable[[int], None] = lambda _: None,
) -> None:
    """:func:`rescan` every ``interval`` seconds, for ever (a supervised task)."""
    while True:
        await sleep(interval)
        found = await rescan(spool, queues())
        if found:
            on_found(found)
