"""A hash-chained, append-only log in PostgreSQL, shared by every gateway node: the
erasure ledger and the audit log of the shared backend (the file's
:class:`~gateway.ops.chain.HashChainLog`, same interface, same entries).

Tables, in schema ``gateway``::

    chain_entries   chain, seq, prev, at, body, hash; primary key (chain, seq)
    chain_heads     chain (primary key), seq, hash: the last entry of each chain

``body`` is the canonical JSON that was hashed (text, not jsonb, which would reorder
it), and ``hash`` is computed by the same function as the file's: an entry has the
same hash whichever backend stored it, and ``gatewayctl`` can compare the two.

Appending is one transaction: ``SELECT ... FROM gateway.chain_heads ... FOR UPDATE``,
the tail checked against the head, the entries inserted, the head moved on, commit.
The head row's lock serialises the appends of every node, so a chain has one head and
no gaps. A row lock, not an advisory lock: it is taken on the very row that says where
the chain ends, shows in ``pg_locks`` with its table, ends with the transaction
whatever happens to the client (commit, rollback, a dropped connection), and works
through a pooler in transaction mode, where a session's advisory lock would not.

:meth:`PgChainLog.verify` reads the chain in one snapshot, in seq order, recomputing
every hash, and raises :class:`~gateway.ops.chain.ChainBroken` naming the chain and
the seq: ``edited`` (a body, time or hash changed, or a head row that does not match
the last entry), ``deleted_or_reordered`` (a seq missing, or an entry not chained to
the one before), ``bad_genesis`` (seq 1 missing or not after the genesis hash),
``malformed`` (a body that is not a JSON object) or ``truncated`` (the head row records
entries past the last one, or is missing). The head row plays the file's anchor: it
catches a cut tail, not a role that may rewrite both tables consistently.

Errors of the driver become :func:`gateway.pgutil.unavailable`'s: an outage is
``StorageUnavailable``, a ``StorageFailed``, which the daemon's audit backlog already
retries. No error quotes a body or the DSN.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import psycopg

from gateway import pgutil
from gateway.ops.chain import (
    GENESIS,
    BreakReason,
    ChainBroken,
    ChainEntry,
    _canonical,
    _entry_hash,
    _iso_utc,
)

DDL = """
CREATE TABLE IF NOT EXISTS gateway.chain_entries (
    chain text NOT NULL,
    seq bigint NOT NULL,
    prev text NOT NULL,
    at text NOT NULL,
    body text NOT NULL,
    hash text NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE TABLE IF NOT EXISTS gateway.chain_heads (
    chain text PRIMARY KEY,
    seq bigint NOT NULL,
    hash text NOT NULL
);
"""
SCAN_BATCH = 1000
"""Entries fetched at a time when a chain is read (a server-side cursor)."""
_ENTRY = "seq, prev, at, body, hash"
_TAIL = f"""
SELECT h.seq, h.hash, e.seq, e.prev, e.at, e.body, e.hash
FROM (VALUES (%(chain)s)) AS c (chain)
LEFT JOIN gateway.chain_heads h ON h.chain = c.chain
LEFT JOIN LATERAL (
    SELECT {_ENTRY} FROM gateway.chain_entries
    WHERE chain = c.chain ORDER BY seq DESC LIMIT 1
) e ON true
"""  # noqa: S608 - constant columns
"""The head row and the last entry, in one statement (one snapshot)."""


class ChainLog(Protocol):
    """What every keeper of a hash chain offers: a file (:class:`HashChainLog`) or
    PostgreSQL (:class:`PgChainLog`)."""

    @property
    def head(self) -> tuple[int, str]: ...

    def append(self, body: Mapping[str, Any]) -> ChainEntry: ...

    def append_many(self, bodies: Sequence[Mapping[str, Any]]) -> list[ChainEntry]: ...

    def verify(self) -> int: ...

    def entries(self) -> Iterator[ChainEntry]: ...


def _close(slot: list[psycopg.Connection[Any] | None]) -> None:
    conn, slot[0] = slot[0], None
    if conn is not None:
        conn.close()


class PgChainLog:
    """One hash chain (``ledger``, ``audit``) in PostgreSQL; thread-safe, and safe for
    any number of processes and nodes. Synchronous: callers in the event loop run it
    on a thread. It keeps one connection for appending (closed by :meth:`close`, or
    when the object goes); each reading of the whole chain uses one of its own."""

    def __init__(self, dsn: str, chain: str, *, clock: Callable[[], float] = time.time) -> None:
        self._dsn = dsn
        self.chain = chain
        self.kind = chain
        self.location = f"postgresql:gateway.chain_entries[{chain}]"
        """Where the chain is, for messages and reports (never the DSN: it has a password)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._slot: list[psycopg.Connection[Any] | None] = [None]
        self._closer = weakref.finalize(self, _close, self._slot)

    def close(self) -> None:
        with self._lock:
            _close(self._slot)

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry; ``(0, GENESIS)`` for an empty chain.

        Raises ChainBroken when the last entry or the head row is not intact."""
        with self._lock, pgutil.translated():
            row = self._conn().execute(_TAIL, {"chain": self.chain}).fetchone()
        assert row is not None
        return self._tail(row)

    def append(self, body: Mapping[str, Any]) -> ChainEntry:
        """Append one entry and return it once it is committed."""
        return self.append_many([body])[0]

    def append_many(self, bodies: Sequence[Mapping[str, Any]]) -> list[ChainEntry]:
        """Append entries in one transaction; all are committed when this returns.

        Raises ChainBroken, appending nothing, when the chain's tail (its last entry and
        head row) is not intact; TypeError or ValueError, appending nothing, for a body
        that is not JSON; StorageUnavailable when the database cannot be reached."""
        if not bodies:
            return []
        texts = [_canonical(body).decode("utf-8") for body in bodies]
        with self._lock, pgutil.translated():
            conn = self._conn()
            with conn.transaction():
                seq, prev = self._lock_head(conn)
                at = _iso_utc(self._clock())
                entries: list[ChainEntry] = []
                for body, text in zip(bodies, texts, strict=True):
                    seq += 1
                    digest = _entry_hash(seq, prev, at, body)
                    entries.append(ChainEntry(seq, prev, digest, at, json.loads(text)))
                    prev = digest
                self._insert(conn, entries, texts)
                conn.execute(
                    "UPDATE gateway.chain_heads SET seq = %s, hash = %s WHERE chain = %s",
                    (seq, prev, self.chain),
                )
        return entries

    def verify(self) -> int:
        """Read the whole chain; return its number of entries or raise ChainBroken."""
        return sum(1 for _ in self.entries())

    def entries(self) -> Iterator[ChainEntry]:
        """Yield the chain's entries in order, each verified; raise ChainBroken at the
        first problem. The head row is checked after the last entry. The chain is read
        in one snapshot, as it stood when iteration began."""
        conn = pgutil.connect(self._dsn)
        try:
            with pgutil.translated():
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                with conn.transaction():
                    yield from self._scan(conn)
        finally:
            conn.close()

    # -- internals -----------------------------------------------------------------

    def _conn(self) -> psycopg.Connection[Any]:
        """The appending connection; a new one after the server went away."""
        conn = self._slot[0]
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        _close(self._slot)
        conn = pgutil.connect(self._dsn, autocommit=True)
        try:
            pgutil.ensure_schema(conn, DDL)
        except BaseException:
            conn.close()
            raise
        self._slot[0] = conn
        return conn

    def _insert(
        self, conn: psycopg.Connection[Any], entries: list[ChainEntry], texts: list[str]
    ) -> None:
        try:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO gateway.chain_entries (chain, seq, prev, at, body, hash) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    [
                        (self.chain, e.seq, e.prev, e.at, text, e.hash)
                        for e, text in zip(entries, texts, strict=True)
                    ],
                )
        except psycopg.errors.UniqueViolation:  # rows written around the head row
            raise self._broken(
                entries[0].seq, "edited", "entries past the head row (not appended by a node)"
            ) from None

    def _lock_head(self, conn: psycopg.Connection[Any]) -> tuple[int, str]:
        """Lock the chain's head row (made for an empty chain) and check the tail."""
        locked = conn.execute(
            "SELECT seq, hash FROM gateway.chain_heads WHERE chain = %s FOR UPDATE",
            (self.chain,),
        ).fetchone()
        if locked is None:  # a new chain, or a head row removed (then refused below)
            conn.execute(
                "INSERT INTO gateway.chain_heads (chain, seq, hash) SELECT %(chain)s, 0, %(g)s "
                "WHERE NOT EXISTS (SELECT FROM gateway.chain_entries WHERE chain = %(chain)s) "
                "ON CONFLICT DO NOTHING",
                {"chain": self.chain, "g": GENESIS},
            )
            conn.execute(
                "SELECT FROM gateway.chain_heads WHERE chain = %s FOR UPDATE", (self.chain,)
            )
        row = conn.execute(_TAIL, {"chain": self.chain}).fetchone()
        assert row is not None
        return self._tail(row)

    def _tail(self, row: tuple[Any, ...]) -> tuple[int, str]:
        """The head from a :data:`_TAIL` row, once the last entry and the head agree."""
        end = (0, GENESIS)
        if row[2] is not None:
            last = self._entry(row[2:])
            end = (last.seq, last.hash)
        self._check_head(None if row[0] is None else (int(row[0]), str(row[1])), end)
        return end

    def _scan(self, conn: psycopg.Connection[Any]) -> Iterator[ChainEntry]:
        made = conn.execute("SELECT to_regclass('gateway.chain_entries')").fetchone()
        if made is None or made[0] is None:
            return  # no node ever wrote a chain here
        head = conn.execute(
            "SELECT seq, hash FROM gateway.chain_heads WHERE chain = %s", (self.chain,)
        ).fetchone()
        seq, prev = 0, GENESIS
        with conn.cursor(name=f"chain_{self.chain}") as cur:
            cur.itersize = SCAN_BATCH
            cur.execute(
                f"SELECT {_ENTRY} FROM gateway.chain_entries "  # noqa: S608 - constant
                "WHERE chain = %s ORDER BY seq",
                (self.chain,),
            )
            for row in cur:
                entry = self._entry(row)
                self._check_link(entry, seq, prev)
                seq, prev = entry.seq, entry.hash
                yield entry
        self._check_head(None if head is None else (int(head[0]), str(head[1])), (seq, prev))

    def _entry(self, row: Sequence[Any]) -> ChainEntry:
        """An entry from its row, its hash and canonical form checked."""
        seq, prev, at, text, digest = int(row[0]), str(row[1]), str(row[2]), row[3], row[4]
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            raise self._broken(seq, "malformed", "body is not JSON") from None
        if not isinstance(body, dict):
            raise self._broken(seq, "malformed", "body is not a JSON object")
        if _entry_hash(seq, prev, at, body) != digest:
            raise self._broken(seq, "edited", "entry edited (hash mismatch)")
        if _canonical(body).decode("utf-8") != text:
            raise self._broken(seq, "edited", "entry edited (not canonical JSON)")
        return ChainEntry(seq, prev, str(digest), at, body)

    def _check_link(self, entry: ChainEntry, seq: int, prev: str) -> None:
        """``entry`` must be seq + 1, chained to the entry before (``prev``)."""
        if seq == 0 and (entry.seq, entry.prev) != (1, GENESIS):
            found = "does not follow the genesis hash" if entry.seq == 1 else "is missing"
            raise self._broken(1, "bad_genesis", f"the first entry (seq 1) {found}")
        if entry.seq != seq + 1:
            raise self._broken(
                seq + 1,
                "deleted_or_reordered",
                f"entry missing: seq {seq} is followed by seq {entry.seq} (deleted or moved)",
            )
        if entry.prev != prev:
            raise self._broken(
                entry.seq,
                "deleted_or_reordered",
                f"not chained to seq {seq} (an entry before it replaced or moved)",
            )

    def _check_head(self, head: tuple[int, str] | None, end: tuple[int, str]) -> None:
        """The head row must record the last entry (``end``): else a tail was cut, or
        the head row edited."""
        seq = end[0]
        if head is None:
            if seq:
                raise self._broken(
                    0, "truncated", "head row missing: removed entries cannot be ruled out"
                )
            return
        if head[0] > seq:
            raise self._broken(
                head[0],
                "truncated",
                f"head row records seq {head[0]} but the chain ends at seq {seq}: "
                "trailing entries removed",
            )
        if head != end:
            raise self._broken(
                head[0],
                "edited",
                f"head row records seq {head[0]} but the chain's last entry is seq {seq}"
                if head[0] != seq
                else "entry differs from the head row (hash mismatch)",
            )

    def _broken(self, seq: int, reason: BreakReason, detail: str) -> ChainBroken:
        return ChainBroken(self.location, None, reason, detail, seq=seq)
