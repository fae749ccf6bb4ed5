"""The retention sweeper: every server copy is erased on time, and every erasure recorded.

The gateway is a relay: once the destination has a record its copy has no purpose, so
every copy is erased as soon as it is delivered (資料40: 送信後に自動消去; 資料36:
送信完了後に自動消去; 資料30: 使用後に速やかに消去), under the reason ``delivered``.
A copy that is not delivered by ``received_at + retention`` (資料36: 受信後1週間で消去)
is erased then, under the reason ``expired_undelivered``. A sweep also erases any
delivered copy still present (a crash between delivery and its erasure), at once.

Key epochs (:mod:`gateway.crypto.keystore`): once an epoch's Japan day is over and its
records are erased, or at the latest one sweep later (its remaining records erased with
it, reason ``epoch_destroyed``), the sweep destroys its key, the ledger entry first.
Backup copies of its records are unreadable from then on.

Order matters for the record-keeping promise (特記事項 11–12): the ledger entry is
written and fsynced *before* the copy is destroyed. A crash in between leaves a ledger
entry for a copy that still exists; the next sweep erases it and records it again, so a
report takes the last entry per submission. The other order could destroy a copy with
no record of it.

Several nodes (the shared backend) each run a sweeper over the same records, keystore
and ledger. The ledger of that backend offers ``exclusive()`` (:class:`Exclusive`): a
lock of every node, held from the ledger entry to the erasure (or the key's
destruction). Under it the sweeper looks again at what is still live (still to be
destroyed), so of two nodes sweeping the same records one records and erases them and
the other finds nothing left: one ledger entry per erasure and per epoch, the ledger
still first. The keystore's view is refreshed before epochs are judged (a node sees the
epochs the others made and destroyed), and vacuumed after a destruction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from gateway.crypto.keystore import epoch_end
from gateway.errors import GatewayError
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.ops.pgchain import ChainLog
from gateway.retention.due import (
    EPOCH_METHOD,
    METHOD,
    SHARED_EPOCH_METHOD,
    SHARED_METHOD,
    epoch_ledger_body,
    ledger_body,
    reason_for,
)
from gateway.spool.backend import EpochKeys
from gateway.spool.backend import SpoolBackend as Spool
from gateway.spool.records import Due

BATCH = 1000
WARNING_WINDOW = 86400.0

log = get_logger("gateway.retention")


@runtime_checkable
class Exclusive(Protocol):
    """A ledger shared by several nodes, with the lock every node's sweeper holds from
    a ledger entry to the change it records (see the module's docstring)."""

    def exclusive(self) -> AbstractAsyncContextManager[None]: ...

    async def aclose(self) -> None: ...


class Sweeper:
    """Erases due records in batches; :meth:`run` sweeps every ``interval`` seconds."""

    def __init__(
        self,
        spool: Spool,
        ledger: ChainLog,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        interval: float = 60.0,
        channels: Sequence[str] = (),
    ) -> None:
        self._spool = spool
        self._ledger = ledger
        self._shared: Exclusive | None = ledger if isinstance(ledger, Exclusive) else None
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._interval = interval
        self._lock = asyncio.Lock()
        self._delivered: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.channels = tuple(channels)
        """Channels whose early-warning gauge is exported (0 when none expire)."""

    async def run(self) -> None:
        """Sweep every ``interval`` seconds, for ever (a supervised task: a sweep that
        raises ends this call, and the supervisor starts it again after a backoff)."""
        while True:
            await self.sweep()
            await self._sleep(self._interval)

    async def sweep(self, progress: Callable[[int], None] | None = None) -> int:
        """Erase everything due now; returns how many records were erased (``progress``
        is told the running total after each batch).

        Whether it succeeds or not, the copies still overdue afterwards are counted
        (``gateway_spool_overdue_records``); a finished sweep is stamped
        (``gateway_retention_last_sweep_timestamp_seconds``). Either staying put is
        what the retention alerts watch for.
        """
        total = 0
        try:
            while True:
                now = self._clock()
                due = await self._spool.due(now, BATCH)
                if not due:
                    break
                # On a thread: a shared keystore asks its database about an epoch it
                # has not seen (another node's), which would block the event loop.
                reasons = await asyncio.to_thread(self._reasons, due)
                total += await self._erase(due, reasons, now)
                if progress is not None:
                    progress(total)
            await self.destroy_epochs(self._clock())
            await self._export_warning(self._clock())
            self._metrics.last_sweep.set(self._clock())
        finally:
            with contextlib.suppress(Exception):  # the sweep's own error is what counts
                overdue = await self._spool.overdue(self._clock(), 2 * self._interval)
                self._metrics.spool_overdue.set(overdue)
        return total

    def _reasons(self, due: Sequence[Due]) -> list[str]:
        return [self._reason(d) for d in due]

    def _reason(self, due: Due) -> str:
        epoch = due.key_epoch
        return (
            "epoch_destroyed" if epoch and self._spool.keys.get(epoch) is None else reason_for(due)
        )

    async def destroy_epochs(self, now: float) -> list[str]:
        """Destroy the key of every epoch whose day is over and whose records are erased
        (or whose day ended a sweep ago: what is left is erased with it); returns the
        epochs this node destroyed (not those another node did)."""
        keys = self._spool.keys
        await self._refresh(keys)  # the epochs every node made, and those destroyed
        ended = [epoch for epoch in keys.live() if epoch_end(epoch) <= now]
        # Counting the live records per epoch scans the index: only when a day is over.
        in_use = await self._spool.live_epochs() if ended else {}
        destroyed = []
        for epoch in ended:
            end = epoch_end(epoch)
            remaining = in_use.get(epoch, 0)
            if remaining and now < end + self._interval:
                continue
            if remaining:
                left = await self._spool.in_epoch(epoch)
                await self._erase(left, ["epoch_destroyed"] * len(left), now)
            async with self._lock, self._exclusive():
                if self._shared is not None:
                    await self._refresh(keys)  # another node may have destroyed it by now
                    if keys.is_destroyed(epoch):
                        continue
                method = SHARED_EPOCH_METHOD if self._spool.shared else EPOCH_METHOD
                body = epoch_ledger_body(epoch, now, remaining, method=method)
                await asyncio.to_thread(self._ledger.append_many, [body])
                if not await asyncio.to_thread(keys.destroy, epoch):
                    log.warning("key_epoch_already_destroyed", key_epoch=epoch)
                    continue
            destroyed.append(epoch)
            log.info("key_epoch_destroyed", key_epoch=epoch, count=remaining)
        if destroyed:
            await self._vacuum(keys)
        passed = sum(epoch_end(e) <= now for e in keys.live())
        gauge = self._metrics.keystore_epochs
        gauge.labels(state="live").set(len(keys.live()) - passed)
        gauge.labels(state="passed").set(passed)
        gauge.labels(state="destroyed").set(len(keys.destroyed()))
        return destroyed

    def _exclusive(self) -> AbstractAsyncContextManager[object]:
        """The lock of every node sharing the ledger; none for a ledger of one node."""
        return contextlib.nullcontext() if self._shared is None else self._shared.exclusive()

    @staticmethod
    async def _refresh(keys: EpochKeys) -> None:
        """A shared keystore learns what the other nodes made and destroyed (on a thread:
        it asks the database); a keystore of one node has nothing to learn."""
        await asyncio.to_thread(keys.refresh)

    @staticmethod
    async def _vacuum(keys: EpochKeys) -> None:
        """A keystore in a database vacuums the dead row versions of destroyed keys out
        of its tables; if that fails, autovacuum does it later (the keys are destroyed)."""
        try:
            await asyncio.to_thread(keys.vacuum)
        except GatewayError as exc:
            log.warning("keystore_vacuum_failed", reason=str(exc))

    async def _export_warning(self, now: float) -> None:
        """The early warning: what will expire undelivered within 24 hours, per channel."""
        counts = await self._spool.expiring_undelivered(now, WARNING_WINDOW)
        for channel in {*self.channels, *counts}:
            self._metrics.expiring_undelivered.labels(channel=channel).set(counts.get(channel, 0))

    async def erase_delivered(self, record_id: str) -> None:
        """Erase a record that was just delivered (every channel erases on delivery);
        returns once it is erased.

        Erasures at delivery are committed in groups, as the index commits records: the
        first caller starts a flush, and those who arrive while it runs go together in
        the next one, so a busy relay pays one ledger fsync, one index transaction with
        its WAL checkpoint and one directory fsync per group rather than per record.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved here too, so a caller cancelled meanwhile leaves no unread error.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._delivered.append((record_id, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_delivered(), name="erase-delivered")
        await asyncio.shield(done)  # a cancelled caller does not cancel the others' group

    async def _flush_delivered(self) -> None:
        while self._delivered:
            group, self._delivered = self._delivered, []
            try:
                due = await self._spool.describe_many([record_id for record_id, _ in group])
                if due:
                    await self._erase(due, ["delivered"] * len(due), self._clock())
            except Exception as exc:
                for _record_id, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _record_id, done in group:
                if not done.done():
                    done.set_result(None)

    async def close(self) -> None:
        """Wait for erasures at delivery under way (at shutdown, after the relay stopped);
        then let a shared ledger close its connections."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._shared is not None:
            await self._shared.aclose()

    async def erase_by_operator(self, record_id: str) -> bool:
        """An operator's erasure of one live record (``gatewayctl spool erase``)."""
        due = await self._spool.describe(record_id)
        if due is None:
            return False
        return await self._erase([due], ["operator"], self._clock()) == 1

    async def _erase(self, due: Sequence[Due], reasons: Sequence[str], now: float) -> int:
        async with self._lock, self._exclusive():
            if self._shared is not None:  # what another node erased meanwhile is not again
                why = dict(zip((d.submission_id for d in due), reasons, strict=True))
                due = await self._spool.describe_many(list(why))
                reasons = [why[d.submission_id] for d in due]
            method = SHARED_METHOD if self._spool.shared else METHOD
            bodies = [
                ledger_body(d, r, now, method=method) for d, r in zip(due, reasons, strict=True)
            ]
            await asyncio.to_thread(self._ledger.append_many, bodies)
            by_id = dict(zip((d.submission_id for d in due), reasons, strict=True))
            erased = []
            for reason in dict.fromkeys(reasons):
                ids = [i for i, r in by_id.items() if r == reason]
                erased += await self._spool.erase(ids, reason=reason, at=now)
        for record in erased:
            self._metrics.erasures.labels(channel=record.channel, reason=record.reason).inc()
        if erased:
            log.info("erased", count=len(erased), reason=",".join(sorted(set(reasons))))
        return len(erased)
