"""``gatewayctl spool migrate --to postgresql``: one node's local spool (SQLite index,
record files, file keystore, erasure ledger, audit log, device and staff registry files)
moved into PostgreSQL, crash-safe and resumable, every record verified after the copy.

The steps, in this order, each one idempotent, so that running the migration again
after a crash (a SIGKILL at any moment) finishes it without a duplicate or a loss:

1. keys (:mod:`gateway.spool.migrate_keys`): the epoch keys, the idempotency key and
   the tombstones, in one transaction; a different key already there stops it.
2. registries: each file's document seeds its table if the table has none
   (:func:`gateway.identity.pgregistry.seed_with`); a table that holds another document
   keeps it (and the report says so).
3. records (:mod:`gateway.spool.migrate_records`): rows and ciphertext, a transaction
   per batch, ids already there skipped; then the access log entries the local index
   still holds for export (this node's, same numbers); then every record verified.
4. chains (:mod:`gateway.spool.migrate_chains`): the erasure ledger and the audit log,
   entry for entry, each in one transaction, only onto an empty chain or an earlier
   copy of the same file.

The local spool stays as it was, locked for the whole run (as gatewayd locks it: no
daemon can start on it meanwhile, and none may hold it when this starts). Writing the
migration's audit entry (step 5) is the caller's: the audit chain's
:attr:`ChainCopied.migration_seq` says whether an earlier run wrote it already.
Nothing here prints or logs a record's value, a key or the DSN; errors are
:class:`MigrationFailed` naming the step, the record and the rule.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from gateway import pgutil
from gateway.crypto.keystore import KeyStore
from gateway.crypto.pgkeystore import PgKeyStore
from gateway.errors import KeystoreError
from gateway.fsutil import lock_directory
from gateway.identity import pgregistry
from gateway.identity.registry import RegistryError
from gateway.ops.chain import HashChainLog
from gateway.spool import pgqueries
from gateway.spool.migrate_chains import MIGRATE_ACTION, ChainCopied, copy_chain
from gateway.spool.migrate_keys import KeysCopied, MigrationFailed, import_keys
from gateway.spool.migrate_records import RecordCopier, RecordsCopied
from gateway.spool.queries import SCHEMA_VERSION

__all__ = ["MIGRATE_ACTION", "MigrationFailed", "Report", "Source", "migrate"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """What is migrated: the local spool directory (its index and ``records/``), the
    file keystore, the hash-chained files by the name of their chain in the database
    (the erasure ledger, the audit log: copied in this order), the registry files by
    name, and other directories to hold locked meanwhile (the new staging directory)."""

    spool: Path
    keystore: Path
    chains: Mapping[str, HashChainLog]
    registries: Mapping[str, Path]
    hold: tuple[Path, ...] = ()


@dataclass
class Report:
    """What each step did (counts and names only)."""

    keys: KeysCopied | None = None
    registries: dict[str, str] = field(default_factory=dict)
    """Per registry: ``seeded``, ``same`` (the table already held the file's document),
    ``kept`` (the table holds another document: it stays) or ``absent`` (no file)."""
    records: RecordsCopied = field(default_factory=RecordsCopied)
    access: int = 0
    """Access log entries waiting for export, copied for this node."""
    chains: dict[str, ChainCopied] = field(default_factory=dict)


def migrate(
    source: Source,
    *,
    dsn: str,
    master: bytes,
    node_id: str,
    actor: str = "spool-migrate",
    progress: Progress = lambda _: None,
    every: int = 1000,
) -> Report:
    """Run steps 1 to 4 (see the module doc); ``progress`` hears a line per step and
    every ``every`` records. MigrationFailed (or StorageUnavailable) when it stops:
    then run it again once the cause is fixed."""
    index_path = source.spool / "index.sqlite3"
    if not index_path.is_file():
        raise MigrationFailed("start", f"no local spool index at {index_path} (the old spool?)")
    if not (source.keystore / "CURRENT").is_file():
        raise MigrationFailed("start", f"no file keystore at {source.keystore} (the old one?)")
    held: list[int] = []
    try:
        for directory in dict.fromkeys(p.resolve() for p in (source.spool, *source.hold)):
            if directory.is_dir():
                held.append(lock_directory(directory))
        keys = KeyStore(source.keystore, master)
        try:
            keys.open()
        except KeystoreError as exc:
            if "in use" not in str(exc):
                raise
            raise MigrationFailed(
                "start", f"{exc}: stop gatewayd (the local one) before migrating"
            ) from None
        try:
            index = _open_index(index_path)
            try:
                return _steps(source, index, keys, dsn, master, node_id, actor, progress, every)
            finally:
                index.close()
        finally:
            keys.close()
    finally:
        for fd in held:
            os.close(fd)  # releases the flock


def _open_index(path: Path) -> sqlite3.Connection:
    """The local index, checked: this version's schema, every live key by an epoch."""
    index = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True)
    try:
        version = index.execute("PRAGMA user_version").fetchone()[0]
        legacy = 0
        if version == SCHEMA_VERSION:
            row = index.execute(
                "SELECT COUNT(*) FROM records WHERE wrapped_key IS NOT NULL AND key_epoch IS NULL"
            ).fetchone()
            legacy = int(row[0])
    except BaseException:
        index.close()
        raise
    if version != SCHEMA_VERSION or legacy:
        index.close()
        raise MigrationFailed(
            "start",
            f"the local index is of an older layout (schema {version}, {legacy} keys wrapped "
            "by the master key): start the local gatewayd once (it upgrades it), stop it, "
            "and run this again",
        )
    return index


