"""The spool's SQLite index, owned by one thread that commits in groups (the SQL
itself is in :mod:`gateway.spool.queries`).

Every operation is a function of a connection; the thread takes every operation that
is waiting, fsyncs the files the operations carry (a new record's file: the one hand-off
of a record to this thread makes it durable and indexes it), runs each operation inside
its own savepoint, fsyncs the directories that the batch asked for once, and commits
once (WAL, ``synchronous=FULL``). Under load many submissions share one fsync of the
directory and of the index, the way a mail queue batches its acknowledgements. A file
whose fsync fails fails its own operation only; the rest of the batch commits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import SpoolError, StorageFailed, StorageFull
from gateway.fsutil import fault_point, fsync, fsync_dir
from gateway.spool.queries import SCHEMA, SCHEMA_VERSION, upgrade_from_v1

T = TypeVar("T")

MAX_BATCH = 512
READ_RETRIES = 3

SQLITE_IOERR = 10
SQLITE_FULL = 13
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def sqlite_error_for(error: OSError) -> sqlite3.OperationalError:
    """The error SQLite itself raises when a write of its fails with ``error``:
    SQLITE_FULL for a full disk, SQLITE_IOERR for anything else."""
    full = error.errno in FULL_ERRNOS
    raised = sqlite3.OperationalError("database or disk is full" if full else "disk I/O error")
    raised.sqlite_errorcode = SQLITE_FULL if full else SQLITE_IOERR
    return raised


def storage_error(error: BaseException) -> BaseException:
    """A failed write to disk as the spool reports it (StorageFull, StorageFailed);
    any other error as it is."""
    if isinstance(error, OSError):
        if error.errno in FULL_ERRNOS:
            return StorageFull(f"the spool's filesystem is full ({os.strerror(error.errno)})")
        return StorageFailed(f"a write to the spool failed ({type(error).__name__}: {error})")
    if isinstance(error, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
        error, sqlite3.IntegrityError
    ):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == SQLITE_FULL:
            return StorageFull("the spool index could not be written: database or disk is full")
        if code is not None and code & 0xFF == SQLITE_IOERR:
            return StorageFailed("the spool index could not be written: disk I/O error")
    return error


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any]
    sync_dirs: tuple[Path, ...] = field(default_factory=tuple)
    sync_files: tuple[int, ...] = ()
    """Open descriptors of files made durable before ``fn`` runs (the caller keeps
    them open until the operation is done, and closes them)."""
    checkpoint: bool = False
    retries: int = 0  # a read run again after its batch's commit failed
    kind: str = "index"  # what the fault seam calls this operation's commit


class IndexThread:
    """A single writer thread over one SQLite connection, with group commit."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="spool-index", daemon=True)
        self.commits = 0
        self._again: list[_Op] = []  # reads to run again: their batch's commit failed
        self.checkpoints_incomplete = 0

    async def start(self) -> None:
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    async def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)

    async def run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        sync_dirs: Iterable[Path] = (),
        sync_files: Iterable[int] = (),
        checkpoint: bool = False,
        kind: str = "index",
    ) -> T:
        """Run ``fn`` in the next batch; returns once the batch is committed.

        ``sync_files`` (open file descriptors, the caller's to close once this returns)
        are fsynced first: ``fn`` runs only when they are durable, else it fails with
        the storage error and the rest of its batch goes on. ``sync_dirs`` are fsynced
        once for the batch, before its commit. ``checkpoint`` also runs a TRUNCATE
        checkpoint after the commit, so no older version of a changed page survives in
        the write-ahead log (erasure).
        """
        if not self._thread.is_alive():
            # Nobody would ever answer: fail instead of waiting forever (e.g. a request
            # that outlived the drain and reaches the spool after it was closed).
            raise SpoolError("the spool index is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        op = _Op(fn, future, tuple(sync_dirs), tuple(sync_files), checkpoint, kind=kind)
        self._queue.put(op)
        return await asyncio.wrap_future(future)

    def _connect(self) -> sqlite3.Connection:
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        # database file's mode, so none of the three is ever readable by others,
        # whatever the umask (the index holds wrapped data keys and field names).
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if tables and version == 1:
            upgrade_from_v1(conn)  # the rows' keys are wrapped again by Spool.open
        elif tables and version != SCHEMA_VERSION:
            conn.close()
            raise SpoolError(
                f"{self._path}: spool index schema version {version}, this gateway reads "
                f"version {SCHEMA_VERSION}; drain the spool with the old version first"
            )
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return conn

    def _run(self) -> None:
        conn: sqlite3.Connection | None
        try:
            conn = self._connect()
        except Exception as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        batch: list[_Op] = []
        try:
            while True:
                batch, self._again = self._again, []
                if not batch:
                    first = self._queue.get()
                    if first is None:
                        break
                    batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                if conn is None:  # a failed rollback closed it: open it again
                    conn = self._reopen(batch)
                if conn is not None:
                    conn = self._execute(conn, batch)
                batch = []
                if stop:
                    self._fail(self._again, SpoolError("the spool index is stopping"))
                    break
        except BaseException as exc:
            # The thread is dying (a MemoryError, a bug): fail every caller, in the batch
            # and still queued, rather than leave them waiting forever.
            self._fail_all(batch, SpoolError(f"spool index stopped: {type(exc).__name__}"))
            raise
        finally:
            if conn is not None:
                conn.close()

    def _reopen(self, batch: list[_Op]) -> sqlite3.Connection | None:
        """A new connection, or None with the batch failed (the disk still refuses)."""
        try:
            return self._connect()
        except Exception as exc:
            self._fail(batch, storage_error(exc))
            return None

    def _fail_all(self, batch: list[_Op], error: SpoolError) -> None:
        pending = list(batch)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(item)
        self._fail(pending, error)

    def _execute(self, conn: sqlite3.Connection, batch: list[_Op]) -> sqlite3.Connection | None:
        """Run and commit one batch; returns the connection to go on with (None when a
        failed rollback left it unusable: the next batch opens a new one).

        When the commit fails (a full or failing disk), the operations that wrote fail
        with the storage error; those that only read run again in the next batch, so a
        status query never fails for another caller's write.
        """
        results: list[tuple[_Op, Any, BaseException | None]] = []
        readers: list[_Op] = []
        writers: set[str] = set()  # the kinds of the operations that changed something
        unsynced = self._sync_files(batch)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if not (op.future.running() or op.future.set_running_or_notify_cancel()):
                    continue  # the caller gave up before the operation started
                refused = unsynced.get(id(op))
                if refused is not None:  # its file is not durable: no row for it
                    results.append((op, None, refused))
                    continue
                conn.execute("SAVEPOINT op")
                before = conn.total_changes
                try:
                    value = op.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((op, None, storage_error(exc)))
                else:
                    conn.execute("RELEASE op")
                    results.append((op, value, None))
                    if conn.total_changes == before and not (op.sync_dirs or op.sync_files):
                        readers.append(op)
                    elif conn.total_changes != before:
                        writers.add(op.kind)
            for directory in {d for op in batch for d in op.sync_dirs}:
                fsync_dir(directory, kind="record")
            if writers:
                try:
                    fault_point("index" if "index" in writers else min(writers), "commit")
                except OSError as injected:  # as SQLite would fail its own write
                    raise sqlite_error_for(injected) from None
            conn.execute("COMMIT")
            self.commits += 1
            if any(op.checkpoint for op in batch):
                # After the commit, never fail the batch: its rows are durable. A busy
                # result (another reader) is counted; the next checkpoint finishes the job.
                with contextlib.suppress(sqlite3.Error):
                    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    self.checkpoints_incomplete += int(busy)
        except Exception as exc:
            # Nothing of the batch is committed: roll back before any caller learns so
            # (and may try again), then fail the writers with the storage error.
            usable = self._rolled_back(conn)
            again = [op for op in readers if op.retries < READ_RETRIES]
            for op in again:
                op.retries += 1
            self._again.extend(again)
            self._fail([op for op in batch if op not in again], storage_error(exc))
            return conn if usable else None
        for op, value, error in results:
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(value)
        return conn

    @staticmethod
    def _sync_files(batch: list[_Op]) -> dict[int, BaseException]:
        """Fsync the files of every operation still wanted, one after the other (no
        hand-off to other threads); the storage error of each operation whose fsync
        failed, by the operation's id."""
        refused: dict[int, BaseException] = {}
        for op in batch:
            if not op.sync_files:
                continue
            if not (op.future.running() or op.future.set_running_or_notify_cancel()):
                continue  # the caller gave up: its descriptors may be closed already
            try:
                for fd in op.sync_files:
                    fsync(fd, kind="record")
            except Exception as exc:
                refused[id(op)] = storage_error(exc)
        return refused

    @staticmethod
    def _rolled_back(conn: sqlite3.Connection) -> bool:
        """Roll back what is left of a failed transaction; False (and the connection
        closed) when even that fails, as it may on a failing disk."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            return False
        return True

    @staticmethod
    def _fail(batch: list[_Op], error: BaseException) -> None:
        for op in batch:
            if op.future.done():
                continue
            if op.future.running() or op.future.set_running_or_notify_cancel():
                op.future.set_exception(error)
