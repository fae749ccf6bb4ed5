"""The durable encrypted spool: one encrypted file per submission plus a SQLite index.

A record exists when, and only when, its index row is committed. Its file is written
(encrypted with the record's own data key), fsynced, and only then is the row, holding
the data key wrapped by the master key, committed with the file's directory fsynced.
A crash at any moment leaves either a committed record or an orphan file that
:meth:`Spool.open` removes: never a half-present record (cf. Postfix's queue).

States: ``queued`` → (``delivering``, held only in memory) → ``delivered`` | ``held``;
``erased`` once the data key is destroyed. A restart forgets ``delivering``, so records
that were in flight go back to the queue.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gateway.crypto.envelope import (
    EncryptingWriter,
    iter_plaintext,
    new_data_key,
    unwrap_key,
    wrap_key,
)
from gateway.errors import SpoolError
from gateway.fsutil import fsync_dir
from gateway.ingress.photos import PhotoLocation, open_window
from gateway.spool.index import IndexThread

_COLUMNS = (
    "id, channel, destination, device_id, user_id, state, received_at, expires_at, "
    "delivered_at, held_at, erased_at, content_type, plaintext_size, ciphertext_size, "
    "ciphertext_sha256, body_sha256, content_sha256, field_names, idempotency_key, "
    "upstream_receipt, attempts, last_error"
)


def new_submission_id(clock: Callable[[], float] = time.time) -> str:
    """32 hex digits: milliseconds since the epoch, then 80 random bits (sortable, unguessable)."""
    return f"{int(clock() * 1000):012x}{secrets.token_hex(10)}"


def is_submission_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class Record:
    """A spooled submission's metadata: no field values, no key."""

    id: str
    channel: str
    destination: str
    device_id: str
    user_id: str
    state: str
    received_at: float
    expires_at: float
    delivered_at: float | None
    held_at: float | None
    erased_at: float | None
    content_type: str
    plaintext_size: int
    ciphertext_size: int
    ciphertext_sha256: str
    body_sha256: str
    content_sha256: str
    field_names: tuple[str, ...]
    idempotency_key: str | None  # the keyed hash of Spool.idempotency_token, never the key
    upstream_receipt: str | None
    attempts: int
    last_error: str | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Record:
        values = list(row)
        values[17] = tuple(json.loads(values[17]))
        return cls(*values)


@dataclass(frozen=True)
class NewRecord:
    """What ingress knows about a submission when it commits it."""

    channel: str
    destination: str
    device_id: str
    user_id: str
    received_at: float
    expires_at: float
    content_type: str
    body_sha256: str
    content_sha256: str
    field_names: tuple[str, ...]
    idempotency_key: str | None


class DuplicateIdempotencyKey(SpoolError):
    """Another record of this device already holds the Idempotency-Key."""


class PendingRecord:
    """A record being written: its encrypted file is open, it is not in the index yet."""

    def __init__(self, record_id: str, path: Path, dek: bytes) -> None:
        self.id = record_id
        self.path = path
        self._dek = dek
        self._file: BinaryIO = open(path, "xb", buffering=0)  # noqa: SIM115 - owned here
        self.writer = EncryptingWriter(self._file, dek, record_id.encode())
        self.finished = False
        self.committed = False
        """True once the index row is committed: from then on the file is the record's."""
        self.sync: asyncio.Future[None] | None = None
        """The fsync of the finished file, once started (see :meth:`Spool.start_sync`)."""

    @property
    def aad(self) -> bytes:
        return self.id.encode()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)

    def finish(self) -> None:
        """Seal the last segment; the file is complete but not yet durable."""
        if not self.finished:
            self.writer.close()
            self.finished = True

    def window(self, start: int, length: int) -> AbstractContextManager[BinaryIO]:
        """A seekable plaintext view of ``[start, start+length)`` of the finished file."""
        return open_window(self.location(start, length))

    def location(self, start: int, length: int) -> PhotoLocation:
        """Where a byte range of the finished file is, for a check in another process."""
        return PhotoLocation(
            self.path, self._dek, self.aad, self.writer.plaintext_size, start, length
        )

    def sync_and_close(self) -> None:
        try:
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abandon(self) -> None:
        """Close and delete the file, unless its row committed (then the file is kept)."""
        if self.sync is None and not self._file.closed:
            self._file.close()  # else the fsync under way closes it
        if not self.committed:
            self.path.unlink(missing_ok=True)


