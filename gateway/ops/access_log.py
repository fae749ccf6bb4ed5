"""The access log (アクセスログ): every request attempt, hash-chained, a file a day.

An entry is first a row of the spool index (``access_pending``), committed in the same
group as whatever it belongs to: an accepted submission's entry is durable before its
202 at no fsync of its own. :class:`AccessExporter` moves the rows, in order, into
``<directory>/YYYY-MM-DD.jsonl`` (the Japan day of the entry's ``time``), one hash chain
(:class:`~gateway.ops.chain.HashChainLog`) that each day's file continues from the day
before's last entry; ``anchor`` holds the head of the newest file. A row's number in the
index is its ``seq`` in the chain. Files older than the retention are removed
(:meth:`AccessLog.expire`); ``expired`` then holds the head of the last one removed, so the
oldest file left still proves it follows on, and each removal goes to the audit log.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from gateway import fsutil
from gateway.errors import StorageFailed
from gateway.japan import JST
from gateway.ops.chain import GENESIS, ChainBroken, ChainEntry, HashChainLog
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.spool.backend import SpoolBackend as Spool

DAY_FILE = re.compile(r"(\d{4}-\d{2}-\d{2})\.jsonl")
EXPORT_BATCH = 5000
EXPORT_INTERVAL = 0.25
"""Seconds the exporter lets entries gather before writing them out (one fsync)."""
EXPORT_RETRY_MAX = 5.0

log = get_logger("gateway.access")


def day_of(time: str) -> date:
    """The Japan day of an entry's ``time`` (ISO 8601 with its offset)."""
    return datetime.fromisoformat(time).astimezone(JST).date()


def jst_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, JST).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Expired:
    """A day's file removed by retention: what the audit log records of it."""

    path: Path
    first_seq: int
    last_seq: int
    last_hash: str


@dataclass(frozen=True)
class Verified:
    files: int
    entries: int
    head: tuple[int, str]


class AccessLog:
    """The daily files of the access log, chained from one day to the next."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.anchor = directory / "anchor"
        self._expired = directory / "expired"

    def files(self) -> list[tuple[date, Path]]:
        """The day files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = DAY_FILE.fullmatch(path.name)
            if match is not None:
                found.append((date.fromisoformat(match[1]), path))
        return sorted(found)

    def path_for(self, day: date) -> Path:
        return self.directory / f"{day.isoformat()}.jsonl"

    def expired_head(self) -> tuple[int, str]:
        """The head of the last file retention removed; (0, GENESIS) when none was."""
        try:
            seq, digest = self._expired.read_text("ascii").split()
            return int(seq), digest
        except FileNotFoundError:
            return 0, GENESIS
        except ValueError:
            raise ChainBroken(self._expired, None, "malformed", "not '<seq> <hash>'") from None

    def _chain(self, path: Path, start: tuple[int, str], newest: bool) -> HashChainLog:
        anchor = self.anchor if newest else None
        return HashChainLog(path, anchor=anchor, kind="access", start=start)

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry written (checked against the anchor)."""
        files = self.files()
        if not files:
            return self.expired_head()
        newest = files[-1][1]
        return self._chain(newest, self._start_of(newest), newest=True).head

    def _last_of(self, path: Path) -> tuple[int, str]:
        return HashChainLog(path, kind="access", start=(0, GENESIS)).head

    def append(self, rows: list[tuple[int, str]]) -> tuple[int, str]:
        """Write numbered entries (seq, JSON body) in order; returns the new head.

        Each goes to the file of its day, but never to a day before the newest file's
        (a clock set back): the chain only grows at its end.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = self.files()
        newest = files[-1][0] if files else None
        head = self.head()
        groups: dict[date, list[dict[str, object]]] = {}
        for seq, body_text in rows:
            if seq != head[0] + 1 + sum(len(g) for g in groups.values()):
                raise ValueError(f"access log entry {seq} does not follow entry {head[0]}")
            body = json.loads(body_text)
            day = day_of(str(body["time"]))
            if newest is not None and day < newest:
                day = newest
            newest = day
            groups.setdefault(day, []).append(body)
        for day, bodies in sorted(groups.items()):
            path = self.path_for(day)
            # An existing file continues from the file before it; a new one from the head.
            start = self._start_of(path) if path.exists() else head
            written = self._chain(path, start, newest=True).append_many(bodies)
            head = (written[-1].seq, written[-1].hash)
        return head

    def _start_of(self, path: Path) -> tuple[int, str]:
        """What the day file ``path`` continues from: the last entry of the file before
        it, or the head retention left."""
        before = [p for _, p in self.files() if p.name < path.name]
        return self._last_of(before[-1]) if before else self.expired_head()

    def entries(
        self, first: date | None = None, last: date | None = None
    ) -> Iterator[tuple[Path, ChainEntry]]:
        """Every entry of the days from ``first`` to ``last`` (all by default), each
        verified; ChainBroken names the file and the line of the first problem."""
        files = self.files()
        start = self.expired_head()
        for index, (day, path) in enumerate(files):
            newest = index == len(files) - 1
            if last is not None and day > last:
                break
            chain = self._chain(path, start, newest=newest)
            if first is not None and day < first:
                start = self._last_of(path)  # not verified: only where it ends
                continue
            for entry in chain.entries():
                yield path, entry
                start = (entry.seq, entry.hash)

    def verify(self, first: date | None = None, last: date | None = None) -> Verified:
        count, head, files = 0, self.expired_head(), set()
        for path, entry in self.entries(first, last):
            count += 1
            files.add(path)
            head = (entry.seq, entry.hash)
        return Verified(len(files), count, head)

    def expire(self, today: date, keep_days: int) -> list[Expired]:
        """Remove the day files older than ``keep_days`` before ``today``, oldest first
        (never the newest); each one's head is kept in ``expired`` first."""
        removed = []
        files = self.files()
        for day, path in files[:-1]:
            if day >= today - timedelta(days=keep_days):
                break
            first = next(HashChainLog(path, kind="access", start=self.expired_head()).entries())
            last_seq, last_hash = self._last_of(path)
            line = f"{last_seq} {last_hash}\n".encode("ascii")
            fsutil.write_atomic(self._expired, line, mode=0o600, kind="access-expired")
            path.unlink()
            fsutil.fsync_dir(self.directory, kind="access")
            removed.append(Expired(path, first.seq, last_seq, last_hash))
        return removed


