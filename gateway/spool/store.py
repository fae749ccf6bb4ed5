"""The durable encrypted spool: one encrypted file per submission plus a SQLite index.

A record exists when, and only when, its index row is committed. Its file is written
(encrypted with the record's own data key); the index thread then fsyncs it and only
then inserts the row, holding the data key wrapped by the key of the record's epoch
(:mod:`gateway.crypto.keystore`), committed with the file's directory fsynced: one
hand-off to the index thread makes a record durable, and a group of records shares the
directory's and the index's fsyncs.
A crash at any moment leaves either a committed record or an orphan file that
:meth:`Spool.open` removes: never a half-present record (cf. Postfix's queue).

Every change of a record's state goes through :meth:`Spool._move` (or, for erasure,
:meth:`Spool.erase`), checked against the state table of :mod:`gateway.spool.records`.
A restart forgets which records were being delivered, so they go back to the queue.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.crypto.envelope import new_data_key, unwrap_key, wrap_key
from gateway.crypto.envelope_reader import iter_plaintext
from gateway.crypto.keystore import KeyStore, epoch_of
from gateway.errors import KeyEpochGone, SpoolError
from gateway.fsutil import fsync_dir, lock_directory
from gateway.spool import queries
from gateway.spool.epochs import hold_unreadable, migrate_legacy_keys
from gateway.spool.index import IndexThread
from gateway.spool.moves import MoveSql, StateMoves
from gateway.spool.pending import PendingRecord, abandon_unclaimed
from gateway.spool.records import (
    DELIVERING,
    Erased,
    NewRecord,
    Record,
    RecoveryReport,
    State,
    sources_of,
)
from gateway.spool.retention_view import RetentionView


class Spool(StateMoves, RetentionView):
    """The local spool backend (SQLite index + one encrypted file per record)."""

    shared = False
    MOVES = MoveSql(queries.SET_DELIVERED, queries.SET_HELD, queries.SET_REQUEUED)

    def __init__(
        self,
        directory: Path,
        master_key: bytes,
        *,
        clock: Callable[[], float] = time.time,
        keystore: Path | None = None,
    ) -> None:
        self.directory = directory
        self._master = master_key
        keystore = keystore or directory.with_name(f"{directory.name}-keystore")
        self.keys = KeyStore(keystore, master_key)
        """The epoch keys (by default in ``<spool>-keystore`` beside the spool directory)."""
        self._clock = clock
        self._records_dir = directory / "records"
        self._index = IndexThread(directory / "index.sqlite3")
        self.counts: Counter[str] = Counter()
        self.bytes = 0
        self._delivering: set[str] = set()
        # Creating and unlinking files can wait for the filesystem journal: on threads,
        # never on the event loop (the record files' fsyncs are the index thread's).
        self._fsync_pool = ThreadPoolExecutor(16, thread_name_prefix="spool-fsync")
        # Undelivered records (queued or held) by id, in order of receipt: the first one
        # is the oldest, read in O(1) for gateway_spool_oldest_undelivered_age_seconds.
        self._undelivered: dict[str, float] = {}
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> RecoveryReport:
        """Open the index, remove orphans, forget in-flight claims; safe after a crash."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One process per spool: another one's recovery would delete our pending files.
        self._lock_fd = lock_directory(self.directory)
        try:
            await asyncio.to_thread(self.keys.open)
        except BaseException:
            self._unlock_spool()
            raise
        self._records_dir.mkdir(exist_ok=True, mode=0o700)
        fsync_dir(self._records_dir)
        fsync_dir(self.directory)
        await self._index.start()
        migrated = await migrate_legacy_keys(self._index, self.keys, self._master)
        unreadable = await hold_unreadable(self._index, self.keys, self._clock())
        keep = await self._index.run(queries.live_ids)
        orphans = await asyncio.to_thread(self._remove_orphans, keep)
        missing = [rid for rid in keep if not self._path(rid).exists()]
        # Only queued records are held (the table allows no other way to held): a
        # delivered one stays delivered, its history not rewritten into "undelivered".
        at = self._clock()

        def hold_missing(conn: Any) -> None:
            for record_id in missing:
                queries.move(
                    conn,
                    record_id,
                    State.HELD,
                    queries.SET_FOUND_MISSING,
                    (at, "data file missing"),
                )

        if missing:
            await self._index.run(hold_missing)
        await self._reload_stats()
        return RecoveryReport(
            len(keep), self.counts[State.QUEUED], orphans, len(missing), migrated, unreadable
        )

    def _remove_orphans(self, keep: set[str]) -> int:
        """Delete files no committed row owns: writes a crash cut short."""
        removed = 0
        for entry in self._records_dir.iterdir():
            if entry.name not in keep:
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(self._records_dir)
        return removed

    async def _reload_stats(self) -> None:
        counts, total = await self._index.run(queries.counts_and_bytes)
        self.counts = Counter(counts)
        self.bytes = total
        self._undelivered = dict(await self._index.run(queries.undelivered))

    @property
    def oldest_queued_at(self) -> float | None:
        """When the oldest undelivered record was received, or None."""
        return next(iter(self._undelivered.values()), None)

    async def close(self) -> None:
        await asyncio.to_thread(self._fsync_pool.shutdown, wait=True)
        await self._index.stop()
        self.keys.close()
        self._unlock_spool()

    def _unlock_spool(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ writing

    def _path(self, record_id: str) -> Path:
        # One flat directory: concurrent commits then share one directory fsync per
        # group commit (ext4 and XFS index large directories; no fan-out is needed).
        return self._records_dir / record_id

    def begin(self, record_id: str) -> PendingRecord:
        """Create the record's file and its writer (blocking: see :meth:`create`)."""
        return PendingRecord(record_id, self._path(record_id), new_data_key())

    async def create(self, record_id: str) -> PendingRecord:
        """:meth:`begin` on a spool thread: creating a file can wait for the filesystem
        journal while other records are being fsynced, and the event loop must not."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._fsync_pool, self.begin, record_id)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(abandon_unclaimed)  # the file is nobody's now
            raise

    async def commit(
        self, pending: PendingRecord, meta: NewRecord, *, access: str | None = None
    ) -> Record:
        """Make the record durable, then index it; returns only after both are on disk.
        ``access`` (its access log entry) is committed in the same transaction. The index
        thread fsyncs the file before the insert; a failed fsync fails this record alone."""
        try:
            pending.finish()
        except OSError:  # the disk refused the last segment: no record
            pending.abandon()
            raise
        writer = pending.writer
        epoch = epoch_of(meta.expires_at)
        epoch_key = self.keys.get(epoch)
        if epoch_key is None:  # a new epoch: its key is made durable before any row uses it
            epoch_key = await asyncio.to_thread(self.keys.key_for, epoch)
        wrapped = wrap_key(epoch_key, pending.data_key)
        ciphertext_sha256 = writer.ciphertext_sha256()

        def insert(conn: Any) -> None:
            queries.insert_record(
                conn,
                pending.id,
                meta,
                plaintext_size=writer.plaintext_size,
                ciphertext_size=writer.ciphertext_size,
                ciphertext_sha256=ciphertext_sha256,
                wrapped_key=wrapped,
                key_epoch=epoch,
            )
            if access is not None:
                queries.insert_access(conn, access)

        # Once the insert is queued it may commit: even if the caller is cancelled (a
        # drain that ran out of time), wait for the outcome so the file is deleted only
        # when the row did not commit, never under a committed row.
        # The descriptor stays open (the index thread fsyncs it) until the outcome is in.
        run = self._index.run(insert, sync_dirs=(pending.path.parent,), sync_files=(pending.fd,))
        task = asyncio.ensure_future(run)
        cancelled = False
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                cancelled = True
        error = task.exception()
        if error is not None:
            pending.abandon()
            raise error
        # A caller that was cancelled meanwhile still discards its pending record in a
        # finally block: that must not delete the file under the committed row.
        pending.committed = True
        pending.close()
        self.counts[State.QUEUED] += 1
        self.bytes += writer.ciphertext_size
        self._undelivered[pending.id] = meta.received_at
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
        record = await self._index.run(lambda c: queries.record(c, record_id))
        return None if record is None else self._with_live_state(record)

    def _with_live_state(self, record: Record) -> Record:
        if record.state == State.QUEUED and record.id in self._delivering:
            return Record(**{**record.__dict__, "state": DELIVERING})
        return record

    async def find_idempotent(self, device_id: str, key: str) -> Record | None:
        record = await self._index.run(lambda c: queries.idempotent(c, device_id, key))
        return None if record is None else self._with_live_state(record)

    async def queued_ids(self, destination: str) -> list[str]:
        """Queued records of ``destination``, oldest first."""
        return await self._index.run(lambda c: queries.queued_ids(c, destination))

    async def _data_key(self, record_id: str) -> bytes:
        found = await self._index.run(lambda c: queries.wrapped_key(c, record_id))
        if found is None:
            raise SpoolError("record has no data key (erased or unknown)")
        wrapped, epoch = found
        epoch_key = self.keys.get(epoch) if epoch else None
        if epoch_key is None:  # its epoch destroyed: unreadable for ever, so held
            gone = KeyEpochGone(epoch or "(none)")
            await self.mark_held(record_id, at=self._clock(), reason=str(gone))
            raise gone
        return unwrap_key(epoch_key, wrapped)

    async def open_plaintext(self, record: Record) -> Iterator[bytes]:
        """Decrypt the record segment by segment; each segment is authenticated."""
        dek = await self._data_key(record.id)
        path = self._path(record.id)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fileobj:
                yield from iter_plaintext(fileobj, dek, record.id.encode(), record.plaintext_size)

        return chunks()

    # ------------------------------------------------------------ state changes

    async def claim(self, record_id: str) -> bool:
        """Mark a queued record as being delivered (in memory only: one node)."""
        if record_id in self._delivering:
            return False
        self._delivering.add(record_id)
        return True

    async def release(self, record_id: str) -> None:
        self._delivering.discard(record_id)

    @property
    def delivering(self) -> int:
        return len(self._delivering)

    async def note_failed_attempt(self, record_id: str, reason: str) -> None:
        await self._index.run(lambda c: queries.note_attempt(c, record_id, reason))

    async def _move(
        self, record_id: str, to: State, assignments: str, params: tuple[Any, ...]
    ) -> bool:
        """The one way a live record changes state (erasure aside): only from the state
        the table allows, whatever the caller believes; the counters follow the index."""
        (source,) = sources_of(to)  # each of these states has one way in
        changed = await self._index.run(
            lambda c: queries.move(c, record_id, to, assignments, params)
        )
        self._delivering.discard(record_id)
        if changed:
            self.counts[source] -= 1
            self.counts[to] += 1
            if to == State.DELIVERED:
                self._undelivered.pop(record_id, None)
        return bool(changed)

    # ---------------------------------------------------------------- erasure

    async def erase(self, record_ids: Sequence[str], *, reason: str, at: float) -> list[Erased]:
        """Crypto-erase and unlink records; returns what was erased, for the ledger.

        The data key is destroyed in the index first (``secure_delete`` overwrites it in
        the database file, and a ``TRUNCATE`` checkpoint empties the write-ahead log that
        still held the page that carried it), then the ciphertext is unlinked and its
        directory fsynced. Records already erased or unknown are skipped.
        """
        wanted = list(dict.fromkeys(record_ids))
        rows = await self._index.run(
            lambda c: queries.erase_rows(c, wanted, reason=reason, at=at), checkpoint=True
        )
        if not rows:
            return []
        result = []
        for row in rows:
            # Counted as the index says, before the unlink: a reader who sees "erased"
            # in the index sees the counters agree.
            self.counts[row["state"]] -= 1
            self.bytes -= row["ciphertext_size"]
            self._undelivered.pop(row["id"], None)
            result.append(
                Erased(
                    row["id"],
                    row["channel"],
                    row["received_at"],
                    row["delivered_at"],
                    at,
                    reason,
                    row["state"],
                    row["ciphertext_sha256"],
                )
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._fsync_pool, self._unlink, [r["id"] for r in rows])
        return result

    def _unlink(self, record_ids: list[str]) -> None:
        for record_id in record_ids:
            self._path(record_id).unlink(missing_ok=True)
        fsync_dir(self._records_dir, kind="record")

    # -------------------------------------------------------------- access log

    def record_access(self, body: str) -> asyncio.Future[int]:
        """Queue an access log entry for the next group commit (not waited for)."""
        run = self._index.run(lambda c: queries.insert_access(c, body), kind="access-index")
        future = asyncio.ensure_future(run)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def pending_access(self, limit: int) -> list[tuple[int, str]]:
        return await self._index.run(lambda c: queries.pending_access(c, limit))

    async def forget_access(self, through: int) -> None:
        await self._index.run(lambda c: queries.forget_access(c, through), kind="access-index")

    async def number_access_after(self, seq: int) -> None:
        await self._index.run(lambda c: queries.number_access_after(c, seq))

    # --------------------------------------------------------------- capacity

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize
