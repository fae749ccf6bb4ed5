"""The relay's memory budget: sealed bodies in memory, bounded in bytes across workers.

A sealed payload (HPKE, CMS) is built whole in memory: the record's plaintext read
once, then its ciphertext, about twice the record's size until the attempt ends. With
several destinations each sending ``concurrency`` records at once, 7 MB records would
otherwise hold a hundred megabytes or more. :class:`MemoryBudget` lets an attempt
build its body only once its share fits under the limit (a record larger than the
whole budget waits until it has the budget to itself); a plain body is streamed from
the spool file and needs none. Waiters are woken in order; one that still does not fit
waits on while smaller ones behind it may go.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

RELAY_MEMORY = 32 * 1024**2
"""Bytes of sealed bodies the relay holds in memory at once, all destinations together."""


class MemoryBudget:
    """A byte-counting semaphore; :meth:`hold` is an async context manager."""

    def __init__(self, limit: int = RELAY_MEMORY) -> None:
        if limit <= 0:
            raise ValueError("the budget must be positive")
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        share = min(max(nbytes, 0), self.limit)
        if share == 0:
            yield
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + share <= self.limit)
            self.used += share
        try:
            yield
        finally:
            async with self._changed:
                self.used -= share
                self._changed.notify_all()
