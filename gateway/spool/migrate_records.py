"""Step 3 of ``gatewayctl spool migrate``: every row of the local SQLite index, and each
live record's ciphertext, into the PostgreSQL spool (the tables of
:mod:`gateway.spool.pgqueries`); then every record verified there.

Copy. Rows are read in id order and copied a batch per transaction (a few hundred
records, at most :data:`BATCH_BYTES` of ciphertext): the rows the database does not
have yet are inserted with the same id, state, times, wrapped key, key epoch,
idempotency token and attempts (no claim), and their files' ciphertext goes in by
``COPY`` as 256 KiB chunks, in the same transaction. A record is in the database
with all of its chunks or not at all, so a run killed at any moment is finished by the
next one: it skips the ids already there. Erased rows (no key, no file) are copied as
metadata, so status queries and the certificate of erasure keep working. A file whose
size or SHA-256 is not its row's stops the migration before its batch commits.

Verify. For each record, once all are copied: the database's row equals the index's,
column for column; the chunks run from seq 0 without a gap, and their SHA-256 (computed
by the server) is the row's and the local file's; and, for a live record, its data key
unwraps with its epoch's key from the PostgreSQL keystore and the first segment
decrypts and authenticates. A record whose epoch key is gone locally too (unreadable
before the migration) is checked by its hashes alone. Any mismatch stops the migration
with the record's id and the rule named; no value is ever quoted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from gateway.crypto.envelope import HEADER_SIZE, SEGMENT_SIZE, TAG_SIZE, parse_header, unwrap_key
from gateway.crypto.envelope_reader import iter_plaintext
from gateway.errors import RecordCorrupt
from gateway.spool import pgqueries
from gateway.spool.backend import EpochKeys
from gateway.spool.migrate_keys import MigrationFailed

STEP = "records"
COLUMNS = (
    "id", "channel", "destination", "device_id", "user_id", "state", "received_at",
    "expires_at", "delivered_at", "held_at", "erased_at", "erase_reason", "content_type",
    "plaintext_size", "ciphertext_size", "ciphertext_sha256", "body_sha256",
    "content_sha256", "field_names", "wrapped_key", "key_epoch", "idempotency_key",
    "upstream_receipt", "attempts", "last_error",
)  # fmt: skip
"""Every column of the SQLite index's ``records`` (the database's has these, plus the claim)."""
SELECT_LOCAL = f"SELECT {', '.join(COLUMNS)} FROM records ORDER BY id"  # noqa: S608 - constants
INSERT = (
    f"INSERT INTO gateway.records ({', '.join(COLUMNS)}) "  # noqa: S608 - constants
    f"VALUES ({', '.join(f'%({c})s' for c in COLUMNS)}) ON CONFLICT (id) DO NOTHING"
)
SELECT_COPIED = f"SELECT {', '.join(COLUMNS)} FROM gateway.records WHERE id = ANY(%s)"  # noqa: S608
CHUNK_SUMS = (
    "SELECT record_id, count(*), min(seq), max(seq), sum(octet_length(data)),"
    " encode(sha256(string_agg(data, ''::bytea ORDER BY seq)), 'hex')"
    " FROM gateway.record_chunks WHERE record_id = ANY(%s) GROUP BY record_id"
)
FIRST_BYTES = HEADER_SIZE + SEGMENT_SIZE + TAG_SIZE
"""What the first segment of a record needs (the spool's segment size)."""
FIRST_CHUNKS = (
    "SELECT record_id, substring(data from 1 for %s) FROM gateway.record_chunks"
    " WHERE record_id = ANY(%s) AND seq = 0"
)

BATCH_RECORDS = 256
BATCH_BYTES = 16 * 1024 * 1024
"""Records, and bytes of ciphertext, per copying transaction at most."""
VERIFY_RECORDS = 256
VERIFY_BYTES = 64 * 1024 * 1024
"""Records, and bytes the server hashes, per verifying round trip at most."""

Row = dict[str, Any]
Progress = Callable[[str], None]


@dataclass
class RecordsCopied:
    """What step 3 did (counts only)."""

    total: int = 0
    copied: int = 0
    there: int = 0
    """Already in the database (an earlier run's)."""
    bytes: int = 0
    """Ciphertext copied now."""
    live: int = 0
    erased: int = 0
    """Records verified, live and erased."""
    decrypted: int = 0
    unreadable: int = 0
    """Live records whose epoch key is gone in the local keystore too: hashes checked."""


def _batches(rows: Iterator[Row], records: int, size: int, every: int) -> Iterator[list[Row]]:
    """``rows`` in lists of at most ``records`` rows and about ``size`` bytes of
    ciphertext (a larger record goes alone), cut at every ``every``-th row as well (so
    each progress line follows a commit)."""
    batch: list[Row] = []
    total = 0
    for n, row in enumerate(rows):
        weight = row["ciphertext_size"] if row["wrapped_key"] is not None else 0
        if batch and (len(batch) >= records or total + weight > size or n % every == 0):
            yield batch
            batch, total = [], 0
        batch.append(row)
        total += weight
    if batch:
        yield batch


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fileobj:
        while data := fileobj.read(pgqueries.CHUNK_SIZE):
            digest.update(data)
    return digest.hexdigest()


class RecordCopier:
    """Copies and verifies the records of one local spool (see the module doc)."""

    def __init__(
        self,
        index: sqlite3.Connection,
        records_dir: Path,
        conn: psycopg.Connection[Any],
        *,
        progress: Progress,
        every: int = 1000,
    ) -> None:
        self._index = index
        self._dir = records_dir
        self._conn = conn
        self._progress = progress
        self._every = max(1, every)
        self._local_sha: dict[str, str] = {}
        self.result = RecordsCopied()
        row = index.execute("SELECT COUNT(*) FROM records").fetchone()
        self.result.total = int(row[0])

    def _rows(self) -> Iterator[Row]:
        for values in self._index.execute(SELECT_LOCAL):
            yield dict(zip(COLUMNS, values, strict=True))

    def _tell(self, before: int, done: int, what: str) -> None:
        if done // self._every > before // self._every or done == self.result.total:
            self._progress(f"records: {done}/{self.result.total} {what}")

    # ------------------------------------------------------------------- copy

    def copy(self) -> RecordsCopied:
        """Copy every row not in the database yet (a transaction per batch)."""
        done = 0
        for batch in _batches(self._rows(), BATCH_RECORDS, BATCH_BYTES, self._every):
            self._copy_batch(batch)
            before, done = done, done + len(batch)
            self._tell(before, done, "copied")
        return self.result

    def _copy_batch(self, batch: list[Row]) -> None:
        new: list[Row] = []
        try:
            with self._conn.transaction():
                ids = [row["id"] for row in batch]
                cur = self._conn.execute(
                    "SELECT id FROM gateway.records WHERE id = ANY(%s)", (ids,)
                )
                there = {found for (found,) in cur.fetchall()}
                new = [row for row in batch if row["id"] not in there]
                if new:
                    with self._conn.cursor() as cur:
                        cur.executemany(INSERT, new)
                        self._copy_files(cur, [row for row in new if row["wrapped_key"]])
        except psycopg.errors.IntegrityError as exc:  # its text quotes the row: not shown
            if exc.diag.constraint_name != pgqueries.IDEMPOTENCY_INDEX:
                raise MigrationFailed(
                    STEP, f"the database refused a row ({exc.sqlstate})"
                ) from None
            raise MigrationFailed(
                STEP,
                "its idempotency token is already held by another record of the same device "
                "in the PostgreSQL spool (another spool's records are there?)",
                self._clash(new),
            ) from None
        self.result.copied += len(new)
        self.result.there += len(batch) - len(new)
        self.result.bytes += sum(row["ciphertext_size"] for row in new if row["wrapped_key"])

    def _copy_files(self, cur: psycopg.Cursor[Any], live: list[Row]) -> None:
        """Every live record's file as numbered chunks, in one COPY; each file's size
        and SHA-256 checked against its row before the transaction may commit."""
        if not live:
            return
        with cur.copy(pgqueries.COPY_CHUNKS) as copy:
            copy.set_types(list(pgqueries.CHUNK_TYPES))
            for row in live:
                record_id = row["id"]
                digest, size = hashlib.sha256(), 0
                try:
                    with (self._dir / record_id).open("rb") as fileobj:
                        for seq in itertools.count():
                            data = fileobj.read(pgqueries.CHUNK_SIZE)
                            if not data:
                                break
                            copy.write_row((record_id, seq, data))
                            digest.update(data)
                            size += len(data)
                except FileNotFoundError:
                    raise MigrationFailed(
                        STEP,
                        "the record is live but its file is missing from records/ (restore "
                        "it, or erase the record with the local gatewayd), nothing copied",
                        record_id,
                    ) from None
                if size != row["ciphertext_size"] or digest.hexdigest() != row["ciphertext_sha256"]:
                    raise MigrationFailed(
                        STEP,
                        "its file's size or SHA-256 is not what its index row says (a damaged "
                        "file): not copied",
                        record_id,
                    )
                self._local_sha[record_id] = digest.hexdigest()

    def _clash(self, rows: list[Row]) -> str | None:
        """Which of ``rows`` has an idempotency token another record holds there."""
        pairs = [(r["device_id"], r["idempotency_key"], r["id"]) for r in rows]
        cur = self._conn.execute(
            "SELECT device_id, idempotency_key, id FROM gateway.records"
            " WHERE (device_id, idempotency_key) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([p[0] for p in pairs if p[1]], [p[1] for p in pairs if p[1]]),
        )
        holder = {(device, key): rid for device, key, rid in cur.fetchall()}
        for device, key, rid in pairs:
            if key and holder.get((device, key), rid) != rid:
                return str(rid)
        return None

    # ----------------------------------------------------------------- verify

    def verify(self, keys: EpochKeys, gone: set[str]) -> RecordsCopied:
        """Check every record in the database (see the module doc); ``keys`` is the
        PostgreSQL keystore, ``gone`` the epochs the local keystore no longer has."""
        done = 0
        for batch in _batches(self._rows(), VERIFY_RECORDS, VERIFY_BYTES, self._every):
            ids = [row["id"] for row in batch]
            with self._conn.cursor(row_factory=dict_row) as cur:
                copied = {r["id"]: r for r in cur.execute(SELECT_COPIED, (ids,)).fetchall()}
            sums = {r[0]: r[1:] for r in self._conn.execute(CHUNK_SUMS, (ids,)).fetchall()}
            live = [row["id"] for row in batch if row["wrapped_key"] is not None]
            firsts = {
                rid: bytes(data)
                for rid, data in self._conn.execute(FIRST_CHUNKS, (FIRST_BYTES, live)).fetchall()
            }
            for row in batch:
                self._verify(row, copied.get(row["id"]), sums.get(row["id"]), firsts, keys, gone)
            before, done = done, done + len(batch)
            self._tell(before, done, "verified")
        return self.result

    def _verify(
        self,
        row: Row,
        copied: Row | None,
        sums: tuple[Any, ...] | None,
        firsts: dict[str, bytes],
        keys: EpochKeys,
        gone: set[str],
    ) -> None:
        record_id = row["id"]

        def fail(rule: str) -> MigrationFailed:
            return MigrationFailed("verify", rule, record_id)

        if copied is None:
            raise fail("it is not in the PostgreSQL spool after the copy")
        for column in COLUMNS:
            theirs = copied[column]
            if isinstance(theirs, memoryview):
                theirs = bytes(theirs)
            if theirs != row[column]:
                raise fail(
                    f"its column {column} in PostgreSQL differs from the local index (did the "
                    "local spool change after an earlier run? then migrate into an empty database)"
                )
        if row["wrapped_key"] is None:
            if sums is not None:
                raise fail("it is erased, yet PostgreSQL holds ciphertext for it")
            self.result.erased += 1
            return
        if sums is None:
            raise fail("it is live, yet PostgreSQL holds no ciphertext for it")
        count, low, high, size, sha = sums
        if (low, high) != (0, count - 1) or size != row["ciphertext_size"]:
            raise fail("its chunks in PostgreSQL are not numbered 0.. without a gap, or too short")
        local = self._local_sha.get(record_id)
        if local is None:
            try:
                local = _file_sha256(self._dir / record_id)
            except FileNotFoundError:
                raise fail("its local file is missing") from None
        if not sha == row["ciphertext_sha256"] == local:
            raise fail("the SHA-256 of its chunks, its row and its local file are not all equal")
        self.result.live += 1
        if row["key_epoch"] in gone:
            self.result.unreadable += 1
            return
        self._decrypt_first(row, firsts.get(record_id, b""), keys, fail)
        self.result.decrypted += 1

    def _decrypt_first(
        self, row: Row, first: bytes, keys: EpochKeys, fail: Callable[[str], MigrationFailed]
    ) -> None:
        """Unwrap the data key with the PostgreSQL keystore's epoch key and decrypt (and
        authenticate) the record's first segment from the database's copy."""
        epoch = row["key_epoch"]
        epoch_key = keys.get(epoch) if epoch else None
        if epoch_key is None:
            raise fail(f"its key epoch {epoch} is not in the PostgreSQL keystore")
        try:
            dek = unwrap_key(epoch_key, bytes(row["wrapped_key"]))
        except RecordCorrupt:
            raise fail(f"its data key does not unwrap with the key of epoch {epoch}") from None
        size = row["plaintext_size"]
        try:
            segment = parse_header(first[:HEADER_SIZE])
            need = HEADER_SIZE + min(segment, size) + TAG_SIZE
            if len(first) < need:
                first = self._leading_bytes(row["id"], need)
            plain = iter_plaintext(io.BytesIO(first[:need]), dek, row["id"].encode(), size)
            next(plain, None)
        except RecordCorrupt:
            raise fail("its first segment does not decrypt (authentication failed)") from None

    def _leading_bytes(self, record_id: str, need: int) -> bytes:
        """The first ``need`` bytes of a record's ciphertext in the database."""
        chunks = -(-need // pgqueries.CHUNK_SIZE)
        cur = self._conn.execute(
            "SELECT data FROM gateway.record_chunks WHERE record_id = %s AND seq < %s ORDER BY seq",
            (record_id, chunks),
        )
        return b"".join(bytes(data) for (data,) in cur.fetchall())