def _abandon_unclaimed(future: asyncio.Future[PendingRecord]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().abandon()


@dataclass(frozen=True)
class Due:
    """A live record's facts for the erasure ledger: no personal data."""

    submission_id: str
    channel: str
    state: str
    received_at: float
    delivered_at: float | None
    ciphertext_sha256: str


@dataclass(frozen=True)
class Erased:
    """What the erasure ledger records of one erased record: no personal data."""

    submission_id: str
    channel: str
    received_at: float
    delivered_at: float | None
    erased_at: float
    reason: str
    state_before: str
    ciphertext_sha256: str


@dataclass(frozen=True)
class RecoveryReport:
    records: int
    requeued: int
    orphans_removed: int
    missing_files: int


class Spool:
    """The local spool backend (SQLite index + one encrypted file per record)."""

    def __init__(
        self, directory: Path, master_key: bytes, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self._master = master_key
        self._idempotency_key = hmac.new(master_key, b"gateway idempotency v1", "sha256").digest()
        self._clock = clock
        self._records_dir = directory / "records"
        self._index = IndexThread(directory / "index.sqlite3")
        self.counts: Counter[str] = Counter()
        self.bytes = 0
        self._delivering: set[str] = set()
        # fsync blocks in the kernel, not on the GIL: enough threads that concurrent
        # requests' fsyncs overlap and share the filesystem journal's commits.
        self._fsync_pool = ThreadPoolExecutor(16, thread_name_prefix="spool-fsync")
        # Undelivered records (queued or held) by id, in order of receipt: the first one
        # is the oldest, read in O(1) for gateway_spool_oldest_undelivered_age_seconds.
        self._undelivered: dict[str, float] = {}
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> RecoveryReport:
        """Open the index, remove orphans, forget in-flight claims; safe after a crash."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_spool()
        self._records_dir.mkdir(exist_ok=True, mode=0o700)
        fsync_dir(self._records_dir)
        fsync_dir(self.directory)
        await self._index.start()

        def live(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute("SELECT id FROM records WHERE wrapped_key IS NOT NULL")
            return {r[0] for r in rows}

        keep = await self._index.run(live)
        orphans = await asyncio.to_thread(self._remove_orphans, keep)
        missing = [rid for rid in keep if not self._path(rid).exists()]
        if missing:
            await self._index.run(
                # Only queued records are held: a delivered one stays delivered (its
                # history must not be rewritten into "undelivered").
                lambda c: c.executemany(
                    "UPDATE records SET state='held', held_at=?, last_error='data file missing' "
                    "WHERE id=? AND state='queued'",
                    [(self._clock(), rid) for rid in missing],
                )
            )
        await self._reload_stats()
        return RecoveryReport(len(keep), self.counts["queued"], orphans, len(missing))

    def _lock_spool(self) -> None:
        """One process per spool: another one's recovery would delete our pending files."""
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"{self.directory} is in use by another gateway process") from None
        self._lock_fd = fd

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
        def stats(conn: sqlite3.Connection) -> tuple[list[tuple[str, int]], int]:
            counts = conn.execute(
                "SELECT state, COUNT(*) FROM records WHERE erased_at IS NULL GROUP BY state"
            ).fetchall()
            total = conn.execute(
                "SELECT COALESCE(SUM(ciphertext_size), 0) FROM records WHERE erased_at IS NULL"
            ).fetchone()[0]
            return counts, int(total)

        def undelivered(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            return conn.execute(
                "SELECT id, received_at FROM records WHERE state IN ('queued', 'held') "
                "AND erased_at IS NULL ORDER BY received_at, id"
            ).fetchall()

        counts, total = await self._index.run(stats)
        self.counts = Counter(dict(counts))
        self.bytes = total
        self._undelivered = dict(await self._index.run(undelivered))

    @property
    def oldest_queued_at(self) -> float | None:
        """When the oldest undelivered record was received, or None."""
        return next(iter(self._undelivered.values()), None)

    def start_sync(self, pending: PendingRecord) -> asyncio.Future[None]:
        """Start making the finished file durable, so other checks can run meanwhile."""
        pending.finish()
        if pending.sync is None:
            loop = asyncio.get_running_loop()
            pending.sync = loop.run_in_executor(self._fsync_pool, pending.sync_and_close)
            # An abandoned record's fsync may fail once its file is gone: nobody awaits it.
            pending.sync.add_done_callback(lambda f: f.cancelled() or f.exception())
        return pending.sync

    async def close(self) -> None:
        await asyncio.to_thread(self._fsync_pool.shutdown, wait=True)
        await self._index.stop()
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
            future.add_done_callback(_abandon_unclaimed)  # the file is nobody's now
            raise

    async def commit(self, pending: PendingRecord, meta: NewRecord) -> Record:
        """Make the record durable, then index it; returns only after both are on disk."""
        pending.finish()
        await asyncio.shield(self.start_sync(pending))
        writer = pending.writer
        wrapped = wrap_key(self._master, pending._dek)
        ciphertext_sha256 = writer.ciphertext_sha256()
        row = (
            pending.id,
            meta.channel,
            meta.destination,
            meta.device_id,
            meta.user_id,
            "queued",
            meta.received_at,
            meta.expires_at,
            meta.content_type,
            writer.plaintext_size,
            writer.ciphertext_size,
            ciphertext_sha256,
            meta.body_sha256,
            meta.content_sha256,
            json.dumps(list(meta.field_names)),
            wrapped,
            meta.idempotency_key,
        )

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO records (id, channel, destination, device_id, user_id, state, "
                    "received_at, expires_at, content_type, plaintext_size, ciphertext_size, "
                    "ciphertext_sha256, body_sha256, content_sha256, field_names, wrapped_key, "
                    "idempotency_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
            except sqlite3.IntegrityError:
                raise DuplicateIdempotencyKey("idempotency key already used") from None

        # Once the insert is queued it may commit: even if the caller is cancelled (a
        # drain that ran out of time), wait for the outcome so the file is deleted only
        # when the row did not commit, never under a committed row.
        task = asyncio.ensure_future(self._index.run(insert, sync_dirs=(pending.path.parent,)))
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
        self.counts["queued"] += 1
        self.bytes += writer.ciphertext_size
        self._undelivered[pending.id] = meta.received_at
        if cancelled:
            raise asyncio.CancelledError
        return Record(
            id=pending.id,
            channel=meta.channel,
            destination=meta.destination,
            device_id=meta.device_id,
            user_id=meta.user_id,
            state="queued",
            received_at=meta.received_at,
            expires_at=meta.expires_at,
            delivered_at=None,
            held_at=None,
            erased_at=None,
            content_type=meta.content_type,
            plaintext_size=writer.plaintext_size,
            ciphertext_size=writer.ciphertext_size,
            ciphertext_sha256=ciphertext_sha256,
            body_sha256=meta.body_sha256,
            content_sha256=meta.content_sha256,
            field_names=meta.field_names,
            idempotency_key=meta.idempotency_key,
            upstream_receipt=None,
            attempts=0,
            last_error=None,
        )

    def discard(self, pending: PendingRecord) -> None:
        pending.abandon()

    def idempotency_token(self, device_id: str, channel: str, key: str) -> str:
        """What the index keeps of an Idempotency-Key: an HMAC under a key derived from
        the master key, bound to the device and the channel."""
        material = f"{device_id}\0{channel}\0{key}".encode()
        return hmac.new(self._idempotency_key, material, hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ reading

    async def get(self, record_id: str) -> Record | None:
        def fetch(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {_COLUMNS} FROM records WHERE id=?",  # noqa: S608 - constant columns
                (record_id,),
            ).fetchone()
            return row

        row = await self._index.run(fetch)
        return self._with_live_state(Record.from_row(row)) if row else None

    def _with_live_state(self, record: Record) -> Record:
        if record.state == "queued" and record.id in self._delivering:
            return Record(**{**record.__dict__, "state": "delivering"})
        return record

    async def find_idempotent(self, device_id: str, key: str) -> Record | None:
        def fetch(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {_COLUMNS} FROM records WHERE device_id=? AND idempotency_key=?",  # noqa: S608 - constant columns
                (device_id, key),
            ).fetchone()
            return row

        row = await self._index.run(fetch)
        return self._with_live_state(Record.from_row(row)) if row else None

    async def queued_ids(self, destination: str) -> list[str]:
        """Queued records of ``destination``, oldest first."""

        def fetch(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM records WHERE state='queued' AND destination=? "
                "ORDER BY received_at, id",
                (destination,),
            )
            return [r[0] for r in rows]

        return await self._index.run(fetch)

    async def _data_key(self, record_id: str) -> bytes:
        def fetch(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT wrapped_key FROM records WHERE id=?", (record_id,)
            ).fetchone()
            return bytes(row[0]) if row and row[0] is not None else None

        wrapped = await self._index.run(fetch)
        if wrapped is None:
            raise SpoolError("record has no data key (erased or unknown)")
        return unwrap_key(self._master, wrapped)

    async def open_plaintext(self, record: Record) -> Iterator[bytes]:
        """Decrypt the record segment by segment; each segment is authenticated."""
        dek = await self._data_key(record.id)
        path = self._path(record.id)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fileobj:
                yield from iter_plaintext(fileobj, dek, record.id.encode(), record.plaintext_size)

        return chunks()

    # ------------------------------------------------------------ state changes

    def claim(self, record_id: str) -> bool:
        """Mark a queued record as being delivered (in memory only)."""
        if record_id in self._delivering:
            return False
        self._delivering.add(record_id)
        return True

    def release(self, record_id: str) -> None:
        self._delivering.discard(record_id)

    @property
    def delivering(self) -> int:
        return len(self._delivering)

    async def mark_delivered(self, record_id: str, *, at: float, receipt: str | None) -> None:
        await self._transition(
            record_id,
            "delivered",
            "UPDATE records SET state='delivered', delivered_at=?, upstream_receipt=?, "
            "attempts=attempts+1, last_error=NULL WHERE id=? AND state='queued'",
            (at, receipt, record_id),
        )

    async def mark_held(self, record_id: str, *, at: float, reason: str) -> None:
        await self._transition(
            record_id,
            "held",
            "UPDATE records SET state='held', held_at=?, last_error=?, attempts=attempts+1 "
            "WHERE id=? AND state='queued'",
            (at, reason, record_id),
        )

    async def requeue(self, record_id: str) -> Record:
        """Put a held record back in the queue (an operator's decision); returns it.

        Raises SpoolError when there is no such live record or it is not held.
        """
        changed = await self._index.run(
            lambda c: (
                c.execute(
                    "UPDATE records SET state='queued', held_at=NULL WHERE id=? AND state='held' "
                    "AND wrapped_key IS NOT NULL",
                    (record_id,),
                ).rowcount
            )
        )
        record = await self.get(record_id)
        if not changed or record is None:
            state = "unknown" if record is None else record.state
            raise SpoolError(f"{record_id} is {state}; only a held record can be requeued")
        self.counts["held"] -= 1
        self.counts["queued"] += 1
        return record

    async def note_failed_attempt(self, record_id: str, reason: str) -> None:
        await self._index.run(
            lambda c: c.execute(
                "UPDATE records SET attempts=attempts+1, last_error=? WHERE id=?",
                (reason, record_id),
            )
        )

    async def _transition(
        self, record_id: str, new_state: str, sql: str, params: tuple[Any, ...]
    ) -> None:
        changed = await self._index.run(lambda c: c.execute(sql, params).rowcount)
        self._delivering.discard(record_id)
        if changed:
            self.counts["queued"] -= 1
            self.counts[new_state] += 1
            if new_state == "delivered":
                self._undelivered.pop(record_id, None)

    # ---------------------------------------------------------------- erasure

    async def due(self, now: float, limit: int = 1000) -> list[Due]:
        """Records to erase now: every delivered copy still present (no delivered copy is
        kept), then those whose retention ends at or before ``now``, earliest first."""

        def fetch(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            columns = "id, channel, state, received_at, delivered_at, ciphertext_sha256"
            delivered = conn.execute(
                f"SELECT {columns} FROM records WHERE state='delivered' "  # noqa: S608
                "AND erased_at IS NULL ORDER BY received_at LIMIT ?",
                (limit,),
            ).fetchall()
            expired = conn.execute(
                f"SELECT {columns} FROM records WHERE erased_at IS NULL "  # noqa: S608
                "AND expires_at <= ? AND state != 'delivered' ORDER BY expires_at LIMIT ?",
                (now, limit - len(delivered)),
            ).fetchall()
            return delivered + expired

        return [Due(*row) for row in await self._index.run(fetch)]

    async def expiring_undelivered(self, now: float, within: float) -> dict[str, int]:
        """Per channel, the undelivered records whose deadline falls before now + within."""

        def fetch(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            return conn.execute(
                "SELECT channel, COUNT(*) FROM records WHERE erased_at IS NULL "
                "AND state IN ('queued', 'held') AND expires_at <= ? GROUP BY channel",
                (now + within,),
            ).fetchall()

        return dict(await self._index.run(fetch))

    async def describe(self, record_id: str) -> Due | None:
        """The erasure facts of one live record (an operator's erasure)."""
        found = await self.describe_many([record_id])
        return found[0] if found else None

    async def describe_many(self, record_ids: Sequence[str]) -> list[Due]:
        """The erasure facts of those of these records that are still live, in order."""
        wanted = list(dict.fromkeys(record_ids))

        def fetch(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            rows = []
            for record_id in wanted:
                row = conn.execute(
                    "SELECT id, channel, state, received_at, delivered_at, ciphertext_sha256 "
                    "FROM records WHERE id=? AND erased_at IS NULL",
                    (record_id,),
                ).fetchone()
                if row is not None:
                    rows.append(row)
            return rows

        return [Due(*row) for row in await self._index.run(fetch)]

    async def erase(self, record_ids: Sequence[str], *, reason: str, at: float) -> list[Erased]:
        """Crypto-erase and unlink records; returns what was erased, for the ledger.

        The data key is destroyed in the index first (``secure_delete`` overwrites it in
        the database file, and a ``TRUNCATE`` checkpoint empties the write-ahead log that
        still held the page that carried it), then the ciphertext is unlinked and its
        directory fsynced. Records already erased or unknown are skipped.
        """
        wanted = list(dict.fromkeys(record_ids))

        def destroy(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            erased = []
            for record_id in wanted:
                row = conn.execute(
                    "SELECT id, channel, state, received_at, delivered_at, ciphertext_size, "
                    "ciphertext_sha256 FROM records WHERE id=? AND wrapped_key IS NOT NULL",
                    (record_id,),
                ).fetchone()
                if row is None:
                    continue
                conn.execute(
                    "UPDATE records SET wrapped_key=NULL, state='erased', erased_at=?, "
                    "erase_reason=? WHERE id=?",
                    (at, reason, record_id),
                )
                erased.append(row)
            return erased

        rows = await self._index.run(destroy, checkpoint=True)
        if not rows:
            return []
        result = []
        for record_id, channel, state, received_at, delivered_at, size, digest in rows:
            # Counted as the index says, before the unlink: a reader who sees "erased"
            # in the index sees the counters agree.
            self.counts[state] -= 1
            self.bytes -= size
            self._undelivered.pop(record_id, None)
            result.append(
                Erased(record_id, channel, received_at, delivered_at, at, reason, state, digest)
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._fsync_pool, self._unlink, [r[0] for r in rows])
        return result

    def _unlink(self, record_ids: list[str]) -> None:
        for record_id in record_ids:
            self._path(record_id).unlink(missing_ok=True)
        fsync_dir(self._records_dir)

    # --------------------------------------------------------------- capacity

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize


def spool_in_use(directory: Path) -> bool:
    """Whether a running gateway holds this spool (its lock), without disturbing it."""
    try:
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False  # no spool there yet: nothing is running on it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases a lock we took
    return False


def read_records(
    directory: Path,
    *,
    states: Sequence[str] = (),
    channel: str | None = None,
    record_id: str | None = None,
    limit: int = 100,
) -> list[Record]:
    """Records' metadata straight from the index, read-only: works with or without the
    daemon running (records being delivered show as ``queued``), newest first."""
    path = directory / "index.sqlite3"
    if not path.exists():
        raise SpoolError(f"no spool index at {path}")
    where, params = ["1=1"], []
    if states:
        where.append(f"state IN ({','.join('?' * len(states))})")
        params += list(states)
    if channel is not None:
        where.append("channel=?")
        params.append(channel)
    if record_id is not None:
        where.append("id=?")
        params.append(record_id)
    sql = (
        f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(where)} "  # noqa: S608 - constant parts
        "ORDER BY received_at DESC LIMIT ?"
    )
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        rows = conn.execute(sql, (*params, limit)).fetchall()
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot read the spool index {path}: {exc}") from None
    finally:
        conn.close()
    return [Record.from_row(row) for row in rows]