def _steps(
    source: Source,
    index: sqlite3.Connection,
    keys: KeyStore,
    dsn: str,
    master: bytes,
    node_id: str,
    actor: str,
    progress: Progress,
    every: int,
) -> Report:
    report = Report()
    report.keys = copied = import_keys(dsn, keys, master)
    progress(
        f"keys: {copied.epochs + copied.epochs_there} epoch key(s) ({copied.epochs} copied), "
        f"the idempotency key, {copied.destroyed + copied.destroyed_there} destroyed epoch(s)"
    )
    report.registries = _seed_registries(dsn, source.registries, actor)
    progress("registries: " + ", ".join(f"{n} {how}" for n, how in report.registries.items()))
    with pgutil.translated(), pgutil.connect(dsn, autocommit=True) as conn:
        pgutil.ensure_schema(conn, pgqueries.DDL)
        copier = RecordCopier(index, source.spool / "records", conn, progress=progress, every=every)
        if copier.result.total == 0:
            progress("records: 0/0 copied")
        copier.copy()
        report.access = _copy_access(index, conn, node_id)
        if report.access:
            progress(f"access log: {report.access} entry(ies) waiting for export copied")
        gone = {e for e in _live_epochs(index) if keys.get(e) is None}
        shared = PgKeyStore(dsn, master)
        shared.open()
        try:
            report.records = copier.verify(shared, gone)
        finally:
            shared.close()
    for chain, log in source.chains.items():
        report.chains[chain] = done = copy_chain(dsn, chain, log)
        progress(f"chain {chain}: {done.entries} entry(ies) ({done.copied} copied)")
    return report


def _seed_registries(dsn: str, files: Mapping[str, Path], actor: str) -> dict[str, str]:
    """Seed each registry table from its file unless the table has one (step 2)."""
    done: dict[str, str] = {}
    try:
        with pgregistry.session(dsn) as conn:
            for name, path in files.items():
                if not path.is_file():
                    done[name] = "absent"  # the first node seeds it (empty) at its start
                    continue
                seed = pgregistry.Seed.from_file(name, path)
                if pgregistry.seed_with(conn, seed, actor=actor):
                    done[name] = "seeded"
                    continue
                body, _ = pgregistry.load_with(conn, name)
                done[name] = "same" if body == seed.body else "kept"
    except RegistryError as exc:
        raise MigrationFailed("registries", str(exc)) from None
    return done


def _live_epochs(index: sqlite3.Connection) -> set[str]:
    rows = index.execute(
        "SELECT DISTINCT key_epoch FROM records WHERE wrapped_key IS NOT NULL"
    ).fetchall()
    return {str(row[0]) for row in rows if row[0] is not None}


def _copy_access(index: sqlite3.Connection, conn: psycopg.Connection[Any], node: str) -> int:
    """This node's access log entries not exported yet, with their numbers (the node
    exports them at its start); an entry there already must be the same."""
    made = index.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='access_pending'"
    ).fetchone()
    rows = (
        index.execute("SELECT seq, body FROM access_pending ORDER BY seq").fetchall()
        if made
        else []
    )
    if not rows:
        return 0
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO gateway.access_pending (node, seq, body) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            [(node, seq, body) for seq, body in rows],
        )
        cur.execute(
            "SELECT seq, body FROM gateway.access_pending WHERE node = %s AND seq = ANY(%s)",
            (node, [seq for seq, _ in rows]),
        )
        there = dict(cur.fetchall())
    for seq, body in rows:
        if there.get(seq) != body:
            raise MigrationFailed(
                "access log",
                f"node {node}'s pending access log entry {seq} in PostgreSQL is another "
                "entry (is another node named the same?)",
            )
    return len(rows)
