"""Step 4 of ``gatewayctl spool migrate``: a hash-chained file (the erasure ledger, the
audit log) into its chain in PostgreSQL (the tables of :mod:`gateway.ops.pgchain`),
entry for entry: seq, prev, at, body and hash unchanged, so the chain goes on from
where the file ended and verifies, and the head row names its last entry.

Resumable: the copy is ONE transaction, under the chain's head row lock (the lock every
appending node takes). The file is read verified (:meth:`HashChainLog.entries`); the
entries the database already has must be the file's first ones, exactly (a previous
run's copy), and only those after them are inserted. A database chain that differs
from the file at some seq stops the migration with that seq named, nothing written.
A database chain longer than the file (the file's entries, then what nodes appended
since) is left as it is: the file was copied before.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from gateway import pgutil
from gateway.ops import pgchain
from gateway.ops.chain import GENESIS, ChainBroken, ChainEntry, HashChainLog, _canonical
from gateway.spool.migrate_keys import MigrationFailed

INSERT_BATCH = 1000
MIGRATE_ACTION = "spool.migrate"
"""The audit action of the migration (its entry is written once, after the copy)."""


@dataclass(frozen=True)
class ChainCopied:
    """What was done to one chain: the file's entries, how many were copied now, how
    many the database holds after the file's last one, the seq of the first of those
    that records a migration (None: none), and the database chain's verified length."""

    chain: str
    entries: int
    copied: int
    beyond: int
    migration_seq: int | None
    verified: int
    head: tuple[int, str]


def _text(entry: ChainEntry) -> str:
    return _canonical(entry.body).decode("utf-8")


def _records_migration(body: str) -> bool:
    """Whether an entry's body (canonical JSON) is a successful migration's audit entry."""
    if f'"action":"{MIGRATE_ACTION}"' not in body:  # most entries: no parsing
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("outcome") == "ok"


def copy_chain(dsn: str, chain: str, source: HashChainLog) -> ChainCopied:
    """Copy the file chain ``source`` into chain ``chain``; then verify the database's
    chain. MigrationFailed when the file does not verify or the chains diverge."""
    step = f"chains ({chain})"
    try:
        file_entries = source.entries()
        with pgutil.translated(), pgutil.connect(dsn, autocommit=True) as conn:
            pgutil.ensure_schema(conn, pgchain.DDL)
            with conn.transaction():
                head = _lock_head(conn, chain)
                matched, beyond, marker = _compare(conn, chain, file_entries, step)
                if beyond == 0 and head != matched:
                    raise MigrationFailed(
                        step,
                        f"the PostgreSQL chain's head row (seq {head[0]}) does not name its "
                        f"last entry (seq {matched[0]}): the chain there is broken",
                    )
                copied, last = _insert(conn, chain, file_entries)
                if copied:
                    conn.execute(
                        "UPDATE gateway.chain_heads SET seq = %s, hash = %s WHERE chain = %s",
                        (last[0], last[1], chain),
                    )
    except ChainBroken as exc:
        raise MigrationFailed(step, f"the file does not verify ({exc.reason}): {exc}") from None
    entries = (last if copied else matched)[0]
    try:
        log = pgchain.PgChainLog(dsn, chain)
        verified, db_head = log.verify(), log.head
        log.close()
    except ChainBroken as exc:
        raise MigrationFailed(
            step, f"the PostgreSQL chain does not verify after the copy ({exc.reason}): {exc}"
        ) from None
    return ChainCopied(chain, entries, copied, beyond, marker, verified, db_head)


def _lock_head(conn: psycopg.Connection[Any], chain: str) -> tuple[int, str]:
    """Lock the chain's head row (made at (0, genesis) for a chain with no entries)."""
    conn.execute(
        "INSERT INTO gateway.chain_heads (chain, seq, hash) SELECT %(chain)s, 0, %(g)s "
        "WHERE NOT EXISTS (SELECT FROM gateway.chain_entries WHERE chain = %(chain)s) "
        "ON CONFLICT DO NOTHING",
        {"chain": chain, "g": GENESIS},
    )
    row = conn.execute(
        "SELECT seq, hash FROM gateway.chain_heads WHERE chain = %s FOR UPDATE", (chain,)
    ).fetchone()
    if row is None:
        raise MigrationFailed(
            f"chains ({chain})",
            "the PostgreSQL chain has entries but no head row: the chain there is broken",
        )
    return int(row[0]), str(row[1])


def _compare(
    conn: psycopg.Connection[Any], chain: str, file_entries: Iterator[ChainEntry], step: str
) -> tuple[tuple[int, str], int, int | None]:
    """Walk the database's entries beside the file's: (the last matched (seq, hash),
    how many the database has past the file's end, the seq of the first of those that
    records a migration). The file iterator is left after the matched entries."""
    matched = (0, GENESIS)
    beyond = 0
    marker: int | None = None
    with conn.cursor(name=f"migrate_{chain}") as cur:
        cur.itersize = pgchain.SCAN_BATCH
        cur.execute(
            "SELECT seq, prev, at, body, hash FROM gateway.chain_entries "
            "WHERE chain = %s ORDER BY seq",
            (chain,),
        )
        for seq, prev, at, body, digest in cur:
            if beyond:
                beyond += 1
                if marker is None and _records_migration(body):
                    marker = int(seq)
                continue
            entry = next(file_entries, None)
            if entry is None:
                beyond += 1
                if marker is None and _records_migration(body):
                    marker = int(seq)
                continue
            same = (entry.seq, entry.prev, entry.at, entry.hash) == (int(seq), prev, at, digest)
            if not same or _text(entry) != body:
                raise MigrationFailed(
                    step,
                    f"the PostgreSQL chain differs from the file at seq {entry.seq}: it is "
                    "another chain, not an earlier copy of this file; nothing copied",
                )
            matched = (entry.seq, entry.hash)
    return matched, beyond, marker


def _insert(
    conn: psycopg.Connection[Any], chain: str, file_entries: Iterator[ChainEntry]
) -> tuple[int, tuple[int, str]]:
    """Insert the rest of the file's entries; (how many, the last one's (seq, hash))."""
    copied = 0
    last = (0, GENESIS)
    with conn.cursor() as cur:
        while batch := list(itertools.islice(file_entries, INSERT_BATCH)):
            cur.executemany(
                "INSERT INTO gateway.chain_entries (chain, seq, prev, at, body, hash) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [(chain, e.seq, e.prev, e.at, _text(e), e.hash) for e in batch],
            )
            copied += len(batch)
            last = (batch[-1].seq, batch[-1].hash)
    return copied, last
