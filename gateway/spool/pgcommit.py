"""Group commit for the PostgreSQL spool: one task commits every new record and access
log entry that is waiting, in one transaction.

The task takes everything queued and inserts the rows inside a SAVEPOINT, statements
pipelined; should one row be refused (a duplicate Idempotency-Key), it rolls back to
the savepoint and inserts each operation in a SAVEPOINT of its own, so the refusal
fails only its own request. Then it copies the ciphertext of every record that went
in (``COPY ... FROM STDIN`` in binary, 256 KiB rows read from each staging file a few
at a time, so memory holds at most a MiB of it), COMMITs once and only then answers
every waiter. Under load many submissions share one commit and one WAL flush of the
server, as they share one fsync of the SQLite index (:mod:`gateway.spool.index`).

Access entries are numbered here, per node and without gaps: a number is kept only
when its entry's savepoint went through and its batch committed.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from gateway.errors import SpoolError, StorageFailed
from gateway.ops.logs import get_logger
from gateway.spool import pgqueries
from gateway.spool.pgqueries import CHUNK_SIZE, Conn

MAX_BATCH = 256
"""Operations per transaction at most (the rest wait for the next one)."""

log = get_logger("gateway.spool")


CHUNKS_PER_READ = 4
"""Chunks of a staging file read per trip to a thread (1 MiB)."""


def _read_chunks(path: Path, first: int) -> list[bytes]:
    """Chunks ``first`` .. ``first + CHUNKS_PER_READ - 1`` of a staging file."""
    with path.open("rb") as fileobj:
        fileobj.seek(first * CHUNK_SIZE)
        chunks: list[bytes] = []
        while len(chunks) < CHUNKS_PER_READ and (data := fileobj.read(CHUNK_SIZE)):
            chunks.append(data)
        return chunks


@dataclass
class Insert:
    """A new record: its row (:func:`gateway.spool.records.queued_row`) and the staging
    file its ciphertext is copied from."""

    row: dict[str, Any]
    path: Path


@dataclass
class _Op:
    insert: Insert | None
    access: str | None
    future: asyncio.Future[int]
    seq: int = 0
    error: BaseException | None = None


def _detached(error: BaseException) -> BaseException:
    """An error as the waiter sees it: without the driver's exception as its context
    (whose text may quote a value)."""
    error.__context__ = None
    error.__cause__ = None
    return error


class GroupCommit:
    """The one task that commits new records and access entries in groups."""

    def __init__(self, pool: AsyncConnectionPool[Conn], node: str) -> None:
        self._pool = pool
        self._node = node
        self._waiting: deque[_Op] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.next_seq = 1
        """The number the next access entry of this node gets."""
        self.batches = 0
        """Transactions committed (each holding one or more operations)."""
        self.records = 0
        """Records committed, over all batches."""
        self.largest_batch = 0

    def start(self, next_seq: int) -> None:
        self.next_seq = next_seq
        self._task = asyncio.create_task(self._run(), name="spool-group-commit")

    async def stop(self) -> None:
        """Commit what is waiting, then end the task; later submissions fail."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    def submit(self, insert: Insert | None, access: str | None) -> asyncio.Future[int]:
        """Queue a record and/or an access entry for the next batch; the future gives
        the entry's number (0 without one) once committed, or the error."""
        if self._task is None or self._task.done() or self._closing:
            raise SpoolError("the spool is not open")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Op(insert, access, future))
        self._wake.set()
        return future

    def number_after(self, seq: int) -> None:
        """Number entries from now on after ``seq``."""
        self.next_seq = max(self.next_seq, seq + 1)

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._waiting.popleft() for _ in range(min(MAX_BATCH, len(self._waiting)))]
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                self._fail(batch, functools.partial(SpoolError, "the spool is stopping"))
                raise
            except Exception as exc:  # a bug: fail the batch, keep committing the others
                log.error("group_commit_failed", error=type(exc).__name__)
                why = f"the spool commit failed ({type(exc).__name__})"
                self._fail(batch, functools.partial(SpoolError, why))

    async def _commit(self, batch: list[_Op]) -> None:
        base = self.next_seq
        try:
            async with self._pool.connection() as conn, conn.transaction():
                if len(batch) == 1:  # no savepoint needed: a refusal fails this op alone
                    await self._insert_alone(conn, batch[0], base)
                elif not await self._insert_together(conn, batch, base):
                    await self._insert_each(conn, batch, base)
                await self._copy_chunks(conn, [op.insert for op in batch if op.error is None])
        except psycopg.Error as exc:
            self._fail(batch, functools.partial(pgqueries.spool_error, exc))
            return
        except OSError as exc:  # a staging file could not be read: nothing was committed
            why = f"a staging file could not be read ({exc.strerror})"
            self._fail(batch, functools.partial(StorageFailed, why))
            return
        numbered = sum(1 for op in batch if op.error is None and op.access is not None)
        self.next_seq = max(self.next_seq, base + numbered)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for op in batch:
            if op.error is None and op.insert is not None:
                self.records += 1
            if op.future.done():  # a waiter that gave up (cancelled): committed anyway
                continue
            if op.error is not None:
                op.future.set_exception(op.error)
            else:
                op.future.set_result(op.seq)

    async def _insert_alone(self, conn: Conn, op: _Op, seq: int) -> None:
        if op.insert is not None:
            await conn.execute(pgqueries.INSERT_RECORD, op.insert.row)
        if op.access is not None:
            await conn.execute(pgqueries.INSERT_ACCESS, (self._node, seq, op.access))
            op.seq = seq

    async def _insert_together(self, conn: Conn, batch: list[_Op], base: int) -> bool:
        """Every row of the batch in one SAVEPOINT, the statements pipelined (a few
        round trips for the whole batch); False, rolled back, when one of them is
        refused (a duplicate key): then :meth:`_insert_each` finds which."""
        seqs = self._number(batch, base)
        records = [op.insert.row for op in batch if op.insert is not None]
        entries = [(self._node, seq, op.access) for op, seq in seqs]
        try:
            async with conn.transaction(), conn.cursor() as cur:
                if records:
                    await cur.executemany(pgqueries.INSERT_RECORD, records)
                if entries:
                    await cur.executemany(pgqueries.INSERT_ACCESS, entries)
        except psycopg.Error:
            if conn.broken or conn.info.transaction_status != TransactionStatus.INTRANS:
                raise  # the connection, not a row: the whole batch fails
            return False
        for op, seq in seqs:
            op.seq = seq
        return True

    async def _insert_each(self, conn: Conn, batch: list[_Op], base: int) -> None:
        """Each operation's rows in a SAVEPOINT of its own: a refused one fails alone,
        and the entries of the others are numbered without a gap."""
        numbered = 0
        for op in batch:
            try:
                async with conn.transaction():  # a SAVEPOINT
                    if op.insert is not None:
                        await conn.execute(pgqueries.INSERT_RECORD, op.insert.row)
                    if op.access is not None:
                        entry = (self._node, base + numbered, op.access)
                        await conn.execute(pgqueries.INSERT_ACCESS, entry)
            except psycopg.Error as exc:
                if conn.broken or conn.info.transaction_status != TransactionStatus.INTRANS:
                    raise
                op.error = _detached(pgqueries.spool_error(exc))
                continue
            if op.access is not None:
                op.seq = base + numbered
                numbered += 1

    @staticmethod
    def _number(batch: list[_Op], base: int) -> list[tuple[_Op, int]]:
        """The access entries of ``batch`` with the numbers they get if all commit."""
        with_entry = [op for op in batch if op.access is not None]
        return [(op, base + n) for n, op in enumerate(with_entry)]

    @staticmethod
    async def _copy_chunks(conn: Conn, inserts: list[Insert | None]) -> None:
        """Every record's ciphertext, as numbered 256 KiB rows, in one COPY."""
        files = [i for i in inserts if i is not None]
        if not files:
            return
        async with conn.cursor() as cur, cur.copy(pgqueries.COPY_CHUNKS) as copy:
            copy.set_types(list(pgqueries.CHUNK_TYPES))
            for insert in files:
                seq = 0
                while True:  # a thread reads a few chunks at a time: one hop for most files
                    chunks = await asyncio.to_thread(_read_chunks, insert.path, seq)
                    for data in chunks:
                        await copy.write_row((insert.row["id"], seq, data))
                        seq += 1
                    if len(chunks) < CHUNKS_PER_READ or len(chunks[-1]) < CHUNK_SIZE:
                        break

    @staticmethod
    def _fail(batch: list[_Op], error: Callable[[], BaseException]) -> None:
        """Fail every waiter of ``batch`` with a fresh error from ``error()``."""
        for op in batch:
            if not op.future.done():
                op.future.set_exception(_detached(error()))


class AccessPending:
    """The access log entries of one node waiting for export (a part of PgSpool)."""

    node_id: str
    _commits: GroupCommit | None

    def _connection(self) -> AbstractAsyncContextManager[Conn]:
        raise NotImplementedError

    def record_access(self, body: str) -> asyncio.Future[int]:
        """Queue an access log entry for the next group commit (not waited for); the
        future gives its number once committed."""
        if self._commits is None:
            raise SpoolError("the spool is not open")
        future = self._commits.submit(None, body)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def pending_access(self, limit: int) -> list[tuple[int, str]]:
        """This node's committed entries not yet forgotten, by number."""
        async with self._connection() as conn:
            return await pgqueries.pending_access(conn, self.node_id, limit)

    async def forget_access(self, through: int) -> None:
        async with self._connection() as conn:
            await pgqueries.forget_access(conn, self.node_id, through)

    async def number_access_after(self, seq: int) -> None:
        """Number this node's entries from now on after ``seq`` (its access log's head)."""
        if self._commits is None:
            raise SpoolError("the spool is not open")
        self._commits.number_after(seq)