class AccessExporter:
    """Moves committed entries from the spool index into the day files, in order."""

    def __init__(
        self,
        spool: Spool,
        access: AccessLog,
        metrics: Metrics,
        *,
        retention_days: int,
        on_expired: Callable[[Expired], None],
        clock: Callable[[], float],
        before_export: Callable[[], None] = lambda: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        interval: float = EXPORT_INTERVAL,
    ) -> None:
        self._spool = spool
        self._log = access
        self._metrics = metrics
        self.retention_days = retention_days
        self._on_expired = on_expired
        self._clock = clock
        self.before_export = before_export
        """Called before each export (the recorder queues entries the disk refused)."""
        self._sleep = sleep
        self._interval = interval
        self._wake = asyncio.Event()
        self._expired_on: date | None = None

    async def prepare(self) -> None:
        """At start, before any request: entries are numbered after the log's head, and
        those a crash left in the index after writing them out are forgotten."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        head = await asyncio.to_thread(self._log.head)
        await self._spool.forget_access(head[0])
        await self._spool.number_access_after(head[0])

    @property
    def directory(self) -> Path:
        return self._log.directory

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Export whenever entries arrive, gathering them for ``interval`` seconds; once
        a day (the first export of a Japan day), remove the files past retention."""
        wait = self._interval
        while True:
            await self._wake.wait()
            await self._sleep(wait)
            self._wake.clear()
            try:
                self.before_export()
                await self.export()
            except (StorageFailed, OSError) as exc:
                # The entries stay in the index (committed); written out once the disk
                # takes them, in order, the chain unbroken.
                log.error("access_log_unwritable", error=type(exc).__name__, retry_in=wait)
                self._wake.set()
                wait = min(wait * 2, EXPORT_RETRY_MAX)
                continue
            wait = self._interval
            today = datetime.fromtimestamp(self._clock(), JST).date()
            if self._expired_on != today:
                await self.expire(today)
                self._expired_on = today

    async def expire(self, today: date) -> list[Expired]:
        removed = await asyncio.to_thread(self._log.expire, today, self.retention_days)
        for gone in removed:
            log.info("access_log_expired", access_file=gone.path.name, last_seq=gone.last_seq)
            self._on_expired(gone)
        return removed

    async def export(self) -> int:
        """Write out every committed entry; returns how many."""
        total = 0
        while rows := await self._spool.pending_access(EXPORT_BATCH):
            # The head as the files say: a write cut short by a full disk may have put
            # some of the last batch out already.
            head = await asyncio.to_thread(self._log.head)
            rows = [row for row in rows if row[0] > head[0]]
            if rows:
                head = await asyncio.to_thread(self._log.append, rows)
                total += len(rows)
            await self._spool.forget_access(head[0])
        if total:
            self._metrics.access_log_entries.inc(total)
        return total
