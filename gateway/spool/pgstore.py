"""The shared spool on PostgreSQL: several gateway nodes, one database, each node with
its own :class:`PgSpool` (the interface is :class:`gateway.spool.backend.SpoolBackend`,
the semantics those of the local :class:`gateway.spool.store.Spool`).

A record exists when, and only when, its row is committed, and its row commits with its
ciphertext (``record_chunks``) in one transaction: the 202 goes out once PostgreSQL has
committed (:mod:`gateway.spool.pgcommit`). While the body streams in, it is encrypted to
a staging file in the node's own directory (``incoming/<id>``), which the photo check
reads and the commit copies into the database, then deletes; a staging file left by a
crash is removed at the next start. The data key is wrapped by the key of the record's
epoch, as in the local spool, so destroying an epoch's key makes every copy of its rows
(in backups, WAL archives, old row versions not yet vacuumed) unreadable.

The ciphertext is in ``bytea`` rows, not large objects: rows commit, replicate, dump
and are deleted with their record like any other (a large object outlives its row
unless unlinked, and needs its own privileges and ``pg_dump`` handling), and 256 KiB
rows keep both ends' memory bounded. They are stored uncompressed (``STORAGE
EXTERNAL``: ciphertext does not compress). Erasure nulls the wrapped key and deletes
the chunks in one transaction; the dead row versions stay in the table files until
VACUUM reuses them, readable by nobody once the epoch's key is destroyed.

Claims are leases in the rows (:mod:`gateway.spool.pgleases`). Counters (``counts``,
``bytes``, the oldest undelivered record) are the whole spool's, every node's, as of the
last :meth:`PgSpool.refresh_stats`, adjusted by this node's own changes in between.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.crypto.envelope import new_data_key, unwrap_key, wrap_key
from gateway.crypto.keystore import epoch_of
from gateway.errors import KeyEpochGone, SpoolError
from gateway.fsutil import lock_directory
from gateway.spool import pgqueries, pgread, pgview
from gateway.spool.backend import EpochKeys
from gateway.spool.moves import MoveSql, StateMoves
from gateway.spool.pending import PendingRecord, abandon_unclaimed
from gateway.spool.pgcommit import AccessPending, GroupCommit, Insert
from gateway.spool.pgleases import Leases
from gateway.spool.pgnode import Database, NodeCounters, close_keys, open_keys
from gateway.spool.pgqueries import Conn
from gateway.spool.pgstats import WINDOW, OldestUndelivered
from gateway.spool.pgview import PgRetentionView
from gateway.spool.records import (
    DELIVERING,
    Erased,
    NewRecord,
    Record,
    RecoveryReport,
    State,
    queued_row,
    sources_of,
)


class PgSpool(StateMoves, PgRetentionView, NodeCounters, AccessPending):
    """The PostgreSQL spool backend of one node (see the module's docstring)."""

    shared = True
    MOVES = MoveSql(pgqueries.SET_DELIVERED, pgqueries.SET_HELD, pgqueries.SET_REQUEUED)

    def __init__(
        self,
        directory: Path,
        master_key: bytes,
        *,
        dsn: str,
        node_id: str,
        keys: EpochKeys,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = 60.0,
        pool_size: int = 10,
        pool_timeout: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        del master_key  # what derives from it (idempotency, epoch keys) is the keystore's
        self.directory = directory
        self.node_id = node_id
        self.keys = keys
        self._clock = clock
        self._sleep = sleep
        self._incoming = directory / "incoming"
        self._db = Database(dsn, size=pool_size, timeout=pool_timeout, name=node_id)
        self._commits: GroupCommit | None = None
        self._leases = Leases(self._connection, node_id, clock=clock, lease_seconds=lease_seconds)
        self._renewal: asyncio.Task[None] | None = None
        self._keys_opened = False
        self._lock_fd: int | None = None
        self.counts: Counter[str] = Counter()
        self.bytes = 0
        self._oldest = OldestUndelivered()

    def __repr__(self) -> str:  # never the DSN: it carries the password
        return f"PgSpool(node_id={self.node_id!r}, directory={str(self.directory)!r})"

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> RecoveryReport:
        """Connect, create the tables, forget this node's claims of a previous run,
        remove staging files a crash left, hold queued records whose key is gone."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._incoming.mkdir(exist_ok=True, mode=0o700)
        self._lock_fd = lock_directory(self.directory)
        try:
            await open_keys(self.keys)
            self._keys_opened = True
            await self._db.open(pgqueries.DDL)
            report = await self._recover()
        except BaseException:
            await self._shut()
            raise
        self._renewal = asyncio.create_task(
            self._leases.keep_renewed(self._sleep), name="spool-lease-renewal"
        )
        return report

    async def _recover(self) -> RecoveryReport:
        released = await self._leases.release_all()
        orphans = await asyncio.to_thread(self._remove_staging)
        unreadable = await self._hold_unreadable()
        async with self._connection() as conn:
            last_seq = await pgqueries.last_access_seq(conn, self.node_id)
            records = await pgview.live_count(conn)
        self._commits = GroupCommit(self._db.pool, self.node_id)
        self._commits.start(last_seq + 1)
        await self.refresh_stats()
        return RecoveryReport(records, released, orphans, 0, 0, unreadable)

    def _remove_staging(self) -> int:
        """Delete what a previous run was receiving: never committed, nobody's now."""
        removed = 0
        for entry in self._incoming.iterdir():
            entry.unlink(missing_ok=True)
            removed += 1
        return removed

    async def _hold_unreadable(self) -> int:
        """Hold the queued records whose epoch key is destroyed or missing."""
        async with self._connection() as conn:
            epochs = await pgqueries.queued_epochs(conn)
        held = 0
        for epoch in epochs:
            if await self._epoch_key(epoch) is not None:
                continue
            why = "destroyed" if self.keys.is_destroyed(epoch) else "missing from the keystore"
            async with self._connection() as conn:
                held += await pgqueries.hold_epoch(
                    conn, epoch, self._clock(), f"unreadable: key epoch {epoch} {why}"
                )
        return held

    async def refresh_stats(self) -> None:
        """Load the whole spool's counters (every node's records) from the database."""
        async with self._connection() as conn:
            counts, total = await pgview.counts_and_bytes(conn)
            oldest = await pgview.oldest_undelivered(conn, WINDOW)
        self.counts = Counter(counts)
        self.bytes = total
        self._oldest.load(oldest, WINDOW)

    @property
    def oldest_queued_at(self) -> float | None:
        """When the oldest undelivered record was received, or None."""
        return self._oldest.oldest

    async def close(self) -> None:
        """Commit what is waiting, give up this node's claims, disconnect."""
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
        if self._commits is not None:
            await self._commits.stop()
        if self._db.is_open:
            with contextlib.suppress(SpoolError):
                await self._leases.release_all()
        await self._shut()

    async def _shut(self) -> None:
        commits, self._commits = self._commits, None
        if commits is not None:
            await commits.stop()
        await self._db.close()
        if self._keys_opened:
            self._keys_opened = False
            close_keys(self.keys)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _connection(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        return self._db.connection()

    def free_bytes(self) -> int:
        """Free space of the staging directory (the database's is PostgreSQL's to watch)."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    # ------------------------------------------------------------------ writing

    def begin(self, record_id: str) -> PendingRecord:
        """Create the record's staging file and its writer (blocking: see :meth:`create`)."""
        return PendingRecord(record_id, self._incoming / record_id, new_data_key())

    async def create(self, record_id: str) -> PendingRecord:
        """:meth:`begin` on a thread, so the event loop never waits for the filesystem."""
        if not self._db.is_open:
            raise SpoolError("the spool is not open")
        future = asyncio.get_running_loop().run_in_executor(None, self.begin, record_id)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(abandon_unclaimed)  # the file is nobody's now
            raise

    async def commit(
        self, pending: PendingRecord, meta: NewRecord, *, access: str | None = None
    ) -> Record:
        """Commit the record (and ``access``, its access log entry) to PostgreSQL with
        the next group; returns only once the transaction is committed."""
        try:  # nothing to fsync: the record is durable once PostgreSQL commits it
            pending.close()
        except OSError:  # the last segment could not be written: no record
            pending.abandon()
            raise
        commits = self._commits
        if commits is None or not self._db.is_open:
            raise SpoolError("the spool is not open")
        writer = pending.writer
        epoch = epoch_of(meta.expires_at)
        if self.keys.holds(epoch):  # held in memory: no I/O
            epoch_key = self.keys.key_for(epoch)
        else:  # a new epoch (made durable before any row uses it), or another node's
            epoch_key = await asyncio.to_thread(self.keys.key_for, epoch)
        ciphertext_sha256 = writer.ciphertext_sha256()
        row = queued_row(
            pending.id,
            meta,
            plaintext_size=writer.plaintext_size,
            ciphertext_size=writer.ciphertext_size,
            ciphertext_sha256=ciphertext_sha256,
            wrapped_key=wrap_key(epoch_key, pending.data_key),
            key_epoch=epoch,
        )
        # Once queued it may commit: even a cancelled caller (a drain out of time) waits
        # for the outcome, and the staging file goes only once the outcome is known.
        future = commits.submit(Insert(row, pending.path), access)
        cancelled = False
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:
                cancelled = True
        error = future.exception()
        pending.committed = error is None
        pending.path.unlink(missing_ok=True)  # copied into the database, or refused
        if error is not None:
            raise error
        self.counts[State.QUEUED] += 1
        self.bytes += writer.ciphertext_size
        self._oldest.add(pending.id, meta.received_at)
        if cancelled:
            raise asyncio.CancelledError
        return Record.queued(
            pending.id,
            meta,
            plaintext_size=writer.plaintext_size,
            ciphertext_size=writer.ciphertext_size,
            ciphertext_sha256=ciphertext_sha256,
        )

    def discard(self, pending: PendingRecord) -> None:
        pending.abandon()

    def idempotency_token(self, device_id: str, channel: str, key: str) -> str:
        """What the spool keeps of an Idempotency-Key (the keystore's HMAC of it)."""
        return self.keys.idempotency_token(device_id, channel, key)

    # ------------------------------------------------------------------ reading

    async def get(self, record_id: str) -> Record | None:
        async with self._connection() as conn:
            row = await pgqueries.record(conn, record_id)
        return None if row is None else self._with_live_state(row)

    async def find_idempotent(self, device_id: str, key: str) -> Record | None:
        async with self._connection() as conn:
            row = await pgqueries.idempotent(conn, device_id, key)
        return None if row is None else self._with_live_state(row)

    def _with_live_state(self, row: dict[str, Any]) -> Record:
        """A queued record under a live lease (this node's or another's) is delivering."""
        record = Record.from_columns(row)
        if record.state != State.QUEUED:
            return record
        leased = row["claimed_by"] is not None and (row["lease_until"] or 0) >= self._clock()
        if self._leases.holds(record.id) or (leased and row["claimed_by"] != self.node_id):
            return Record(**{**record.__dict__, "state": DELIVERING})
        return record

    async def queued_ids(self, destination: str) -> list[str]:
        """Queued records of ``destination`` not under another node's live lease,
        oldest first."""
        async with self._connection() as conn:
            return await pgqueries.queued_ids(conn, destination, self.node_id, self._clock())

    async def _epoch_key(self, epoch: str) -> builtins.bytes | None:
        """The epoch's key, or None when it is gone. One this node does not hold yet is
        looked up on a thread (the shared keystore asks the database), after reading
        the keystore again when it can (``refresh``)."""
        if self.keys.holds(epoch):
            return self.keys.get(epoch)
        key = await asyncio.to_thread(self.keys.get, epoch)
        if key is None and not self.keys.is_destroyed(epoch):
            await asyncio.to_thread(self.keys.refresh)
            key = await asyncio.to_thread(self.keys.get, epoch)
        return key

    async def _data_key(self, record_id: str) -> tuple[builtins.bytes, int]:
        async with self._connection() as conn:
            found = await pgqueries.wrapped_key(conn, record_id)
        if found is None:
            raise SpoolError("record has no data key (erased or unknown)")
        wrapped, epoch, size = found
        epoch_key = await self._epoch_key(epoch) if epoch else None
        if epoch_key is None:  # its epoch destroyed: unreadable for ever, so held
            gone = KeyEpochGone(epoch or "(none)")
            await self.mark_held(record_id, at=self._clock(), reason=str(gone))
            raise gone
        return unwrap_key(epoch_key, wrapped), size

    async def open_plaintext(self, record: Record) -> Iterator[builtins.bytes]:
        """Decrypt the record segment by segment; each segment is authenticated."""
        dek, size = await self._data_key(record.id)
        async with self._connection() as conn:
            fileobj, found = await pgread.fetch(conn, record.id, size, self._incoming)
        if found != size:  # erased meanwhile, or damaged (reading raises RecordCorrupt)
            async with self._connection() as conn:
                erased = await pgqueries.wrapped_key(conn, record.id) is None
            if erased:
                fileobj.close()
                raise SpoolError("record has no data key (erased or unknown)")
        return pgread.plaintext(fileobj, dek, record.id.encode(), record.plaintext_size)

    # ------------------------------------------------------------ state changes

    async def claim(self, record_id: str) -> bool:
        """Lease a queued record to this node (see :mod:`gateway.spool.pgleases`)."""
        return await self._leases.claim(record_id)

    async def release(self, record_id: str) -> None:
        await self._leases.release(record_id)

    @property
    def delivering(self) -> int:
        """Claims this node holds."""
        return len(self._leases)

    async def renew_leases(self) -> list[str]:
        """Extend this node's leases now; returns the ids found lost to another node."""
        return await self._leases.renew()

    async def note_failed_attempt(self, record_id: str, reason: str) -> None:
        """Count a failed attempt; the claim stays (the worker tries again under it)."""
        async with self._connection() as conn:
            await pgqueries.note_attempt(conn, record_id, reason)

    async def _move(
        self, record_id: str, to: State, assignments: str, params: tuple[Any, ...]
    ) -> bool:
        """The one way a live record changes state (erasure aside): only from the state
        the table allows, whatever the caller believes; its claim goes with the change."""
        (source,) = sources_of(to)  # each of these states has one way in
        async with self._connection() as conn:
            changed = await pgqueries.move(conn, record_id, to, assignments, params, self.node_id)
        self._leases.forget(record_id)
        if changed:
            self.counts[source] -= 1
            self.counts[to] += 1
            if to == State.DELIVERED:
                self._oldest.remove(record_id)
        return changed

    # ---------------------------------------------------------------- erasure

    async def erase(self, record_ids: Sequence[str], *, reason: str, at: float) -> list[Erased]:
        """Crypto-erase records: their data keys destroyed and their ciphertext deleted
        in one transaction; returns what was erased, for the ledger. Records already
        erased (by this node or another) or unknown are skipped."""
        wanted = list(dict.fromkeys(record_ids))
        async with self._connection() as conn:
            rows = await pgqueries.erase(conn, wanted, reason=reason, at=at)
        order = {rid: n for n, rid in enumerate(wanted)}
        result = []
        for row in sorted(rows, key=lambda r: order[r["id"]]):
            self.counts[row["state"]] -= 1
            self.bytes -= row["ciphertext_size"]
            self._oldest.remove(row["id"])
            self._leases.forget(row["id"])
            erased = (row["id"], row["channel"], row["received_at"], row["delivered_at"])
            facts = (at, reason, row["state"], row["ciphertext_sha256"])
            result.append(Erased(*erased, *facts))
        return result
