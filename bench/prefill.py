"""Filling a stopped gateway's spool fast, for the accept-cost rows of ``bench/postgresql.py``.

Posting 100,000 submissions takes about a quarter of an hour on this machine, and the
spool's own commit path (``bench/retention.py``) about two minutes; this writes the same
records straight into the spool's own tables, under their real indexes (made by the daemon at
its first start), in seconds. Each record is a clone of the newest real one (its
channel, destination, device, user, content type, hashes, field names, deadline and
key epoch) with an id of its own, received a little earlier, and a 2 KB payload
encrypted for that id with a data key of its own, wrapped by the epoch's key as the
spool does: a record the relay could deliver, not a placeholder.

* SQLite: one file per record in ``records/`` (fsynced once at the end, with
  ``os.sync``) and the rows in one transaction of ``index.sqlite3``.
* PostgreSQL: ``COPY`` into ``gateway.records`` and ``gateway.record_chunks`` in
  batches, then ``VACUUM ANALYZE`` of both (what autovacuum would have done by the time
  a spool held that many) and a ``CHECKPOINT``, so that neither lands in a measurement.
"""

from __future__ import annotations

import functools
import io
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from gateway.crypto.envelope import EncryptingWriter, new_data_key, wrap_key
from gateway.crypto.keystore import KeyStore
from gateway.crypto.pgkeystore import PgKeyStore
from gateway.spool.records import new_submission_id

PAYLOAD = os.urandom(2048)
BATCH = 10_000
SPACING = 0.001
"""Seconds between two clones' receipt times (all before the newest real record)."""

FRESH = {
    "state": "queued", "delivered_at": None, "held_at": None, "erased_at": None,
    "erase_reason": None, "idempotency_key": None, "upstream_receipt": None,
    "attempts": 0, "last_error": None,
}  # fmt: skip
LEASE = {"claimed_by": None, "lease_until": None}  # PostgreSQL only

LIVE = "SELECT count(*) FROM {table} WHERE wrapped_key IS NOT NULL"
NEWEST = (
    "SELECT * FROM {table} WHERE state = 'queued' AND wrapped_key IS NOT NULL "
    "ORDER BY received_at DESC LIMIT 1"
)


def clones(template: dict[str, Any], epoch_key: bytes, count: int) -> Iterator[dict[str, Any]]:
    """``count`` rows like ``template``, each with its ciphertext under ``"ciphertext"``."""
    keep = template["expires_at"] - template["received_at"]
    for n in range(count):
        received = template["received_at"] - (count - n) * SPACING
        record_id = new_submission_id(functools.partial(float, received))
        data_key = new_data_key()
        sink = io.BytesIO()
        writer = EncryptingWriter(sink, data_key, record_id.encode())
        writer.write(PAYLOAD)
        writer.close()
        yield {
            **template,
            **FRESH,
            "id": record_id,
            "received_at": received,
            "expires_at": received + keep,
            "plaintext_size": len(PAYLOAD),
            "ciphertext_size": writer.ciphertext_size,
            "ciphertext_sha256": writer.ciphertext_sha256(),
            "wrapped_key": wrap_key(epoch_key, data_key),
            "ciphertext": sink.getvalue(),
        }


def _batches(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def fill_sqlite(spool: Path, keystore: Path, master: bytes, target: int) -> int:
    """Live records in the local spool at ``spool`` up to ``target``; returns how many
    were added."""
    conn = sqlite3.connect(spool / "index.sqlite3")
    conn.row_factory = sqlite3.Row
    try:
        have = int(conn.execute(LIVE.format(table="records")).fetchone()[0])
        if have >= target:
            return 0
        template = dict(conn.execute(NEWEST.format(table="records")).fetchone())
        keys = KeyStore(keystore, master)
        keys.open()
        try:
            epoch_key = keys.get(template["key_epoch"])
        finally:
            keys.close()
        assert epoch_key is not None, "the template's key epoch is gone"
        columns = list(template)
        insert = (
            f"INSERT INTO records ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
        )
        records = spool / "records"
        for batch in _batches(clones(template, epoch_key, target - have)):
            for row in batch:
                fd = os.open(records / row["id"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, row["ciphertext"])
                finally:
                    os.close(fd)
            with conn:
                conn.executemany(insert, [tuple(row[c] for c in columns) for row in batch])
    finally:
        conn.close()
    os.sync()
    return target - have


def fill_postgresql(dsn: str, master: bytes, target: int) -> int:
    """Live records in the shared spool in ``dsn`` up to ``target``; returns how many
    were added."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(LIVE.format(table="gateway.records")).fetchone()
        have = int(row[0]) if row else 0
        if have >= target:
            return 0
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(NEWEST.format(table="gateway.records"))
            found = cur.fetchone()
        assert found is not None, "no queued record to clone"
        template = {**found, **LEASE}
        keys = PgKeyStore(dsn, master)
        keys.open()
        try:
            epoch_key = keys.get(template["key_epoch"])
        finally:
            keys.close()
        assert epoch_key is not None, "the template's key epoch is gone"
        columns = list(template)
        into_records = f"COPY gateway.records ({', '.join(columns)}) FROM STDIN"
        into_chunks = "COPY gateway.record_chunks (record_id, seq, data) FROM STDIN"
        for batch in _batches(clones(template, epoch_key, target - have)):
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(into_records) as copy:
                    for clone in batch:
                        copy.write_row([clone[c] for c in columns])
                with cur.copy(into_chunks) as copy:
                    for clone in batch:
                        copy.write_row((clone["id"], 0, clone["ciphertext"]))
        conn.execute("VACUUM ANALYZE gateway.records")
        conn.execute("VACUUM ANALYZE gateway.record_chunks")
        conn.execute("CHECKPOINT")
    return target - have
